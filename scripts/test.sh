#!/usr/bin/env bash
# Set up and run the whole qnopt test suite on a fresh machine (Python >= 3.11, pip, root).
# Installs Debian's Fashion-MNIST package (used by the data tests and the benchmark) and the
# package with its test extras, then runs pytest. Extra arguments go to pytest. --dist loadgroup
# keeps each common-matrix row on one worker, where its checks share one compiled step.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: Fashion-MNIST not installed (apt-get install dataset-fashion-mnist); its tests will be skipped" >&2
  fi
fi

python -m pip install -q -e ".[test,bench]"
python -m pytest -q -n 2 --dist loadgroup "$@"
