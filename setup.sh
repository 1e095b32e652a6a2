#!/usr/bin/env bash
# Installs cnnjax into the current Python (`bash setup.sh test` adds the test tools). On a machine
# without internet, TFDS cannot download Fashion-MNIST: as root with apt, this also installs
# Debian's copy of the original files, which cnnjax finds by itself.
set -euo pipefail
cd "$(dirname "$0")"
extras=""
if [ "${1:-}" = "test" ]; then extras="[test]"; fi
python -m pip install --quiet --disable-pip-version-check -e ".${extras}"
if [ "${1:-}" = "test" ]; then
  # tests/test_pretrained.py compares with torchvision's models (CPU torch).
  python -m pip install --quiet "torch==2.13.0" safetensors
  # The index has torchvision only as CUDA builds, whose dependencies would pull a CUDA torch;
  # --no-deps keeps the CPU torch (tests/torchvision_models.py imports it without its ops).
  python -m pip install --quiet --no-deps "torchvision==0.28.0"
fi
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; } ||
    echo "setup.sh: could not install dataset-fashion-mnist; TFDS will download Fashion-MNIST instead"
fi
