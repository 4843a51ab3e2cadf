#!/usr/bin/env bash
# The GPU checks in one go, for a machine with CUDA: the GPU tests (CPU-path equality), then the
# training-step, reader, harvest (contexts 128 and 1024) and evaluation (K = 1 and 3 LM splices)
# benchmarks on the device, and the reader on all host cores. Logs go to $OUT (default: the current
# directory). About 5 minutes on an H200 before the harvest's second context and the evaluation table.
set -uo pipefail
out=${OUT:-.}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_objectives.py 2>&1 | tee "$out/gpu_tests.log"
python benchmarks/train.py --device cuda 2>&1 | tee "$out/train_cuda.log"
python benchmarks/reader.py --device cuda --chunks 400 --switch-interval 0,0.0002 2>&1 | tee "$out/reader_cuda.log"
python benchmarks/reader.py 2>&1 | tee "$out/reader_cpu.log"
python benchmarks/harvest.py --device cuda --tokens 1M --context 128,1024 --batch-tokens 65536 2>&1 | tee "$out/harvest_cuda.log"
python benchmarks/evaluate.py --only lm --device cuda 2>&1 | tee "$out/evaluate_lm_cuda.log"
