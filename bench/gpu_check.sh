#!/usr/bin/env bash
# The device check: the SFT, IRM, PRM and GRPO trainers for a few steps on CUDA in mixed
# precision, then IRM and PRM scoring on the GPU (bench/gpu_check.py), in under 10 minutes on one
# H200 whose image has torch and transformers but no network.
#
#   bench/gpu_check.sh [--device cpu] [gpu_check.py options]   # install what is carried, check
#   bench/gpu_check.sh install                                  # only install what is carried
#   bench/gpu_check.sh missing                                  # the packages the image lacks
#
# The other packages travel as wheels: `make gpu-wheels` (here, GPU_PYTHON=3.12 or 3.11, the
# device's Python) writes them to .gpu-check/wheels/part1, part2, part3 (each under 56 MiB; a
# run carries at most 64 MiB with the tree). On a warm machine, one run per part, back to back:
#   run(carry=[".gpu-check/wheels/part1"], command="bench/gpu_check.sh install")
#   run(carry=[".gpu-check/wheels/part2"], command="bench/gpu_check.sh install")
#   run(carry=[".gpu-check/wheels/part3"], command="bench/gpu_check.sh")
# They install into .gpu-check/site-packages (ignored, kept between runs on the same machine)
# only the packages the image lacks; a part whose packages the image has need not travel
# (`bench/gpu_check.sh missing`). Exit 0 and "gpu_check OK", or non-zero and one line
# "gpu_check FAILED: <reason>". PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
SITE=".gpu-check/site-packages"  # the name matters: see SITE in bench/gpu_wheels.py
export PYTHONPATH="$PWD/$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
case "${1:-}" in
  install) shift; exec "$PY" bench/gpu_wheels.py install "$@" ;;
  missing) shift; exec "$PY" bench/gpu_wheels.py missing "$@" ;;
esac
if ! "$PY" bench/gpu_wheels.py install -q; then
  echo "gpu_check FAILED: installing the carried wheels (.gpu-check/wheels/part*)"
  exit 1
fi
LIMIT="${GPU_CHECK_TIMEOUT:-540}"
timeout "$LIMIT" "$PY" bench/gpu_check.py "$@"
rc=$?
if [ "$rc" = 124 ]; then
  echo "gpu_check FAILED: timed out after ${LIMIT} s"
fi
exit "$rc"
