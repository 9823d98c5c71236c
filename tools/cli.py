"""`poe-serve`: the command line. Each subcommand parses its flags and calls one module.

Subcommands: init-checkpoint, generate, score, info, health, calibrate, serve, scale, workers, demo,
bench, train. A flag means the same with and without `--server`. The CLI holds no model logic; errors
from bad flags or inputs are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

from coordinator.core.modes import ARG_NAMES, MODES


def default_checkpoint() -> Path:
    from checkpoints import DEFAULT_CHECKPOINT

    return DEFAULT_CHECKPOINT


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: an integer >= 1")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: a TCP port 0..65535 (0: any free port)")
    return value


def add_dtype_flag(p: argparse.ArgumentParser, default_help: str = "fp32 on CPU, bf16 on CUDA") -> None:
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help=f"dtype the weights are served in (default: {default_help})")


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
    p.add_argument("--max-new-tokens", type=_count, default=32, help="new tokens at most (default: 32)")
    for info in MODES.values():  # each mode's arguments, named as in the Python and HTTP APIs
        for arg in info.args:
            parse = (_ints if arg.kind is int else _floats) if arg.many else arg.kind
            default = "" if arg.default is None else f" (default {arg.default})"
            many = "comma-separated " if arg.many else ""
            p.add_argument(f"--{arg.name.replace('_', '-')}", type=parse, help=f"{info.name}: {many}{arg.help}{default}")
    sampled = ", ".join(m.name for m in MODES.values() if m.samples)
    p.add_argument("--do-sample", action="store_true", help=f"sample instead of greedy (modes {sampled}); the "
                   "sampling flags below need it, and are an error without it")
    p.add_argument("--temperature", type=float, help="with --do-sample: softmax temperature > 0 (default: 1)")
    p.add_argument("--top-k", type=int, help="with --do-sample: keep the k most likely tokens")
    p.add_argument("--top-p", type=float, help="with --do-sample: keep the smallest set of probability >= p, in (0, 1]")
    p.add_argument("--seed", type=int, help="with --do-sample: the sampler's seed (default: random)")
    p.add_argument("--stop-token-ids", type=_ints, default=None, help="comma-separated token ids ending generation")


def mode_args(args) -> dict:
    """Every mode flag, by argument name (unset: None); one of another mode is refused by MODES."""
    return {name: getattr(args, name) for name in ARG_NAMES}


def sampling_of(args):
    """The sampling flags, checked as the Python API checks its arguments (None: greedy)."""
    from coordinator.core import requests as rq

    if args.do_sample and not MODES[args.mode].samples:
        sampled = ", ".join(m.name for m in MODES.values() if m.samples)
        raise ValueError(f"--do-sample: mode {args.mode} is greedy by definition; allowed with modes {sampled}")
    return rq.check_sampling(args.do_sample, args.temperature, args.top_k, args.top_p, args.seed, switch="--do-sample")


TOKEN_ENV = "POE_SERVE_AUTH_TOKEN"


def auth_token(args) -> str | None:
    """The bearer token from --auth-token-file, else the environment (never a command-line value)."""
    if args.auth_token_file:
        return Path(args.auth_token_file).read_text().strip()
    return os.environ.get(TOKEN_ENV) or None


def client_command(sub, name: str, func, help: str) -> argparse.ArgumentParser:
    """A subcommand that calls a running server over gRPC: --server and the client's security flags."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--server", required=True, help="HOST:PORT of a poe-serve gRPC server")
    add_security_flags(p, server=False)
    p.set_defaults(func=func)
    return p


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


def remote_generation(args, sampling):
    """Through a server. Returns (new token ids, text, stages_used | None, acceptance | None, seconds)."""
    started = time.perf_counter()
    with connect(args) as client:
        reply = client.generate(
            args.prompt, max_new_tokens=args.max_new_tokens, mode=args.mode,
            temperature=sampling.temperature if sampling else None, top_k=args.top_k, top_p=args.top_p,
            seed=args.seed, stop_token_ids=args.stop_token_ids, **mode_args(args),
        )
    statistic = MODES[args.mode].statistic
    used = list(reply.stages_used) if statistic == "stages_used" else None
    rate = reply.acceptance_rate if statistic == "acceptance" else None
    return list(reply.token_ids), reply.text, used, rate, time.perf_counter() - started


def local_generation(args, sampling):
    """In process. Returns (new token ids, text, stages_used | None, acceptance | None, seconds generating)."""
    from coordinator import PoEModel, load_tokenizer
    from coordinator.grpc_api.wire import acceptance
    from stage_workers.config import load_config

    checkpoint = args.checkpoint or default_checkpoint()
    info = MODES[args.mode]
    mode = info.mode(load_config(checkpoint), mode_args(args))  # flag errors before the model loads
    tokenizer = load_tokenizer(checkpoint)
    model = PoEModel.from_pretrained(checkpoint, dtype=args.dtype, device=args.device)
    started = time.perf_counter()
    seq, = model.run_mode(tokenizer.encode(args.prompt), args.max_new_tokens, mode, sampling, args.stop_token_ids)
    used = seq.stages_used if info.statistic == "stages_used" else None
    rate = acceptance(seq) if info.statistic == "acceptance" else None
    return seq.new_tokens, tokenizer.decode(seq.new_tokens), used, rate, time.perf_counter() - started


def cmd_generate(args) -> None:
    sampling = sampling_of(args)  # the same checks with and without --server, before anything starts
    new, text, used, rate, elapsed = call(args, lambda: (remote_generation if args.server else local_generation)(
        args, sampling))
    report(args, args.prompt + text, len(new), elapsed, used, rate)


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
    from coordinator.serving.shutdown import interruptible_startup, release_after_interrupt, shut_down, wait_for_signal
    from coordinator.tokenizer import load_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    security = ServerSecurity(auth_token(args), args.tls_cert, args.tls_key, args.tls_client_ca)
    security.credentials()  # unreadable certificate files fail here, before Ray starts
    for flag, port in (("--port", args.port), ("--http-port", args.http_port), ("--metrics-port", args.metrics_port)):
        check_port_free(flag, args.host, port)  # a busy port fails here too, not after the workers load
    checkpoint = args.checkpoint or default_checkpoint()
    address = args.address or os.environ.get("RAY_ADDRESS")  # set when running as a Ray job
    started: list = []  # what to release if the start is interrupted
    try:
        with interruptible_startup(args.shutdown_timeout):
            cluster = PoEModel.on_ray(checkpoint, config=args.config, dtype=args.dtype, address=address)
            started.append(cluster.shutdown)
            tokenizer = load_tokenizer(checkpoint)
            serving = cluster.backend.serving_config
            server = Server(cluster, tokenizer, host=args.host, port=args.port, max_queue=serving.max_queue,
                            security=security, max_request_bytes=serving.max_request_bytes)
            started.append(lambda: server.stop(grace=0))
            # the OpenAI-compatible HTTP API and /metrics, on the same engine loop and drain (coordinator/http_api/app.py)
            http = serve_http(cluster, tokenizer, args.host, args.http_port, args.metrics_port, security,
                              args.served_model_name or Path(checkpoint).name, drain=server.admission,
                              max_request_bytes=serving.max_request_bytes)
    except KeyboardInterrupt:
        release_after_interrupt(lambda: [undo() for undo in reversed(started)])
    except BaseException:
        for undo in reversed(started):
            undo()
        raise
    print(f"poe-serve: serving {checkpoint} on {server.address} ({cluster.config.num_stages} stage workers)"
          + (f"; HTTP on {http.url}" if http else ""), flush=True)
    name = wait_for_signal()
    print(f"poe-serve: {name}: draining for up to {args.shutdown_timeout:g}s (a second signal exits at once)",
          flush=True)

    def release() -> None:
        if http:
            http.stop()
        cluster.shutdown()

    shut_down(server, release, args.shutdown_timeout)
    print("poe-serve: stopped", flush=True)


def check_port_free(flag: str, host: str, port: int | None) -> None:
    """A ValueError naming the flag when `port` cannot be bound on `host` (None and 0 are always free)."""
    import socket

    if not port:
        return
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ValueError(f"{flag} {port}: cannot listen on {host}:{port} ({exc.strerror}); "
                             f"allowed: a free port, or 0 for any") from None


def cmd_score(args) -> None:
    with connect(args) as client:
        reply = call(args, lambda: client.score(args.text))
    print(json.dumps({"token_logprobs": list(reply.token_logprobs), "bits_per_byte": reply.bits_per_byte}))


def cmd_info(args) -> None:
    from google.protobuf.json_format import MessageToDict

    with connect(args) as client:
        info = call(args, client.model_info)
    print(json.dumps(MessageToDict(info), indent=2))


def cmd_health(args) -> None:
    """Print the server's health; with --wait, first wait (up to that many seconds) for SERVING,
    through refused connections and NOT_SERVING while the server starts."""
    import grpc

    deadline = time.monotonic() + (args.wait or 0)
    with connect(args) as client:
        while True:
            try:
                status = client.health()
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() >= deadline:
                    raise ValueError(f"server {args.server} answered {exc.code().name}: {exc.details()}") from None
                status = None  # not listening yet
            if status == "SERVING" or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
    print(status)
    if status != "SERVING":
        sys.exit(1)


def call(args, fn):
    """A client call; a gRPC error becomes one line naming the server and the status."""
    import grpc

    try:
        return fn()
    except grpc.RpcError as exc:
        raise ValueError(f"server {args.server} answered {exc.code().name}: {exc.details()}") from None


def cmd_scale(args) -> None:
    with connect(args) as client:
        replicas = call(args, lambda: client.scale_stage(args.stage, args.replicas))
    print(f"replicas per stage: {replicas}")


def cmd_workers(args) -> None:
    with connect(args) as client:
        workers = call(args, client.list_workers)
    print(f"{'stage':>5} {'replica':>7}  {'node id':<16} {'node ip':<15} {'device':<8} {'pid':>7}")
    for w in workers:
        print(f"{w.stage:>5} {w.replica:>7}  {w.node_id[:16]:<16} {w.node_ip:<15} {w.device:<8} {w.pid:>7}")


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
                      prompt_len=args.prompt_len, new_tokens=args.new_tokens, decode_tokens=args.decode_tokens,
                      rounds=args.rounds,
                      concurrency=tuple(int(c) for c in args.concurrency.split(",")), dtype=args.dtype,
                      device=args.device,
                      sections=tuple(args.sections.split(",")) if args.sections else SECTIONS)
    run_bench(cfg, json_out=args.json, plot_out=args.plot)


def cmd_train(args) -> None:
    from trainer.train import TrainConfig, train

    train(TrainConfig(out_dir=args.out, seed=args.seed, steps=args.steps, compile=not args.no_compile))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poe-serve", description="Stage-parallel serving for PoE language models")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('poe-serve')}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-checkpoint", help="write a random checkpoint of a preset shape")
    p.add_argument("dir")
    p.add_argument("--preset", choices=("tiny", "small", "1.5b"), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    add_dtype_flag(p, "fp32, bf16 for 1.5b")
    p.add_argument("--max-shard-mb", type=float, default=None, help="shard the weights (1.5b: 1024 by default)")
    p.set_defaults(func=cmd_init_checkpoint)

    p = sub.add_parser("generate", help="generate a continuation locally, or through a server (the same flags)")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the embedded trained model)")
    p.add_argument("--server", help="HOST:PORT of a poe-serve gRPC server (instead of a local model)")
    add_dtype_flag(p)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    add_generation_flags(p)
    add_security_flags(p, server=False)
    p.set_defaults(func=cmd_generate)

    p = client_command(sub, "score", cmd_score,
                       "a server's full-PoE log-prob of each token of a text, and bits per byte")
    p.add_argument("--text", required=True, help="the text to score; <|bos|> is prepended")

    client_command(sub, "info", cmd_info, "a server's model: stage layout, boundaries, vocabulary, context, workers")

    p = client_command(sub, "health", cmd_health,
                       "a server's gRPC health (SERVING or NOT_SERVING); exit 0 only when SERVING")
    p.add_argument("--wait", type=_seconds, metavar="SECONDS",
                   help="wait up to this long for SERVING (a server still starting refuses connections)")

    p = sub.add_parser("calibrate", help="calibrate WAND bounds on a text file")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the embedded trained model)")
    p.add_argument("--text", required=True, help="validation text file")
    p.add_argument("--quantile", type=float, default=0.99, help="the margin quantile kept (default: 0.99)")
    p.add_argument("--window", type=int, default=256, help="tokens per calibration chunk (default: 256)")
    p.add_argument("--max-chunks", type=int, default=64, help="chunks of the text used at most (default: 64)")
    p.add_argument("--out", help="output file (default: CHECKPOINT/wand_bounds.json, read by the loader)")
    add_dtype_flag(p)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("serve", help="serve gRPC (and, with --http-port, the OpenAI-compatible HTTP API and "
                                     "/metrics) over Ray stage workers; joins RAY_ADDRESS when set",
                       description="Serve the model over Ray stage workers: gRPC on --port, and with --http-port "
                                   "the OpenAI-compatible HTTP API and /metrics on the same engine. SIGTERM or "
                                   "Ctrl-C drains and exits within --shutdown-timeout; a second Ctrl-C exits at once.")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the embedded trained model)")
    p.add_argument("--config", help="cluster config YAML (default: cluster_configs/local-cpu.yaml)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=_port, default=50051, help="gRPC port (default: 50051)")
    http = p.add_mutually_exclusive_group()  # /metrics is on the HTTP port when HTTP is on
    http.add_argument("--http-port", type=_port,
                      help="serve the OpenAI-compatible HTTP API and /metrics here (0: any free port; default: off)")
    http.add_argument("--metrics-port", type=_port, help="without --http-port: serve /metrics alone here")
    p.add_argument("--served-model-name", help="the model id of the HTTP API (default: the checkpoint directory's name)")
    p.add_argument("--address", help="Ray cluster address to join (default: RAY_ADDRESS, else start one)")
    add_dtype_flag(p, "each stage's config, else fp32 on CPU, bf16 on CUDA")
    p.add_argument("--shutdown-timeout", type=_seconds, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT: refuse new requests, let those in flight finish, release the workers "
                        "and exit, all within this (default: 30)")
    add_security_flags(p, server=True)
    p.set_defaults(func=cmd_serve)

    p = client_command(sub, "scale", cmd_scale,
                       "serve a stage with N replicas on a running server (in-flight requests continue)")
    p.add_argument("--stage", type=int, required=True, help="the stage index")
    p.add_argument("--replicas", type=_count, required=True, help="workers to serve it from now on")

    client_command(sub, "workers", cmd_workers,
                   "where each stage worker of a running server runs (node, address, device, pid)")

    p = sub.add_parser("demo", help="local Ray cluster + gRPC server + one call per mode, as a table")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the embedded trained model)")
    p.add_argument("--config", help="cluster config YAML (default: cluster_configs/local-cpu.yaml)")
    p.add_argument("--max-new-tokens", type=_count, default=40, help="new tokens per call (default: 40)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="measure throughput, latency, memory, speculation and WAND in one run")
    p.add_argument("--checkpoint", help="model to time (default: the small preset, written to ~/.cache/poe-serve)")
    p.add_argument("--trained", help="model of the speculative/WAND figures (default: the embedded trained model)")
    p.add_argument("--config", help="cluster config YAML (default: cluster_configs/local-cpu.yaml)")
    p.add_argument("--prompt-len", type=_count, default=48, help="prompt tokens (default: 48)")
    p.add_argument("--new-tokens", type=_count, default=32,
                   help="new tokens per request of the concurrency and trained sections (default: 32)")
    p.add_argument("--decode-tokens", type=_count, default=128,
                   help="single stream: new tokens per timed decode, prefill left out (default: 128)")
    p.add_argument("--rounds", type=_count, default=3,
                   help="single stream and transport: interleaved rounds; medians and spreads reported (default: 3)")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated concurrency levels (default: 1,4,16,64)")
    add_dtype_flag(p)
    p.add_argument("--device", default="cpu", help="the in-process model's device and the bandwidth floor's (cpu, cuda)")
    p.add_argument("--sections", default=None,
                   help="comma-separated subset of: floor, single_stream, transport, concurrency, modes, trained")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--plot", help="write a tok/s-against-concurrency PNG here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("train", help="train the embedded default checkpoint (about an hour on 2 cores)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--steps", type=_count, default=1000, help="optimizer steps (default: 1000)")
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
