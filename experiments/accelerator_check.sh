#!/usr/bin/env bash
# The prepared accelerator check (see experiments/accelerator_check.py): device-independent
# tests, a cifar10_fast-style run on synthetic data, and ResNet-50 bf16 training images/s
# beside PyTorch AMP. No network, TensorFlow or TFDS needed; under 8 minutes on one GPU.
# Figures go to stdout and, when $OUT is set, to $OUT/accelerator_check.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
log="${OUT:-/tmp}/accelerator_check.txt"
{
  python -c "import jax; print('jax', jax.__version__, jax.devices())"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
  timeout 180 python experiments/accelerator_check.py tests
  timeout 150 python experiments/accelerator_check.py fast --epochs 10
  timeout 120 python experiments/accelerator_check.py resnet50 --steps 30 --peers torch
} 2>&1 | tee "$log"
