"""``report.png``: a run's report as figures, drawn from ``report.json``'s content (matplotlib, Agg).

Two rows for every run: accuracy and loss per round against wall and virtual time; bytes per round
(up and down) and devices reporting per round against tasks issued. A hierarchical run adds two rows
of per-group panels over its global rounds: intra-group rounds done and virtual seconds, LoRA depth
and label divergence from the fleet. The figure is :data:`WIDTH_PX` wide and :data:`ROW_PX` high per
row (:func:`figure_size`). Drawn on a figure of its own with the Agg canvas: no pyplot, no global
backend, safe beside other threads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
WIDTH_PX = 1200
ROW_PX = 320
GROUP_FIELDS = (  # per-group panels of a hierarchical run: field of rounds[].groups[g], title
    ("rounds_done", "intra-group rounds done"),
    ("virtual_s", "group virtual seconds"),
    ("depth", "LoRA depth (blocks)"),
    ("divergence", "label divergence from the fleet (KL)"),
)


def figure_size(report: dict[str, Any]) -> tuple[int, int]:
    """(width, height) in pixels of ``report``'s figure."""
    rows = 2 + (2 if _hierarchical(report) else 0)
    return WIDTH_PX, rows * ROW_PX


def plot_report(report: dict[str, Any], path: Path) -> Path:
    """Draw ``report`` (``report.json``'s content) into the PNG file ``path`` (written atomically)."""
    width, height = figure_size(report)
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    rows = height // ROW_PX
    axes = figure.subplots(rows, 2, squeeze=False)
    rounds = report.get("rounds") or []
    _learning(axes[0][0], rounds, "wall_time_s", "wall seconds")
    _learning(axes[0][1], rounds, "virtual_time_s", "virtual seconds")
    _traffic(axes[1][0], rounds)
    _devices(axes[1][1], rounds)
    if _hierarchical(report):
        for ax, (name, title) in zip((a for row in axes[2:] for a in row), GROUP_FIELDS, strict=True):
            _per_group(ax, rounds, name, title)
    final = _fmt(report.get("final_accuracy"))
    figure.suptitle(
        f"{report.get('run_id')} ({report.get('strategy')}): final accuracy {final} "
        f"after round {report.get('final_round')} ({report.get('finish_reason')})"
    )
    tmp = path.with_suffix(f".png.{os.getpid()}.tmp")  # two processes may write it at once
    figure.savefig(tmp, format="png", dpi=DPI)
    tmp.replace(path)
    return path


def _hierarchical(report: dict[str, Any]) -> bool:
    return "group_rounds" in report


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _points(rounds: Sequence[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pairs = [(r[x], r[y]) for r in rounds if r.get(x) is not None and r.get(y) is not None]
    return [float(p[0]) for p in pairs], [float(p[1]) for p in pairs]


def _learning(ax: Axes, rounds: Sequence[dict[str, Any]], x: str, label: str) -> None:
    """Accuracy (left axis) and loss (right axis) of each evaluated round against time ``x``."""
    ax.plot(*_points(rounds, x, "accuracy"), "o-", color="tab:blue", label="accuracy")
    ax.set_xlabel(label)
    ax.set_ylabel("accuracy", color="tab:blue")
    ax.set_title(f"accuracy and loss against {label}")
    ax.grid(alpha=0.3)
    loss = ax.twinx()
    loss.plot(*_points(rounds, x, "loss"), "s--", color="tab:red", label="loss")
    loss.set_ylabel("loss", color="tab:red")


def _traffic(ax: Axes, rounds: Sequence[dict[str, Any]]) -> None:
    numbers = [int(r["round"]) for r in rounds]
    up = [r.get("bytes_up", 0) / 1e6 for r in rounds]
    down = [r.get("bytes_down", 0) / 1e6 for r in rounds]
    ax.bar([n - 0.2 for n in numbers], up, width=0.4, label="up (updates)")
    ax.bar([n + 0.2 for n in numbers], down, width=0.4, label="down (tasks)")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("MB")
    ax.set_title("bytes per round")
    ax.legend(loc="best")
    ax.grid(alpha=0.3, axis="y")


def _devices(ax: Axes, rounds: Sequence[dict[str, Any]]) -> None:
    numbers = [int(r["round"]) for r in rounds]
    ax.bar(numbers, [r.get("devices_reported", 0) for r in rounds], width=0.6, label="reported")
    ax.plot(numbers, [r.get("tasks_issued", 0) for r in rounds], "k_", markersize=18, label="tasks issued")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("devices")
    ax.set_title("devices reporting per round")
    ax.legend(loc="best")
    ax.grid(alpha=0.3, axis="y")


def _per_group(ax: Axes, rounds: Sequence[dict[str, Any]], name: str, title: str) -> None:
    """One line per group: its ``name`` in each global round's plan and outcome."""
    groups = sorted({g for r in rounds for g in r.get("groups") or {}}, key=int)
    highest = 0.0
    for group in groups:
        xs = [int(r["round"]) for r in rounds if (r.get("groups") or {}).get(group, {}).get(name) is not None]
        ys = [float(r["groups"][group][name]) for r in rounds if int(r["round"]) in xs]
        ax.plot(xs, ys, "o-", label=f"group {group}")
        highest = max([highest, *ys])
    ax.set_xlabel("global round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if name in ("rounds_done", "depth"):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if name == "divergence":  # from 0, so that near-IID groups (KL ~ 0) read as such
        ax.set_ylim(0.0, max(0.1, highest * 1.2))
    ax.set_title(f"per group: {title}")
    if groups:
        ax.legend(loc="best")
    ax.grid(alpha=0.3)
