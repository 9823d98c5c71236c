"""`poe-serve`: the command line. Each subcommand parses its flags and calls one module.

Subcommands: init-checkpoint, generate, calibrate, serve, scale, demo, bench, train. The CLI holds no model logic; errors from
bad flags or inputs are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

from coordinator.core.modes import MODES


def default_checkpoint() -> Path:
    from checkpoints import DEFAULT_CHECKPOINT

    return DEFAULT_CHECKPOINT


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < float("inf"):  # NaN fails the comparison too
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: a finite number of seconds > 0")
    return value


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by local and remote generation."""
    p.add_argument("--prompt", required=True, help="text; <|bos|> is prepended")
    p.add_argument("--mode", choices=tuple(MODES), default="full",
                   help="; ".join(f"{m.name}: {m.help}" for m in MODES.values()))
    p.add_argument("--max-new-tokens", type=int, default=32)
    for info in MODES.values():  # each mode's arguments, named as in the Python and HTTP APIs
        for arg in info.args:
            parse = (_ints if arg.kind is int else _floats) if arg.many else arg.kind
            default = "" if arg.default is None else f" (default {arg.default})"
            many = "comma-separated " if arg.many else ""
            p.add_argument(f"--{arg.name.replace('_', '-')}", type=parse, help=f"{info.name}: {many}{arg.help}{default}")
    sampled = ", ".join(m.name for m in MODES.values() if m.samples)
    p.add_argument("--do-sample", action="store_true", help=f"sample instead of greedy (modes {sampled})")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop-token-ids", type=_ints, default=None, help="comma-separated token ids ending generation")


def mode_args(args) -> dict:
    """The flags of args.mode's arguments, by name (unset: None, the mode's default)."""
    return {a.name: getattr(args, a.name) for a in MODES[args.mode].args}


def local_generation(model, ids, args):
    """Run args.mode in process. Returns (new token ids, stages_used | None, acceptance | None)."""
    from coordinator.core import requests as rq
    from coordinator.grpc_api.wire import acceptance

    info = MODES[args.mode]
    if args.do_sample and not info.samples:
        sampled = ", ".join(m.name for m in MODES.values() if m.samples)
        raise ValueError(f"--do-sample: mode {args.mode} is greedy by definition; allowed with modes {sampled}")
    sampling = rq.check_sampling(args.do_sample, args.temperature, args.top_k, args.top_p, args.seed)
    seq, = model.run_mode(ids, args.max_new_tokens, info.mode(model.config, mode_args(args)), sampling,
                          args.stop_token_ids)
    used = seq.stages_used if info.statistic == "stages_used" else None
    return seq.new_tokens, used, acceptance(seq) if info.statistic == "acceptance" else None


TOKEN_ENV = "POE_SERVE_AUTH_TOKEN"


def auth_token(args) -> str | None:
    """The bearer token from --auth-token-file, else the environment (never a command-line value)."""
    if args.auth_token_file:
        return Path(args.auth_token_file).read_text().strip()
    return os.environ.get(TOKEN_ENV) or None


def add_security_flags(p: argparse.ArgumentParser, server: bool) -> None:
    p.add_argument("--auth-token-file", help=f"file holding the bearer token (default: ${TOKEN_ENV} if set)")
    if server:
        p.add_argument("--tls-cert", help="server certificate chain (PEM): serve TLS")
        p.add_argument("--tls-key", help="server private key (PEM)")
        p.add_argument("--tls-client-ca", help="CA of client certificates (PEM): require mutual TLS")
    else:
        p.add_argument("--tls-ca", help="CA that signed the server certificate (PEM): connect with TLS")
        p.add_argument("--tls-cert", help="client certificate (PEM), for mutual TLS")
        p.add_argument("--tls-key", help="client private key (PEM), for mutual TLS")


def connect(args):
    """A `PoEClient` for --server, with the bearer token and TLS flags."""
    from coordinator.serving.security import client_credentials
    from tools.client import PoEClient

    tls = client_credentials(args.tls_ca, args.tls_cert, args.tls_key) if args.tls_ca else None
    return PoEClient(args.server, token=auth_token(args), credentials=tls)


def remote_generation(args):
    """Same flags, through a server. Returns (new token ids, text, stages_used | None, acceptance | None)."""
    with connect(args) as client:
        reply = client.generate(
            args.prompt, max_new_tokens=args.max_new_tokens, mode=args.mode,
            temperature=args.temperature if args.do_sample else None, top_k=args.top_k, top_p=args.top_p,
            seed=args.seed, stop_token_ids=args.stop_token_ids, **mode_args(args),
        )
    statistic = MODES[args.mode].statistic
    used = list(reply.stages_used) if statistic == "stages_used" else None
    rate = reply.acceptance_rate if statistic == "acceptance" else None
    return list(reply.token_ids), reply.text, used, rate


def cmd_generate(args) -> None:
    if args.server:
        import grpc

        started = time.perf_counter()
        try:
            new, text, used, rate = remote_generation(args)
        except grpc.RpcError as exc:
            raise ValueError(f"server {args.server} answered {exc.code().name}: {exc.details()}") from None
        report(args, args.prompt + text, len(new), time.perf_counter() - started, used, rate)
        return
    from coordinator import PoEModel, load_tokenizer

    checkpoint = args.checkpoint or default_checkpoint()
    tokenizer = load_tokenizer(checkpoint)
    model = PoEModel.from_pretrained(checkpoint, dtype=args.dtype, device=args.device)
    ids = tokenizer.encode(args.prompt)
    started = time.perf_counter()
    new, used, rate = local_generation(model, ids, args)
    report(args, args.prompt + tokenizer.decode(new), len(new), time.perf_counter() - started, used, rate)


def report(args, text: str, num_new: int, elapsed: float, used, rate) -> None:
    print(text)
    print(f"\n[{args.mode}] {num_new} tokens in {elapsed:.2f}s ({num_new / elapsed:.1f} tok/s)", file=sys.stderr)
    if used is not None:
        print(f"stages_used: {used}", file=sys.stderr)
    if rate is not None:
        print(f"acceptance: {rate:.3f}", file=sys.stderr)


def cmd_calibrate(args) -> None:
    from coordinator import PoEModel, load_tokenizer
    from stage_workers.config import WAND_BOUNDS_FILE

    checkpoint = Path(args.checkpoint or default_checkpoint())
    tokenizer = load_tokenizer(checkpoint)
    model = PoEModel.from_pretrained(checkpoint, dtype=args.dtype, device=args.device)
    ids = tokenizer.encode(Path(args.text).read_text(errors="replace"))
    window = min(args.window, model.config.sequence_len)
    chunks = [[tokenizer.bos_token_id] + ids[i : i + window - 1] for i in range(1, len(ids), window - 1)]
    chunks = [c for c in chunks if len(c) > 1][: args.max_chunks]
    bounds = model.calibrate_wand(chunks, quantile=args.quantile)
    out = Path(args.out) if args.out else checkpoint / WAND_BOUNDS_FILE
    out.write_text(json.dumps({"wand_p99_bounds": bounds, "quantile": args.quantile, "text": str(args.text),
                               "num_positions": sum(len(c) for c in chunks)}, indent=2))
    print(f"wand_p99_bounds = {[round(b, 4) for b in bounds]} over {len(chunks)} chunks -> {out}")


def cmd_init_checkpoint(args) -> None:
    from checkpoints.writer import init_checkpoint

    path = init_checkpoint(args.dir, args.preset, seed=args.seed, dtype=args.dtype,
                           max_shard_bytes=int(args.max_shard_mb * 2**20) if args.max_shard_mb else None)
    print(f"wrote {args.preset} checkpoint to {path}")


def cmd_serve(args) -> None:
    from coordinator import PoEModel
    from coordinator.grpc_api.server import Server
    from coordinator.http_api.app import serve_http
    from coordinator.serving.security import ServerSecurity
    from coordinator.serving.shutdown import shut_down, wait_for_signal
    from coordinator.tokenizer import load_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    security = ServerSecurity(auth_token(args), args.tls_cert, args.tls_key, args.tls_client_ca)
    security.credentials()  # unreadable certificate files fail here, before Ray starts
    checkpoint = args.checkpoint or default_checkpoint()
    address = args.address or os.environ.get("RAY_ADDRESS")  # set when running as a Ray job
    cluster = PoEModel.on_ray(checkpoint, config=args.config, dtype=args.dtype, address=address)
    try:
        tokenizer = load_tokenizer(checkpoint)
        server = Server(cluster, tokenizer, host=args.host, port=args.port,
                        max_queue=cluster.backend.serving_config.max_queue, security=security)
        # the OpenAI-compatible HTTP API and /metrics, on the same engine loop and drain (coordinator/http_api/app.py)
        http = serve_http(cluster, tokenizer, args.host, args.http_port, args.metrics_port, security,
                          args.served_model_name or Path(checkpoint).name, drain=server.admission)
    except BaseException:
        cluster.shutdown()
        raise
    print(f"poe-serve: serving {checkpoint} on {server.address} ({cluster.config.num_stages} stage workers)"
          + (f"; HTTP on {http.url}" if http else ""), flush=True)
    name = wait_for_signal()
    print(f"poe-serve: {name}: draining for up to {args.shutdown_timeout:g}s", flush=True)

    def release() -> None:
        if http:
            http.stop()
        cluster.shutdown()

    shut_down(server, release, args.shutdown_timeout)
    print("poe-serve: stopped", flush=True)


def cmd_scale(args) -> None:
    import grpc

    with connect(args) as client:
        try:
            replicas = client.scale_stage(args.stage, args.replicas)
        except grpc.RpcError as exc:
            raise ValueError(f"server {args.server} answered {exc.code().name}: {exc.details()}") from None
    print(f"replicas per stage: {replicas}")


def cmd_demo(args) -> None:
    from tools.demo import run_demo

    run_demo(Path(args.checkpoint or default_checkpoint()), config=args.config, max_new_tokens=args.max_new_tokens)


def cmd_bench(args) -> None:
    from checkpoints.writer import init_checkpoint
    from tools.bench import SECTIONS, BenchConfig, run_bench

    if args.plot and importlib.util.find_spec("matplotlib") is None:  # fail before a long run, not after
        raise ValueError("--plot needs matplotlib: pip install matplotlib (or the 'test' extra)")
    checkpoint = args.checkpoint
    if checkpoint is None:  # the small preset, written once into the user's cache
        checkpoint = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "poe-serve" / "small"
        if not (checkpoint / "config.json").is_file():
            init_checkpoint(checkpoint, "small", seed=0)
    cfg = BenchConfig(checkpoint=str(checkpoint), trained=str(args.trained or default_checkpoint()), config=args.config,
                      prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                      concurrency=tuple(int(c) for c in args.concurrency.split(",")), dtype=args.dtype,
                      device=args.device,
                      sections=tuple(args.sections.split(",")) if args.sections else SECTIONS)
    run_bench(cfg, json_out=args.json, plot_out=args.plot)


def cmd_train(args) -> None:
    from trainer.train import TrainConfig, train

    train(TrainConfig(out_dir=args.out, seed=args.seed, steps=args.steps, compile=not args.no_compile))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poe-serve", description="Stage-parallel serving for PoE language models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-checkpoint", help="write a random checkpoint of a preset shape")
    p.add_argument("dir")
    p.add_argument("--preset", choices=("tiny", "small", "1.5b"), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="default: fp32 (bf16 for 1.5b)")
    p.add_argument("--max-shard-mb", type=float, default=None, help="shard the weights (1.5b: 1024 by default)")
    p.set_defaults(func=cmd_init_checkpoint)

    p = sub.add_parser("generate", help="generate a continuation locally, or through a server")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the embedded trained model)")
    p.add_argument("--server", help="HOST:PORT of a poe-serve gRPC server (instead of a local model)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    add_generation_flags(p)
    add_security_flags(p, server=False)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("calibrate", help="calibrate WAND bounds on a text file")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the embedded trained model)")
    p.add_argument("--text", required=True, help="validation text file")
    p.add_argument("--quantile", type=float, default=0.99)
    p.add_argument("--window", type=int, default=256, help="tokens per calibration chunk")
    p.add_argument("--max-chunks", type=int, default=64)
    p.add_argument("--out", help="output file (default: CHECKPOINT/wand_bounds.json, read by the loader)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("serve", help="serve gRPC over Ray stage workers (joins RAY_ADDRESS when set)")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the embedded trained model)")
    p.add_argument("--config", help="cluster config YAML (default: cluster_configs/local-cpu.yaml)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=50051)
    http = p.add_mutually_exclusive_group()  # /metrics is on the HTTP port when HTTP is on
    http.add_argument("--http-port", type=int, help="serve the OpenAI-compatible HTTP API and /metrics here (0: any free port)")
    http.add_argument("--metrics-port", type=int, help="without --http-port: serve /metrics alone here")
    p.add_argument("--served-model-name", help="the model id of the HTTP API (default: the checkpoint directory's name)")
    p.add_argument("--address", help="Ray cluster address to join (default: RAY_ADDRESS, else start one)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--shutdown-timeout", type=_seconds, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT: refuse new requests, let those in flight finish, release the workers "
                        "and exit, all within this (default: 30)")
    add_security_flags(p, server=True)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("scale", help="serve a stage with N replicas on a running server (in-flight requests continue)")
    p.add_argument("--server", required=True, help="HOST:PORT of a poe-serve gRPC server")
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--replicas", type=int, required=True)
    add_security_flags(p, server=False)
    p.set_defaults(func=cmd_scale)

    p = sub.add_parser("demo", help="local Ray cluster + gRPC server + one call per mode, as a table")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the embedded trained model)")
    p.add_argument("--config", help="cluster config YAML (default: cluster_configs/local-cpu.yaml)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="measure throughput, latency, memory, speculation and WAND in one run")
    p.add_argument("--checkpoint", help="model to time (default: the small preset, written to ~/.cache/poe-serve)")
    p.add_argument("--trained", help="model of the speculative/WAND figures (default: the embedded trained model)")
    p.add_argument("--config", help="cluster config YAML (default: cluster_configs/local-cpu.yaml)")
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated concurrency levels")
    p.add_argument("--dtype", default=None, help="worker dtype (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--device", default="cpu", help="the in-process model's device and the bandwidth floor's (cpu, cuda)")
    p.add_argument("--sections", default=None,
                   help="comma-separated subset of: floor, single_stream, transport, concurrency, modes, trained")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--plot", help="write a tok/s-against-concurrency PNG here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("train", help="train the embedded default checkpoint (about an hour on 2 cores)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slower, no C++ compiler needed)")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"poe-serve {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
