"""Loss curves of training runs, read from their TensorBoard event files or a nanoGPT log, and their
picture: what scripts/plot_runs.py and dev/record.py draw. matplotlib is imported only to draw
(requirements-dev.txt); training never imports this module.
"""

from __future__ import annotations

import glob
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import UserError

EVENTS = "events.out.tfevents.*"
NANOGPT_EVAL = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
NANOGPT_ITER = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms")


@dataclass
class Curve:
    """One run's losses: (step, seconds of training, loss) per point."""
    name: str
    train: list[tuple[int, float, float]] = field(default_factory=list)
    val: list[tuple[int, float, float]] = field(default_factory=list)


def seconds_at(steps: list[int], known: list[tuple[int, float]]) -> list[float]:
    """Seconds of training at each step, interpolated between the steps where they were logged."""
    import numpy as np

    xs, ys = zip(*([(0, 0.0)] + sorted(known)))
    return np.interp(steps, xs, ys).tolist()


def read_tensorboard(run_dir: Path, name: str) -> Curve:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    events = {tag: acc.Scalars(tag) for tag in ("train/loss", "val/loss", "train/seconds") if tag in tags}
    if "train/seconds" in events:
        known = [(e.step, e.value) for e in events["train/seconds"]]
    else:  # runs from before train/seconds was logged: wall time since the first event
        first = min(e.wall_time for es in events.values() for e in es) if events else 0.0
        known = [(e.step, e.wall_time - first) for e in events.get("train/loss", [])]
    curve = Curve(name)
    for tag, points in (("train/loss", curve.train), ("val/loss", curve.val)):
        es = events.get(tag, [])
        points.extend(zip([e.step for e in es], seconds_at([e.step for e in es], known), [e.value for e in es]))
    if not curve.train and not curve.val:
        raise UserError(f"{run_dir} holds event files but no train/loss or val/loss scalars")
    return curve


def read_nanogpt_log(path: Path, name: str) -> Curve:
    """nanoGPT's printed evaluations; time = the sum of the iterations' times before each one, leaving
    out the iterations that evaluated (their time includes it), as train/seconds leaves it out."""
    curve, elapsed, seconds = Curve(name), 0.0, {}
    for line in path.read_text(errors="replace").splitlines():
        if m := NANOGPT_ITER.match(line):
            if not curve.val or curve.val[-1][0] != int(m[1]):
                elapsed += float(m[2]) / 1000
            seconds[int(m[1]) + 1] = elapsed  # the evaluation printed at step N runs after iterations 0..N-1
        elif m := NANOGPT_EVAL.match(line):
            step = int(m[1])
            curve.train.append((step, step, float(m[2])))  # seconds filled in below, once all are read
            curve.val.append((step, step, float(m[3])))
    if not curve.val:
        raise UserError(f"{path} is neither a folder with TensorBoard event files nor a nanoGPT log "
                        f"(no 'step N: train loss X, val loss Y' lines)")
    secs = seconds_at([s for s, _, _ in curve.val], list(seconds.items()))
    curve.train = [(s, t, loss) for (s, _, loss), t in zip(curve.train, secs)]
    curve.val = [(s, t, loss) for (s, _, loss), t in zip(curve.val, secs)]
    return curve


def run_paths(spec: str) -> tuple[str, list[Path]]:
    """(label or "", the paths) of one [LABEL=]folder, glob or nanoGPT log argument."""
    label, eq, target = spec.partition("=")
    if not eq or not label or "/" in label:
        label, target = "", spec
    return label, [Path(p) for p in sorted(glob.glob(target))] if glob.has_magic(target) else [Path(target)]


def read_runs(spec: str) -> list[Curve]:
    """The runs one command-line argument names: [LABEL=]folder, glob or nanoGPT log."""
    label, paths = run_paths(spec)
    target = spec[len(label) + 1:] if label else spec
    if not paths or not any(p.exists() for p in paths):
        raise UserError(f"{target} does not exist (pass a run's log folder, logging.dir, or a nanoGPT log)")
    curves = []
    for path in paths:
        if path.is_file():
            curves.append(read_nanogpt_log(path, label or path.stem))
            continue
        runs = sorted({f.parent for f in path.rglob(EVENTS)})
        if not runs:
            raise UserError(f"no TensorBoard event files ({EVENTS}) under {path}; pass a run's log folder "
                            f"(logging.dir) or its tensorboard/RUN folder")
        for run in runs:
            name = run.name if not label else label if len(runs) == 1 else f"{label}/{run.name}"
            curves.append(read_tensorboard(run, name))
    return curves


def plot(curves: list[Curve], x: str, out: Path, title: str, ymax: float | None, width: float,
         height: float, dpi: int) -> list[Path]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install -r requirements-dev.txt "
                        "(or pip install matplotlib)") from None

    axes_x = ["step", "time"] if x == "both" else [x]
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, len(axes_x), sharey=True, squeeze=False)[0]
    colors = [f"C{i}" for i in range(10)]
    for ax, kind in zip(axes, axes_x):
        col = 0 if kind == "step" else 1
        for curve, color in zip(curves, colors * (len(curves) // 10 + 1)):
            for points, style, what in ((curve.train, "--", "train"), (curve.val, "-", "val")):
                if points:
                    ax.plot([p[col] for p in points], [p[2] for p in points], style, color=color,
                            marker="o" if what == "val" else None, markersize=3, linewidth=1.5 if what == "val" else 1,
                            label=f"{curve.name} {what}")
        ax.set_xlabel("optimizer step" if kind == "step" else "seconds of training")
        ax.grid(alpha=0.3)
        if ymax is not None:
            ax.set_ylim(top=ymax)
    axes[0].set_ylabel("loss (nats per byte)")
    axes[0].legend(fontsize="small")
    axes[-1].secondary_yaxis("right", functions=(lambda v: v / math.log(2), lambda v: v * math.log(2))) \
        .set_ylabel("bits per byte")
    if title:
        fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = [out, out.with_suffix(".svg")]
    fig.savefig(written[0], format="png")
    fig.savefig(written[1], format="svg")
    return written
