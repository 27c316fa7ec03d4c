"""Plots training runs' metrics.jsonl against the step, as one PNG.

    python tools/plot_metrics.py RUN_DIR [RUN_DIR ...] [--out PNG]

One panel per curve, each run in its own colour: the loss, the learning rate, the schedules the method has
(`schedule/*`: the EMA rate m, the teacher temperature, the weight decay), its collapse signals and other
per-step monitors (every other `train/*` scalar: code entropy and prototypes used, teacher entropy and KL, z std,
nearest-neighbour accuracy, the gradient norm, the online probe's training loss and accuracy), the images per
second of each epoch, and the online kNN and probe accuracies (`eval/knn_top1` from --knn_every, `eval/probe_top1`
from --probe_every). A resumed run's log repeats the steps after its last checkpoint: the later
value of a step is kept. One run: RUN_DIR/metrics.png by default; several: ./metrics.png.

matplotlib is an optional dependency (requirements-dev.txt); the training scripts never need it.
"""
import argparse
import json
import math
import os
import sys


def read_metrics(path):
    """{key: ([steps], [values])} of a metrics.jsonl file (or a run folder holding one); per-epoch averages
    (`train/epoch_*`) are left out, as the per-step curves show them."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no metrics.jsonl at {path!r}; pass a run folder (a script's --out_dir)")
    curves = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if line.endswith("\n"):  # a torn last line (the run was killed mid-write) is skipped silently
                    print(f"warning: {path}:{n} is not JSON; skipped", file=sys.stderr)
                continue
            if "event" in record or "step" not in record:
                continue
            for key, value in record.items():
                if key in ("step", "epoch", "time") or key.startswith("train/epoch_"):
                    continue
                if isinstance(value, (int, float)) and math.isfinite(value):
                    curves.setdefault(key, {})[record["step"]] = value  # a later line of a step wins
    if not curves:
        raise SystemExit(f"error: {path!r} holds no metrics yet (the first are written after log_every steps)")
    return {key: (sorted(points), [points[s] for s in sorted(points)]) for key, points in curves.items()}


PANELS = {"train/loss": "loss", "train/lr": "learning rate", "eval/knn_top1": "online kNN top-1 (%)",
          "eval/probe_top1": "online linear probe top-1 (%)", "train/images_per_s": "images / s (each epoch)"}


def panel_order(keys):
    """The loss and the lr first, then schedules, monitors, throughput and the kNN and probe accuracies."""
    def rank(key):
        if key in ("train/loss", "train/lr"):
            return (0, key != "train/loss", key)
        if key.startswith("schedule/"):
            return (1, 0, key)
        if key.startswith("eval/"):
            return (4, 0, key)
        if key == "train/images_per_s":
            return (3, 0, key)
        return (2, 0, key)
    return sorted((k for k in keys if k not in ("eval/knn_top5", "eval/probe_top5")), key=rank)


def plot(runs, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib, an optional dependency: pip install matplotlib") from None
    keys = panel_order({key for curves in runs.values() for key in curves})
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for colour, (name, curves) in enumerate(runs.items()):
            if key in curves:
                steps, values = curves[key]
                marker = "o" if key.startswith("eval/") or key == "train/images_per_s" else None
                ax.plot(steps, values, color=f"C{colour}", marker=marker, markersize=4, linewidth=1.2, label=name)
        ax.set_title(PANELS.get(key, key), fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (a script's --out_dir) or metrics.jsonl files")
    parser.add_argument("--out", help="the PNG to write (default: RUN_DIR/metrics.png for one run, else "
                                      "./metrics.png)")
    args = parser.parse_args(argv)
    runs = {}
    for path in args.runs:
        name = os.path.normpath(path)
        runs[name if name not in runs else f"{name} ({len(runs)})"] = read_metrics(path)
    first = args.runs[0] if os.path.isdir(args.runs[0]) else os.path.dirname(args.runs[0])
    out = args.out or (os.path.join(first, "metrics.png") if len(runs) == 1 else "metrics.png")
    plot(runs, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
