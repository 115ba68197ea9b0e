"""Plot the history of one or more runs (their metrics.jsonl) against the step, overlaid.

    .venv/bin/python src/plot_run.py runs/demo                          # writes runs/demo/metrics.png
    .venv/bin/python src/plot_run.py runs/a runs/b --out compare.png    # several runs, one colour each

Panels: training loss (and the validation loss, dashed), validation loss by t (one line per fixed
t, coloured from small to large t), learning rate, and one panel per evaluation metric (any `eval/*` key, e.g.
eval/fid, eval/clip_score). A RUN is a run directory or a metrics.jsonl file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sd3.train.metrics import HISTORY, read_history


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one key, skipping records without it and null (non-finite) values."""
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def history_path(run: str) -> Path:
    path = Path(run)
    if path.is_dir():
        path = path / HISTORY
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no {HISTORY} here; give a run directory written by src/train.py "
                                "(or its metrics.jsonl)")
    return path


def plot(runs: dict[str, list[dict]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = {k for records in runs.values() for r in records for k in r}
    t_keys = sorted((k for k in keys if k.startswith("val/loss_t")), key=lambda k: float(k[len("val/loss_t"):]))
    eval_keys = sorted(k for k in keys if k.startswith("eval/"))
    panels = ["loss", *(["val_t"] if t_keys else []), "lr", *eval_keys]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shade = plt.get_cmap("viridis")
    for ax, panel in zip(axes.flat, panels):
        for i, (name, records) in enumerate(runs.items()):
            c = colours[i % len(colours)]
            label = name if len(runs) > 1 else None
            if panel == "loss":
                ax.plot(*series(records, "loss"), color=c, label=f"{name} train" if label else "train")
                steps, vals = series(records, "val/loss")
                if steps:
                    ax.plot(steps, vals, "--o", color=c, markersize=3, label=f"{name} validation" if label
                            else "validation")
                ax.set_title("loss")
            elif panel == "val_t":
                style = ("-", "--", ":", "-.")[i % 4]
                for j, k in enumerate(t_keys):
                    steps, vals = series(records, k)
                    ax.plot(steps, vals, style, marker=".", markersize=3, color=shade(j / max(1, len(t_keys) - 1)),
                            label=f"t={k[len('val/loss_t'):]}" if i == 0 else None)
                ax.set_title("validation loss by t" + (" (line style: run)" if len(runs) > 1 else ""))
            elif panel == "lr":
                ax.plot(*series(records, "lr"), color=c, label=label)
                ax.set_title("learning rate")
            else:
                ax.plot(*series(records, panel), "-o", color=c, markersize=3, label=label)
                ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directory (or its metrics.jsonl)")
    parser.add_argument("--out", help="PNG to write (default: RUN/metrics.png for one run, runs.png for several)")
    args = parser.parse_args(argv)
    try:
        paths = [history_path(r) for r in args.runs]
    except FileNotFoundError as error:
        parser.exit(2, f"plot_run: {error}\n")
    runs = {}
    for run, path in zip(args.runs, paths):
        name = path.parent.name if path.name == HISTORY else path.stem
        runs[name if name not in runs else run] = read_history(path)
    if not any(runs.values()):
        parser.exit(2, f"plot_run: {', '.join(map(str, paths))} hold no records yet; wait for the first log step\n")
    out = Path(args.out) if args.out else (paths[0].parent / "metrics.png" if len(paths) == 1 else Path("runs.png"))
    plot(runs, out)
    print(f"wrote {out} ({', '.join(f'{n}: {len(r)} records' for n, r in runs.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
