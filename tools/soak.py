"""A bounded soak: mixed modes and concurrency through gRPC and HTTP while stage workers are
killed (and, on a simulated multi-node cluster, whole nodes removed), every response checked
against the in-process `PoEModel`.

`python -m tools.soak --duration 120 --fault-every 15 [--nodes 4 --transport dist]`, or
scripts/soak.sh. It prints, and with --json writes, what it served: requests, faults injected,
wrong tokens (the goal is 0), failed requests by reason, and latency percentiles. Faults cost
time, never tokens: a request that fails (its worker lost more often than `max_recoveries`, or
a stage down) is counted with its reason; a request whose tokens differ from the reference's is
a wrong answer. Exits with status 1 if any answer was wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import replace
from pathlib import Path

import grpc
import ray

from coordinator import PoEModel, load_tokenizer
from coordinator.grpc_api import wire
from coordinator.grpc_api.server import Server
from coordinator.http_api.app import HttpServer
from coordinator.serving_config import config_from_yaml_dict, load_serving_config
from tools.client import PoEClient, build_request

JOBS = [  # (mode, its arguments, sampling): greedy in every mode, and seeded sampling as the card samples
    ("full", {}, {}),
    ("full", {}, {"temperature": 0.8, "top_p": 0.95}),
    ("prefix", {"max_stages": 2}, {}),
    ("stage", {"stage": 0}, {}),
    ("composition", {"stages": [0, 3], "stage_weights": [0.3, 0.7]}, {}),
    ("wand", {"safety": 1.0, "p99_bounds": [0.6, 0.6, 0.6, 0.0]}, {}),
    ("speculative", {"draft_stage": 0, "k_draft": 3}, {}),
]


class Soak:
    def __init__(self, model: PoEModel, reference: PoEModel, tokenizer, grpc_address: str, http_url: str,
                 model_name: str, seed: int):
        self.model, self.reference, self.tokenizer = model, reference, tokenizer
        self.grpc_address, self.http_url, self.model_name = grpc_address, http_url, model_name
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.failures: Counter = Counter()
        self.latencies: list[float] = []

    def request(self) -> tuple:
        with self.lock:
            mode, args, sampling = self.random.choice(JOBS)
            ids = [self.random.randrange(1, 500) for _ in range(self.random.randint(4, 40))]
            seed = self.random.randrange(1 << 30) if sampling else None
            return mode, args, sampling, ids, self.random.randint(4, 24), seed, self.random.choice(["grpc", "http"])

    def client_loop(self, until: float) -> None:
        with PoEClient(self.grpc_address, timeout=300) as client:
            while time.monotonic() < until:
                mode, args, sampling, ids, n, seed, surface = self.request()
                msg = build_request(token_ids=ids, max_new_tokens=n, mode=mode, seed=seed, **sampling, **args)
                expected = self.reference.run([wire.generation_request(msg, self.tokenizer, self.reference.config)])
                started = time.perf_counter()
                try:
                    tokens = (list(client.stub.Generate(msg, timeout=300).token_ids) if surface == "grpc" else
                              self.over_http(mode, args, sampling, ids, n, seed))
                except Exception as exc:
                    with self.lock:
                        self.counts["failed"] += 1
                        self.failures[_reason(exc)] += 1
                    continue
                with self.lock:
                    self.latencies.append(time.perf_counter() - started)
                    self.counts["served"] += 1
                    self.counts[f"served_{surface}"] += 1
                    self.counts["wrong"] += tokens != expected[0].new_tokens

    def over_http(self, mode, args, sampling, ids, n, seed) -> list[int]:
        body = {"model": self.model_name, "prompt": ids, "max_tokens": n, "poe_mode": mode, "return_token_ids": True,
                "temperature": sampling.get("temperature", 0.0), **args}
        body.update({k: v for k, v in (("top_p", sampling.get("top_p")), ("seed", seed)) if v is not None})
        request = urllib.request.Request(f"{self.http_url}/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())["choices"][0]["token_ids"]


def _reason(exc: Exception) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"grpc {exc.code().name}: {exc.details()[:120]}"
    if isinstance(exc, urllib.error.HTTPError):
        return f"http {exc.code}: {exc.read()[:120].decode(errors='replace')}"
    return f"{type(exc).__name__}: {str(exc)[:120]}"


class Faults:
    """Every `every` seconds: SIGKILL a random stage worker's process or, on a simulated cluster,
    remove the node of a random stage (a fresh spare node is added in its place)."""

    def __init__(self, model: PoEModel, every: float, nodes, seed: int):
        self.model, self.every, self.nodes = model, every, nodes
        self.random = random.Random(seed)
        self.injected: Counter = Counter()

    def run(self, until: float) -> None:
        while time.monotonic() + self.every < until:
            time.sleep(self.every)
            try:
                stage, _, where = self.random.choice(self.model.worker_locations())
            except Exception as exc:  # a worker still restarting from the last fault does not answer
                print(f"soak: no fault this round ({type(exc).__name__}: the workers did not all answer)", flush=True)
                continue
            if self.nodes is not None and self.random.random() < 0.5:
                self.nodes.remove(where.node_id)
                self.injected["node removed"] += 1
            else:
                os.kill(where.pid, signal.SIGKILL)  # on this machine: a simulated cluster's nodes share it
                self.injected["worker killed"] += 1
            print(f"soak: fault {sum(self.injected.values())} at stage {stage}", flush=True)


class SimulatedNodes:
    """`ray.cluster_utils.Cluster`: a head without CPUs and `count` 1-CPU nodes; each node has a
    custom resource `slot<i>: 1` and a label `slot: <i>` (i never reused), to place stages by."""

    def __init__(self, count: int):
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        self.slots: dict[str, int] = {}  # node id -> its slot
        self.added = 0
        for _ in range(count):
            self.add()

    def add(self) -> None:
        slot, self.added = self.added, self.added + 1
        node = self.cluster.add_node(num_cpus=1, resources={f"slot{slot}": 1}, labels={"slot": str(slot)})
        self.slots[node.node_id] = slot

    def remove(self, node_id: str) -> None:
        """Remove a node (its raylet and every process on it), then add a fresh spare."""
        self.cluster.remove_node(next(n for n in self.cluster.list_all_nodes() if n.node_id == node_id))
        del self.slots[node_id]
        self.add()


def run_soak(checkpoint: Path, duration: float, concurrency: int, fault_every: float, nodes: int,
             transport: str, config: str | None, seed: int, max_worker_restarts: int = 100) -> dict:
    simulated = None
    if nodes:
        simulated = SimulatedNodes(nodes + 1)  # one spare for a restarted worker
        ray.init(address=simulated.cluster.address, log_to_driver=False, logging_level="WARNING")
        serving = config_from_yaml_dict({"placement_strategy": "STRICT_SPREAD", "transport": transport,
                                         "defaults": {"num_cpus": 1}}, f"soak on {nodes} nodes")
    else:
        serving = load_serving_config(config)
    serving = replace(serving, max_worker_restarts=max_worker_restarts)  # the faults, not the restart budget, are tested
    tokenizer = load_tokenizer(checkpoint)
    reference = PoEModel.from_pretrained(checkpoint)
    model = PoEModel.on_ray(checkpoint, config=serving)
    server = Server(model, tokenizer, port=0)
    http = HttpServer(model, tokenizer, port=0, model_name="soak")
    soak = Soak(model, reference, tokenizer, server.address, http.url, "soak", seed)
    faults = Faults(model, fault_every, simulated, seed)
    until = time.monotonic() + duration
    print(f"soak: {duration:g}s, {concurrency} clients, a fault every {fault_every:g}s"
          + (f", {nodes} simulated nodes over {transport}" if nodes else ""), flush=True)
    threads = [threading.Thread(target=soak.client_loop, args=(until,)) for _ in range(concurrency)]
    try:
        for t in threads:
            t.start()
        faults.run(until)  # on this thread: Ray's node removal installs signal handlers
        for t in threads:
            t.join()
    finally:
        http.stop()
        server.stop(0)
        model.shutdown()
        if simulated is not None:
            ray.shutdown()
            simulated.cluster.shutdown()
    latencies = sorted(soak.latencies)
    return {
        "duration_s": duration, "concurrency": concurrency, "nodes": nodes, "transport": transport if nodes else None,
        "max_worker_restarts": max_worker_restarts,
        "requests": soak.counts["served"] + soak.counts["failed"], "served": soak.counts["served"],
        "served_grpc": soak.counts["served_grpc"], "served_http": soak.counts["served_http"],
        "wrong": soak.counts["wrong"], "failed": soak.counts["failed"], "failure_reasons": dict(soak.failures),
        "faults": dict(faults.injected),
        "latency_s": {"p50": statistics.median(latencies) if latencies else None,
                      "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None},
    }


def main(argv: list[str] | None = None) -> None:
    from checkpoints import DEFAULT_CHECKPOINT

    p = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--duration", type=float, default=120.0, help="seconds of traffic (default: 120)")
    p.add_argument("--concurrency", type=int, default=4, help="clients sending at once (default: 4)")
    p.add_argument("--fault-every", type=float, default=20.0, help="seconds between faults (default: 20)")
    p.add_argument("--nodes", type=int, default=0,
                   help="simulate this many nodes (plus a spare) and remove nodes too (default: 0, the local Ray)")
    p.add_argument("--transport", choices=("auto", "shm", "dist"), default="dist", help="with --nodes (default: dist)")
    p.add_argument("--config", help="serving YAML without --nodes (default: cluster_configs/local-cpu.yaml)")
    p.add_argument("--max-worker-restarts", type=int, default=100,
                   help="Ray restarts per worker (default: 100; with the serving default of 3, a stage killed a "
                        "fourth time stays down and its requests fail with UNAVAILABLE, as in production)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    report = run_soak(args.checkpoint, args.duration, args.concurrency, args.fault_every, args.nodes, args.transport,
                      args.config, args.seed, args.max_worker_restarts)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    raise SystemExit(1 if report["wrong"] else 0)


if __name__ == "__main__":
    main()
