#!/usr/bin/env bash
# Fill .device-data/ (git-ignored) with what benchmarks/gpu_suite.py needs on a lent GPU machine,
# which reaches no network: the Fashion-MNIST files and the pure-Python wheels its image lacks
# (pytest for the CUDA tests, lightly for peer_lightly.py). About 33 MB; the run tool carries 64 MiB.
#
#     bash benchmarks/prepare_device_data.sh [FASHION_MNIST_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:-/usr/share/datasets/fashion-mnist}"
mkdir -p .device-data/fashion-mnist .device-data/wheels
cp "$src"/train-images-idx3-ubyte.gz "$src"/train-labels-idx1-ubyte.gz \
   "$src"/t10k-images-idx3-ubyte.gz "$src"/t10k-labels-idx1-ubyte.gz .device-data/fashion-mnist/
# exceptiongroup and tomli: pytest's needs on a Python older than 3.11
# --platform any: pure-Python wheels only, whatever Python the lent machine runs
python3 -m pip download -q --no-deps --only-binary=:all: --platform any --python-version 3.10 \
    --implementation py -d .device-data/wheels pytest pluggy iniconfig pygments \
    exceptiongroup tomli "lightly==1.6.0" lightning_utilities
du -sh .device-data
