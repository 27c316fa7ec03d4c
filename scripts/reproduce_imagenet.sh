#!/usr/bin/env bash
# Every method's ImageNet recipe (configs/<method>_imagenet.yaml: the papers' and official codes' runs), then
# knn_eval.py and linear_eval.py on it, and the published numbers beside the measured ones (scripts/reproduce.py).
# Usage: scripts/reproduce_imagenet.sh --data /path/to/imagenet [--gpus 8] [--out DIR] [--dry-run] [--report] [NAME ...]
set -euo pipefail
exec python "$(dirname "$0")/reproduce.py" imagenet "$@"
