"""`poe-serve demo`: a local Ray cluster, a gRPC server, and one real client call per mode.

It prints the prompt, each mode's continuation, WAND's exit stages, the speculative
acceptance and the time of each call in a table, then shuts everything down. It knows the
client and the launcher; the model is whatever checkpoint it is given.
"""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

from coordinator.core.modes import MODES

DEMO_PROMPT = "def fibonacci(n):\n"


CARD_SAMPLING = dict(temperature=0.8, top_p=0.95, seed=0)  # the model card's sampling example
DEMO_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                                "args": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                                         "maxItems": 3}},
               "required": ["name", "args"]}  # structured output: what the prompt's function is called and takes


def demo_calls(num_stages: int) -> list[tuple[str, dict]]:
    """(label, client arguments): each mode of the table with its example arguments, the full
    model sampled as the model card does, speculative sampling, and a JSON schema's output."""
    calls = []
    for info in MODES.values():
        example = info.example(num_stages)
        shown = ", ".join(f"{k}={v}" for k, v in example.items())
        calls.append((f"{info.name} ({shown})" if shown else info.name, dict(mode=info.name, **example)))
        if info.name == "full":
            calls.append(("full, sampled", dict(mode="full", **CARD_SAMPLING)))
            calls.append(("full, JSON schema", dict(mode="full", structured_outputs={"json": DEMO_SCHEMA})))
        if info.name == "speculative":
            calls.append(("speculative, sampled", dict(mode="speculative", **example, **CARD_SAMPLING)))
    return calls


def _cell(text: str, width: int) -> list[str]:
    flat = text.replace("\n", "⏎ ")
    return textwrap.wrap(flat, width) or [""]


def render_table(rows: list[tuple[str, str, str, str]], widths=(28, 56, 22, 8)) -> str:
    header = ("mode", "continuation", "stages_used / accept", "time")
    lines = []
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    for i, row in enumerate([header, *rows]):
        cells = [_cell(c, w) for c, w in zip(row, widths)]
        for j in range(max(len(c) for c in cells)):
            parts = [(c[j] if j < len(c) else "").ljust(w) for c, w in zip(cells, widths)]
            lines.append("| " + " | ".join(parts) + " |")
        if i == 0:
            lines.append(sep.replace("-", "="))
    return "\n".join([sep, *lines, sep])


def run_demo(checkpoint: Path, config: str | None = None, prompt: str = DEMO_PROMPT, max_new_tokens: int = 40) -> None:
    from coordinator import PoEModel
    from coordinator.grpc_api.server import Server
    from coordinator.tokenizer import load_tokenizer
    from tools.client import PoEClient

    started = time.perf_counter()
    print(f"starting a local Ray cluster ({checkpoint})", file=sys.stderr)
    with PoEModel.on_ray(checkpoint, config=config) as cluster:
        workers = len({w for ids in cluster.engine.pipeline.topology for w in ids})  # a stage group's once
        server = Server(cluster, load_tokenizer(checkpoint), host="127.0.0.1", port=0)
        print(f"gRPC server on {server.address} (ready in {time.perf_counter() - started:.1f}s)", file=sys.stderr)
        try:
            with PoEClient(server.address) as client:
                info = client.model_info()
                rows = []
                for name, kwargs in demo_calls(len(info.stage_layout)):
                    t0 = time.perf_counter()
                    reply = client.generate(prompt, max_new_tokens=max_new_tokens, **kwargs)
                    elapsed = time.perf_counter() - t0
                    statistic, extra = MODES[kwargs["mode"]].statistic, ""
                    if statistic == "stages_used":
                        extra = " ".join(str(s) for s in reply.stages_used)
                    elif statistic == "acceptance":
                        extra = f"accept {reply.acceptance_rate:.2f}"
                    rows.append((name, reply.text, extra, f"{elapsed:.2f}s"))
        finally:
            server.stop()
    layout = list(info.stage_layout)
    print(f"\nmodel: {info.parameter_count:,} parameters, stages {layout}, boundaries {list(info.boundary_layers)}, "
          f"served by {workers} Ray worker{'s' if workers > 1 else ''}")
    print(f"prompt: {prompt!r}   ({max_new_tokens} new tokens per call, greedy unless noted)\n")
    print(render_table(rows))
    print(f"\ndone in {time.perf_counter() - started:.1f}s")
