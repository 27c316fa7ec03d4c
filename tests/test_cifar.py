"""Real CIFAR-10 images (the JPEG copy in ../shared/data): the folder reader and knn_eval run on them."""
import json
import tarfile

import pytest
import torch

from common.backbones import backbone_args, build_backbone
from common.data import build_dataset, labels_of
from helpers import REPO, run_script

ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    if not ARCHIVE.exists():
        pytest.skip(f"{ARCHIVE} is not here: the real-data tests need the shared CIFAR-10 JPEG archive")
    out = tmp_path_factory.mktemp("cifar")
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(out, filter="data")
    return out / "cifar10-jpeg"


def test_folder_reads_the_jpeg_tree(cifar_dir):
    train, val = build_dataset("folder", str(cifar_dir), "train"), build_dataset("folder", str(cifar_dir), "val")
    assert (len(train), len(val)) == (45000, 5000)
    assert train.classes == CLASSES
    labels = labels_of(val)
    assert all(labels.count(c) == 500 for c in range(10))
    image, label = val[0]
    assert image.size == (32, 32) and image.mode == "RGB" and label == 0


def test_knn_eval_on_real_images(cifar_dir, tmp_path):
    """A random-init ResNet-18 trunk, evaluated as a plain state_dict: random conv features already beat
    chance (10%) clearly on CIFAR-10, which only holds if images, labels and the kNN vote line up."""
    torch.manual_seed(0)
    trunk, _ = build_backbone(**backbone_args("resnet18", 32, "true"))
    weights = tmp_path / "random_resnet18.pt"
    torch.save(trunk.state_dict(), weights)
    result = run_script(["knn_eval.py", "--checkpoint", weights, "--arch", "resnet18", "--image_size", "32",
                         "--cifar_stem", "true", "--dataset", "folder", "--data_dir", cifar_dir,
                         "--train_subset", "2000", "--val_subset", "500", "--num_workers", "0"])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(next(tmp_path.glob("*knn*.json")).read_text())
    assert 15 < metrics["top1"] < 60 and metrics["top5"] > metrics["top1"]
