"""Readiness, one rule for every front: gRPC health, HTTP `/ready`, and the Ray Serve health check.

A server is ready when it would serve every new request: it is not draining, its engine loop
runs, and every stage has a live worker. `not_ready` says why not, or None. It knows the drain
flag, the loop and the model; nothing of the protocols that report it.
"""

from __future__ import annotations


def not_ready(draining: bool, loop, model) -> str | None:
    """Why new requests would not all be served (draining, the engine loop down, a stage down), or None."""
    if draining:
        return "draining: the server is shutting down"
    failure = loop.failure()
    if failure is not None:
        return f"the engine loop is not running: {failure}"
    down = model.stages_down()
    return f"stages {down} have no live worker: a lost worker was not restarted" if down else None
