#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool; ../shared/GPU.md): `make gpu-prep` here
# first, then run this with carry [".whl", ".gpu"]. It installs the wheels the machine lacks,
# runs the gpu and kernel tests compiled for the device, then bench_gpu.py (issue 15's figures).
# Logs and JSON go to $OUT (or out/device). Sections can be picked: ONLY="qk memory".
set -u
out=${OUT:-out/device}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target .gpusite .whl/*.whl || exit 1
export PYTHONPATH=$PWD/.gpusite:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
timeout "${T_TEST:-170}" python3 -m pytest tests/test_gpu.py tests/test_kernels.py -q -p no:cacheprovider -rf 2>&1 \
  | tee "$out/pytest_gpu.log" | tail -40
timeout "${T_BENCH:-300}" python3 experiments/bench/bench_gpu.py --tokenizer .gpu/tok --json "$out/bench_gpu.json" \
  ${ONLY:+--only $ONLY} 2>&1 | grep -v "it/s" | tee "$out/bench_gpu.log"
