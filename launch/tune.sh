#!/usr/bin/env bash
# Tune tpfuse's thresholds on this machine: launch/tune.sh [-n NPROC] [bench/tune.py options...]
# Example: launch/tune.sh -n 2 --hidden 4096,8192 --dtype bf16 --write-default
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
n=()
if [[ "${1:-}" == "-n" ]]; then n=(-n "$2"); shift 2; fi
exec "$here/run.sh" "${n[@]}" "$here/../bench/tune.py" "$@"
