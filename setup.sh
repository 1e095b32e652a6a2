#!/usr/bin/env bash
# Installs cnnjax into the current Python (`bash setup.sh test` adds the test tools). On a machine
# without internet, TFDS cannot download Fashion-MNIST: as root with apt, this also installs
# Debian's copy of the original files, which cnnjax finds by itself.
set -euo pipefail
cd "$(dirname "$0")"
extras=""
if [ "${1:-}" = "test" ]; then extras="[test]"; fi
python -m pip install --quiet --disable-pip-version-check -e ".${extras}"
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; } ||
    echo "setup.sh: could not install dataset-fashion-mnist; TFDS will download Fashion-MNIST instead"
fi
