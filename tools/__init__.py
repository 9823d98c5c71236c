"""Tooling above the runtime: the CLI, the demo, the benchmarks, the gRPC client and progress bars."""
