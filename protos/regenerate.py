"""Regenerate the committed stubs: `python -m protos.regenerate` from the repository root.

`generate(out_dir)` writes poe_serving_pb2.py, poe_serving_pb2.pyi and poe_serving_pb2_grpc.py
into out_dir/protos/; a test compares them with the committed files.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    (out_dir / "protos").mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", str(ROOT / "protos" / "poe_serving.proto")]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted((out_dir / "protos").glob("poe_serving_pb2*"))


if __name__ == "__main__":
    for path in generate(ROOT):
        print(f"wrote {path.relative_to(ROOT)}")
    sys.exit(0)
