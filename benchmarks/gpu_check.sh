#!/usr/bin/env bash
# On a CUDA machine, in one go (about 6 minutes on an H200, most of it compiling: torch.compile, autotuned Triton):
# the CUDA tests (fused composition, CUDA-graph decoding, bf16, compile, grouped GEMMs, step checkpointing), then
# gpu_step.py: bf16 / torch.compile parity against fp32 eager, the composition's paths, timed `base` training steps
# at 32768 tokens (plain and with step checkpointing: time, % of the bf16 matmul rate, peak memory), decoding
# throughput at 64 inputs x 8 views (eager, CUDA graphs).
# Prints a compact summary; BENCHMARKS.md's gpu section is written only with --write. Both parts run even if the
# other fails; the exit status is non-zero if either did.
# Usage: bash benchmarks/gpu_check.sh [--write] [gpu_step.py options]   (PY=path/to/python for the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
write=--no-write
args=()
for a in "$@"; do
  if [ "$a" = "--write" ]; then write=; else args+=("$a"); fi
done
"$PY" -c 'import torch; assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device"
print(torch.__version__, torch.cuda.get_device_name())' || exit 2
timeout "${TEST_TIMEOUT:-330}" "$PY" -m pytest -q -rs -m cuda tests -p no:cacheprovider --durations=5
tests=$?
"$PY" benchmarks/gpu_step.py --tokens-per-batch 32768 --reps 3 $write "${args[@]}"
step=$?
echo "gpu_check: tests exit $tests, gpu_step exit $step"
[ "$tests" -eq 0 ] && [ "$step" -eq 0 ]
