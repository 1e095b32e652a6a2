#!/usr/bin/env bash
# Installs cnnjax into the current Python: `bash setup.sh` (CPU), `bash setup.sh test` (adds the
# test tools and ONNX export), `bash setup.sh onnx` (ONNX export), `bash setup.sh cuda` (jax with
# its CUDA 12 runtime, for NVIDIA GPUs) or
# `bash setup.sh tpu` (jax with libtpu, on a Cloud TPU VM): the extras of pyproject.toml, so the
# accelerator's jax stays in the project's pinned jax range. On a machine without internet, TFDS
# cannot download Fashion-MNIST: as root with apt, this also installs Debian's copy of the
# original files, which cnnjax finds by itself.
set -euo pipefail
cd "$(dirname "$0")"
# Every mode installs the `prepare` extra (TensorFlow): the first run prepares Fashion-MNIST.
case "${1:-}" in
  "") extras="[prepare]" ;;
  test | cuda | tpu | onnx) extras="[prepare,$1]" ;;
  *) echo "setup.sh: unknown option '$1'; use one of: test, cuda, tpu, onnx" >&2; exit 2 ;;
esac
python -m pip install --quiet --disable-pip-version-check -e ".${extras}"
if [ "${1:-}" = "test" ] || [ "${1:-}" = "onnx" ]; then
  # ONNX export's converter: --no-deps, see the onnx extra in pyproject.toml.
  python -m pip install --quiet --disable-pip-version-check --no-deps "jax2onnx>=0.17.1,<0.18"
fi
if [ "${1:-}" = "test" ]; then
  # tests/test_pretrained.py compares with torchvision's models (CPU torch).
  python -m pip install --quiet "torch==2.13.0" safetensors
  # The index has torchvision only as CUDA builds, whose dependencies would pull a CUDA torch;
  # --no-deps keeps the CPU torch (tests/torchvision_models.py imports it without its ops).
  python -m pip install --quiet --no-deps "torchvision==0.28.0"
fi
if [ "${1:-}" = "cuda" ] || [ "${1:-}" = "tpu" ]; then
  # What JAX will run on; a missing driver or runtime shows here, not in the first training step.
  python -c "import jax; print('setup.sh: jax', jax.__version__, 'on', jax.devices())"
fi
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; } ||
    echo "setup.sh: could not install dataset-fashion-mnist; TFDS will download Fashion-MNIST instead"
fi
# cnnjax/nn/kernels: oneDNN convolutions for CPU (config.conv_backend / CNNJAX_CONV=onednn) need
# Debian's libdnnl-dev and a C++ compiler; without them cnnjax uses XLA's convolutions.
if [ ! -e /usr/include/dnnl.hpp ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq libdnnl-dev >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq libdnnl-dev >/dev/null; } ||
    echo "setup.sh: could not install libdnnl-dev; cnnjax will use XLA's convolutions"
fi
python -m cnnjax.nn.kernels.build >/dev/null ||
  echo "setup.sh: oneDNN convolutions not built; cnnjax will use XLA's convolutions"
