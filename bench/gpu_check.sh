#!/usr/bin/env bash
# The one-shot GPU check (bench/gpu_check.py; how to call it: bench/GPU_RUNBOOK.md).
#   bench/gpu_check.sh [--dry-run] [--parts cuda-tests,headline,...] [--budget SECONDS] [--out DIR]
# On the device: installs the carried wheels (.whl/, from ../shared/tools/device-wheels.sh) into
# /tmp/site first. Results: DIR/gpu-check.tgz (DIR defaults to $OUT), the log on stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
if [[ " $* " != *" --dry-run "* ]] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing the carried wheels failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
exec "$PYTHON" -m bench.gpu_check "$@"
