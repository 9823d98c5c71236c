#!/usr/bin/env bash
# A bounded soak (not CI): mixed modes through gRPC and HTTP while stage workers are killed and,
# with --nodes N, nodes of a simulated N-node Ray cluster removed; every answer checked against
# the in-process model. Flags: python -m tools.soak --help. Exits 1 if any answer was wrong.
#   scripts/soak.sh --duration 300 --fault-every 15
#   scripts/soak.sh --duration 300 --fault-every 15 --nodes 4 --transport dist
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m tools.soak "$@"
