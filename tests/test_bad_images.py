"""An unreadable image of a folder data set: named by its path and stopped at (bad_images=stop), or replaced by
the next readable image with a warning (bad_images=skip); in the process, in DataLoader workers and end to end."""
import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from battery import quick_args
from helpers import assert_ok, assert_one_line_error, run_script

from common.config import UsageError, usage_errors
from common.data import build_dataset, labelled_split, labels_of


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """train/{a,b}/ with 7 good images and 1 bad one each (16: two full batches of 8, so every file is read in an
    epoch), val/{a,b}/ with 3 good ones each. train/a/broken.png is garbage, train/b/truncated.png half a PNG."""
    root = tmp_path_factory.mktemp("tree")
    for split, n in (("train", 7), ("val", 3)):
        for c, cls in enumerate("ab"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (100 * c, 30 * i, 0)).save(root / split / cls / f"{i}.png")
    (root / "train" / "a" / "broken.png").write_bytes(b"not an image " * 8)
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "whole.png")
    png = (root / "whole.png").read_bytes()
    (root / "whole.png").unlink()
    (root / "train" / "b" / "truncated.png").write_bytes(png[: len(png) // 2])
    return root


def _index(data, name):
    return [path for path, _ in data.samples].index(name)


def test_stop_names_the_file_and_labels_need_no_decoding(tree):
    data = build_dataset("folder", str(tree), "train", bad_images="stop")
    assert labels_of(data) == [0] * 8 + [1] * 8 and data.classes == ["a", "b"]  # no image decoded
    assert data[0][0].size == (8, 8)
    for name, reason in (("a/broken.png", "not an image PIL can identify"), ("b/truncated.png", "truncated")):
        path = str(tree / "train" / name)
        with pytest.raises(UsageError, match="cannot read image") as e:
            data[_index(data, path)]
        message = str(e.value)
        assert path in message and reason in message and "--bad_images skip" in message and "\n" not in message
    assert labels_of(labelled_split("folder", str(tree), "val", bad_images="skip")) == [0, 0, 0, 1, 1, 1]
    for name in ("synthetic", "folder"):
        with pytest.raises(UsageError, match="bad_images must be stop or skip, got 'ignore'"):
            build_dataset(name, str(tree), "train", bad_images="ignore")


def test_skip_gives_the_next_image_with_its_label(tree, capsys):
    data = build_dataset("folder", str(tree), "train", bad_images="skip")
    broken, truncated = str(tree / "train" / "a" / "broken.png"), str(tree / "train" / "b" / "truncated.png")
    i, j = _index(data, broken), _index(data, truncated)
    assert (i, j) == (7, 15)
    image, label = data[i]  # the next image, b/0.png, with ITS label
    assert label == 1 and image.tobytes() == data[8][0].tobytes()
    image, label = data[j]  # the last one: wraps around to a/0.png
    assert label == 0 and image.tobytes() == data[0][0].tobytes()
    data[i]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: unreadable image {broken} (not an image PIL can identify); using the next image "
                        "instead", f"warning: unreadable image {truncated} (image file is truncated); using the "
                        "next image instead"]  # once per path


@pytest.mark.quick
def test_no_readable_image_at_all_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    for i in range(3):
        (tmp_path / "photos" / f"{i}.jpg").write_bytes(b"\xff\xd8 no jpeg")
    data = build_dataset("folder", str(tmp_path / "photos"), "pretrain", bad_images="skip")
    with pytest.raises(UsageError, match="none of the 3 images under .*photos.* can be read"):
        data[1]
    assert capsys.readouterr().err.count("warning: unreadable image") == 3


def test_a_worker_error_reaches_the_user_as_its_one_line(tree):
    """torch re-raises a worker's UsageError with the worker's traceback as its message; usage_errors() prints
    only the original message."""
    data = build_dataset("folder", str(tree), "train")
    loader = DataLoader(data, batch_size=4, num_workers=1, collate_fn=lambda batch: batch)
    with pytest.raises(SystemExit) as e, usage_errors():
        list(loader)
    message = str(e.value.code)
    assert message.startswith("error: cannot read image ") and str(tree / "train" / "a" / "broken.png") in message
    assert "\n" not in message and "Traceback" not in message


def _run(tmp_path, tree, *extra):
    # a short timeout: a worker's error once left the run hanging at exit (see common.data._kill_data_workers)
    return run_script(quick_args("simclr", tmp_path / "run", "--dataset", "folder", "--data_dir", tree,
                                 "--batch_size", "8", "--num_workers", "2", "--knn_every", "0", *extra, epochs=1),
                      timeout=120)


@pytest.mark.quick
def test_simclr_stops_on_a_bad_image_in_one_line(tmp_path, tree):
    """The image is read in a DataLoader worker: one `error:` line, no worker traceback, and the run ends."""
    result = _run(tmp_path, tree)
    assert_one_line_error(result, "cannot read image ")
    assert "Original Traceback" not in result.stderr and "--bad_images skip" in result.stderr
    assert "broken.png" in result.stderr or "truncated.png" in result.stderr


@pytest.mark.parametrize("views", ["workers", "batched"])
def test_simclr_and_knn_eval_skip_bad_images_with_a_warning(tmp_path, tree, views):
    """A run with --bad_images skip trains; knn_eval.py on its checkpoint (the same folder) stops or skips too.
    With views: batched, the loader workers read the files and decode those that are not JPEGs (all here)."""
    broken, truncated = tree / "train" / "a" / "broken.png", tree / "train" / "b" / "truncated.png"
    result = _run(tmp_path, tree, "--bad_images", "skip", "--views", views)
    assert_ok(result)
    assert f"plot them with python tools/plot_metrics.py {tmp_path / 'run'}" in result.stdout  # the run's last line
    for path in (broken, truncated):
        assert f"warning: unreadable image {path} (" in result.stderr
    knn = ["knn_eval.py", "--checkpoint", tmp_path / "run" / "last.pt", "--num_workers", "2",
           "--out", tmp_path / "knn.json"]
    assert_one_line_error(run_script(knn, timeout=120), f"cannot read image {broken}")
    result = run_script([*knn, "--bad_images", "skip"], timeout=120)
    assert_ok(result)
    assert f"warning: unreadable image {broken} (" in result.stderr and (tmp_path / "knn.json").exists()


def test_a_storage_error_stops_even_with_skip(tree, monkeypatch):
    """An I/O error (a failing disk, a stale network handle) is not the image's fault: skipping it would make
    the run depend on the storage, so it stops in both modes."""
    import errno
    import os
    data = build_dataset("folder", str(tree), "train", bad_images="skip")

    def io_error(path):
        raise OSError(errno.EIO, os.strerror(errno.EIO), path)

    monkeypatch.setattr(data.dataset, "loader", io_error)
    with pytest.raises(UsageError, match=r"cannot read image .*0\.png \(Input/output error\): the storage failed, "
                                         "not the image"):
        data[0]
