#!/usr/bin/env bash
# On a CUDA machine: the CUDA tests, bf16 / torch.compile parity against fp32 eager, and timed `base` training
# steps (eager and compiled; tokens/s, model FLOP/s as a fraction of the card's measured bf16 matmul rate).
# A few minutes on an H100. Both parts run even if the other fails; the exit status is non-zero if either did.
# Usage: bash benchmarks/gpu_check.sh [gpu_step.py options]   (PY=path/to/python to choose the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c 'import torch; assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device"
print(torch.__version__, torch.cuda.get_device_name())' || exit 2
timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest -q -rs -m cuda tests -p no:cacheprovider
tests=$?
"$PY" benchmarks/gpu_step.py "$@"
step=$?
echo "gpu_check: tests exit $tests, gpu_step exit $step"
[ "$tests" -eq 0 ] && [ "$step" -eq 0 ]
