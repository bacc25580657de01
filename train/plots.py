"""The learning-curve figure: loss, accuracy and validation retrieval (mAP, recall@1) per
epoch, train and validation, phases marked (epoch 0 = the pretrained backbone)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

# The object-oriented API with the Agg canvas: no pyplot global state, no display needed.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_PHASE_COLOURS = {"pretrained": "#fbf3e4", "head": "#f2f2f2", "fine-tune": "#e3ecf7"}
# (panel title, [(history key, legend label, line style)])
_PANELS = (
    ("loss", [("loss", "train", "o-"), ("val_loss", "validation", "s--")]),
    ("accuracy", [("accuracy", "train", "o-"), ("val_accuracy", "validation", "s--")]),
    ("retrieval (validation)", [("val_map", "mAP", "o-"), ("val_recall_at_1", "recall@1", "s--")]),
)


def _series(rows: Sequence[Mapping], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of the rows that have a value for `key` (validation may be absent)."""
    points = [
        (int(r["epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "") and r[key] == r[key]
    ]  # r[key] == r[key]: not NaN
    return [p[0] for p in points], [p[1] for p in points]


def _shade_phases(ax, rows: Sequence[Mapping]) -> None:
    """A background band per phase, and a dashed line where fine-tuning starts."""
    phases: list[tuple[str, int, int]] = []
    for r in rows:
        epoch, phase = int(r["epoch"]), str(r["phase"])
        if phases and phases[-1][0] == phase:
            phases[-1] = (phase, phases[-1][1], epoch)
        else:
            phases.append((phase, epoch, epoch))
    for i, (phase, first, last) in enumerate(phases):
        ax.axvspan(first - 0.5, last + 0.5, color=_PHASE_COLOURS.get(phase, "#f7f7f7"), zorder=0)
        if i > 0:
            ax.axvline(first - 0.5, color="grey", linestyle="--", linewidth=1)


def _label_phases(ax, rows: Sequence[Mapping]) -> None:
    seen: dict[str, list[int]] = {}
    for r in rows:
        seen.setdefault(str(r["phase"]), []).append(int(r["epoch"]))
    for phase, epochs in seen.items():
        ax.text(
            (min(epochs) + max(epochs)) / 2,
            1.01,
            phase,
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
            color="dimgrey",
        )


def plot_learning_curve(rows: Sequence[Mapping], path: Path | str, title: str = "") -> Path:
    """Write a three-panel PNG (loss, accuracy, retrieval) from history rows; returns the path."""
    fig = Figure(figsize=(14, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (metric, series) in zip(fig.subplots(1, len(_PANELS)), _PANELS):
        _shade_phases(ax, rows)
        plotted = False
        for key, label, style in series:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, style, label=label, markersize=4)
                plotted = True
        _label_phases(ax, rows)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        if metric != "loss":
            ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        if plotted:  # a pair loss has no accuracy to show
            ax.legend(loc="best", fontsize=8)
        # Integer epochs only.
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, format="png")
    return path
