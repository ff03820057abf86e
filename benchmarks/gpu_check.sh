#!/usr/bin/env bash
# On a CUDA machine: the CUDA tests, bf16 / torch.compile parity against fp32 eager, and a timed `base` training
# step (tokens/s, model FLOP/s as a fraction of the card's measured bf16 matmul rate). Well under 10 minutes on
# an H100. Usage: bash benchmarks/gpu_check.sh   (PY=path/to/python to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device"
print(torch.__version__, torch.cuda.get_device_name())
PYEOF
"$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider
"$PY" benchmarks/gpu_step.py
