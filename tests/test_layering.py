"""The architecture as docs/architecture.md draws it: which package may import which, and where Ray is.

Every import in the source tree (lazy ones inside functions too) is read with `ast` and checked
against the allowed edges, so a new upward import or a stray `import ray` fails here."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = "coordinator (model.py, tokenizer.py, serving_config.py)"
# package -> the packages it may import (besides itself and third-party code)
ALLOWED = {
    "stage_workers": set(),
    "coordinator.core": {"stage_workers"},
    "coordinator.serving": {"coordinator.core", "stage_workers"},
    TOP: {"coordinator.core", "coordinator.ray_cluster", "stage_workers"},  # on_ray reaches its backend lazily
    "coordinator.grpc_api": {TOP, "coordinator.core", "coordinator.serving", "protos", "stage_workers"},
    "coordinator.http_api": {TOP, "coordinator.core", "coordinator.serving", "coordinator.grpc_api", "stage_workers"},
    "coordinator.ray_cluster": {TOP, "coordinator.core", "coordinator.serving", "coordinator.grpc_api",
                                "coordinator.http_api", "stage_workers"},
    "tools": {TOP, "coordinator.core", "coordinator.serving", "coordinator.grpc_api", "coordinator.http_api",
              "coordinator.ray_cluster", "stage_workers", "protos", "checkpoints", "trainer"},
}
RAY_ALLOWED = {"coordinator/ray_cluster/cluster.py", "coordinator/ray_cluster/serve_app.py", "tools/transport_bench.py",
               "tools/soak.py"}


def package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "coordinator":
        sub = f"coordinator.{parts[1]}" if len(parts) > 1 else TOP
        return sub if sub in ALLOWED else TOP
    return parts[0] if parts[0] in {"stage_workers", "tools", "protos", "checkpoints", "trainer"} else None


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def imports(path: Path, module: str):
    """(imported module, line) of every import in the file of `module`; relative ones resolved."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            yield base, node.lineno


def sources():
    for package in ("coordinator", "stage_workers", "tools"):
        yield from sorted((ROOT / package).rglob("*.py"))


def test_every_import_follows_the_architecture():
    wrong = []
    for path in sources():
        own = package_of(module_of(path))
        for module, line in imports(path, module_of(path)):
            target = package_of(module)
            if target is not None and target != own and target not in ALLOWED[own]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({own}) imports {module} ({target})")
    assert not wrong, "imports against the architecture (docs/architecture.md):\n" + "\n".join(wrong)


def test_ray_is_imported_only_by_the_ray_lifecycle_the_transport_bench_and_the_soak():
    found = {str(path.relative_to(ROOT)) for path in sources()
             for module, _ in imports(path, module_of(path)) if module == "ray" or module.startswith("ray.")}
    assert found == RAY_ALLOWED


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    """The walk above finds an import inside a function, and resolves a relative one."""
    assert package_of("coordinator.grpc_api.server") == "coordinator.grpc_api"
    assert package_of("coordinator.model") == TOP and package_of("coordinator") == TOP
    probe = tmp_path / "probe.py"
    probe.write_text("from .rows import Rows\n\n\ndef f():\n    from coordinator.core import engine\n")
    found = list(imports(probe, "stage_workers.probe"))
    assert found == [("stage_workers.rows", 1), ("coordinator.core", 5)]
