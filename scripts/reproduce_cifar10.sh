#!/usr/bin/env bash
# Every method's CIFAR-10 recipe (configs/<method>.yaml: ResNet-18, CIFAR stem, 1000 epochs, batch 256), then
# knn_eval.py and linear_eval.py on it, and the published numbers beside the measured ones (scripts/reproduce.py).
# Usage: scripts/reproduce_cifar10.sh [--gpus N] [--data DIR] [--out DIR] [--dry-run] [--report] [NAME ...]
set -euo pipefail
exec python "$(dirname "$0")/reproduce.py" cifar10 "$@"
