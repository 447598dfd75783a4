#!/usr/bin/env bash
# Tune tpfuse's thresholds on this machine: launch/tune.sh [-n NPROC] [bench/tune.py options...]
# Example: launch/tune.sh -n 2 --hidden 4096,8192 --dtype bf16 --write-default
# --help prints the tuner's options; the options are checked once, before any rank starts.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
n=()
if [[ "${1:-}" == "-n" ]]; then n=(-n "$2"); shift 2; fi
for a in "$@"; do
  if [[ "$a" == "-h" || "$a" == "--help" ]]; then exec python3 "$here/../bench/tune.py" --help; fi
done
python3 "$here/../bench/tune.py" --check-args "$@"  # one error line and exit 2 on a bad option, no ranks started
exec "$here/run.sh" "${n[@]}" "$here/../bench/tune.py" "$@"
