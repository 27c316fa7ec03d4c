#!/usr/bin/env bash
# Does a method learn on real images within a CPU budget? Pre-trains METHOD on a 10k-image subset of the
# JPEG CIFAR-10 copy (../shared/data), then compares its kNN top-1 (k 200, T 0.1, the 45k train images as the
# bank, the 5k val images as queries) with the same kNN on a randomly initialised trunk: the floor.
# The setting mirrors the peer measurement in ../shared/reference/methods.md (ResNet-18 with the ImageNet stem
# at 32 px, batch 256, SGD, bf16; precision auto computes in fp32 on a CPU without native bf16): a correct
# contrastive method clears the floor within ~800 steps.
# Usage: scripts/cifar10_short_budget.sh [METHOD [EPOCHS [extra training flags...]]]
# (add --knn_every N --knn_temperature 0.1 to follow the same kNN every N epochs while it trains)
set -euo pipefail
cd "$(dirname "$0")/.."
method=${1:-simclr}; epochs=${2:-20}; shift $(( $# > 2 ? 2 : $# ))
data=${DATA:-/tmp/cifar10-jpeg}
out=${OUT_DIR:-runs/short_budget_$method}
knn="--dataset folder --data_dir $data --k 200 --temperature 0.1 --num_workers 2"
[ -d "$data/train" ] || tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C "$(dirname "$data")"
floor=${FLOOR_DIR:-runs/short_budget_floor}  # the random-init floor, computed once and shared by all methods
if [ ! -f "$floor/random_init_knn_folder.json" ]; then
  python - "$floor" <<'PY'
import os, sys, torch
from common.backbones import backbone_args, build_backbone
torch.manual_seed(0)
os.makedirs(sys.argv[1], exist_ok=True)
trunk, _ = build_backbone(**backbone_args("resnet18", 32, "false"))
torch.save(trunk.state_dict(), os.path.join(sys.argv[1], "random_init.pt"))
PY
  python knn_eval.py --checkpoint "$floor/random_init.pt" --arch resnet18 --image_size 32 --cifar_stem false $knn
fi
python "$method.py" --dataset folder --data_dir "$data" --subset 10000 --epochs "$epochs" --batch_size 256 \
  --cifar_stem false --num_workers 2 --out_dir "$out/train" "$@"
python knn_eval.py --checkpoint "$out/train/last.pt" $knn
python - "$floor" "$out" <<'PY'
import glob, json, sys
floor, run = sys.argv[1:]
for f in sorted(glob.glob(f"{floor}/*knn*.json")) + sorted(glob.glob(f"{run}/**/*knn*.json", recursive=True)):
    r = json.load(open(f))
    print(f"{f}: kNN top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  (k {r['k']}, T {r['temperature']})")
curve = [json.loads(line) for line in open(f"{run}/train/metrics.jsonl")]  # the --knn_every monitor, if on
curve = [f"epoch {m['epoch']}: {m['eval/knn_top1']:.2f}%" for m in curve if "eval/knn_top1" in m]
if curve:
    print("kNN monitor during training (top-1): " + ", ".join(curve))
PY
