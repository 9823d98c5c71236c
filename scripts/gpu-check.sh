#!/usr/bin/env bash
# GPU checks on one GPU, in under 8 minutes: the mode suite on CUDA against the full-recompute
# oracle (and the bucketed decode step as CUDA graphs), then `poe-serve bench` on the card's 1.5b
# shape with cluster_configs/one-gpu.yaml, reported against the GPU's bandwidth floor.
#   scripts/gpu-check.sh [OUT_DIR]     (default: benchmarks)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks}
mkdir -p "$OUT"
python3 - <<'PY'
import torch
assert torch.cuda.is_available(), "gpu-check: no CUDA device is visible (install a CUDA build of torch)"
print("gpu-check:", torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
PY
echo "gpu-check: 1/3 the mode suite on CUDA against the oracle"
python3 -m pytest -q -p no:cacheprovider tests/test_modes_gpu.py
CKPT=${POE_GPU_CHECKPOINT:-/tmp/poe-serve-1.5b}
if [ ! -f "$CKPT/config.json" ]; then
    echo "gpu-check: 2/3 writing the 1.5b preset to $CKPT"
    poe-serve init-checkpoint "$CKPT" --preset 1.5b
fi
echo "gpu-check: 3/3 poe-serve bench, 1.5b, bf16, one GPU"
poe-serve bench --checkpoint "$CKPT" --config cluster_configs/one-gpu.yaml --device cuda --dtype bf16 \
    --sections floor,single_stream,transport,layouts,concurrency --concurrency 1,16,64 --new-tokens 32 \
    --json "$OUT/1.5b-gpu.json"
python3 - "$OUT/1.5b-gpu.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
floor, single = r["floor"]["single_stream_ceiling_tok_s"], r["single_stream"]
print(f"gpu-check: bandwidth floor {r['floor']['memory_bandwidth_gbs']:.0f} GB/s over "
      f"{r['floor']['weight_bytes'] / 2**30:.2f} GiB of weights -> {floor:.0f} tok/s single-stream ceiling")
for who, figures in (("PoEModel", single["poe_model_tok_s"]), ("PoEModel.on_ray", single["poe_cluster_tok_s"])):
    print(f"gpu-check: {who} full {figures['full']:.1f} tok/s = {figures['full'] / floor:.0%} of the floor")
print(f"gpu-check: PoEModel.on_ray over PoEModel, full: {single['cluster_over_model_full']:.2f} (target 0.9)")
for name, lay in r["layouts"]["layouts"].items():
    print(f"gpu-check: layout {name}: host time per token {lay['host_ms_per_token']['decode runs']:.2f} ms with "
          f"decode runs, {lay['host_ms_per_token']['plan every step']:.2f} ms with a plan every step")
for row in r["concurrency"]:
    print(f"gpu-check: {row['concurrency']} concurrent: {row['aggregate_tok_s']:.0f} tok/s, {row['errors']} errors")
PY
