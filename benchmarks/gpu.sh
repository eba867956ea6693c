#!/usr/bin/env bash
# GPU checks of issue 4, in one run: the CUDA tests, then B1 and B3 on the GPU, normflux
# against zuko, eager and under torch.compile.
#
#   bash benchmarks/gpu.sh [OUTDIR]       (default: gpu-results/)
#
# Needs python3 with a CUDA build of torch, pytest and zuko 1.6.0 (`pip install -e
# '.[test,bench]'` gives all but torch's CUDA build). Each stage has its own time limit
# (GPU_TEST_S, GPU_EAGER_S, GPU_COMPILE_S seconds) so that a slow stage cannot starve the
# others (GPU_COMPILE_ONLY picks the compiled benchmarks); logs and results.md sections
# land in OUTDIR.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $py -c 'import torch, zuko; print("torch", torch.__version__, "cuda", torch.version.cuda, "zuko", zuko.__version__)'
} 2>&1 | tee "$out/env.log"
status=0
timeout "${GPU_TEST_S:-150}" $py -m pytest -q -p no:cacheprovider tests/test_cuda.py --runslow \
  -n 4 2>&1 | tee "$out/tests.log" || status=1
timeout "${GPU_EAGER_S:-200}" $py benchmarks/suite.py --device cuda --only B1,B3 --libs zuko \
  --out "$out/results.md" 2>&1 | tee "$out/eager.log" || status=1
timeout "${GPU_COMPILE_S:-300}" $py benchmarks/suite.py --device cuda --compile \
  --only "${GPU_COMPILE_ONLY:-B1,B3}" \
  --libs zuko --samples 10 --out "$out/results.md" 2>&1 | tee "$out/compile.log" || status=1
exit $status
