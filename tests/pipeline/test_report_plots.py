"""Every report is drawn next to report.json: report.png, a valid PNG of the figure's size, with a
row of per-group panels more for hierarchical runs."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from matplotlib.image import imread

from lorafleet.run.plots import ROW_PX, WIDTH_PX, figure_size
from lorafleet.run.report import build_report, write_report
from lorafleet.state.memory import InMemoryStateStore
from lorafleet.transport.memory import InMemoryBroker, InMemoryTransport
from tests.pipeline.helpers import build_pipeline, make_config
from tests.pipeline.test_hierarchy import fleet, hier_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", head
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


def _flat_report() -> dict[str, Any]:
    state = InMemoryStateStore()
    config = make_config("plot", devices=3, rounds=3)
    broker = InMemoryBroker()
    build_pipeline(
        config,
        [InMemoryTransport(broker) for _ in range(5)],
        state,
        deltas=[0.1, 0.2, 0.3],
        samples=[1, 2, 3],
    ).drive()
    return build_report(config, state)


def test_write_report_writes_report_png_of_the_figures_size(tmp_path: Path) -> None:
    report = _flat_report()
    write_report(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["final_round"] == 3
    png = tmp_path / "report.png"
    assert png_size(png) == figure_size(report) == (WIDTH_PX, 2 * ROW_PX)
    pixels = imread(png)  # decodes: a valid PNG, not only a valid header
    assert pixels.shape[:2] == (2 * ROW_PX, WIDTH_PX)
    assert not (tmp_path / "report.png.tmp").exists()


def test_a_hierarchical_report_adds_per_group_panels(tmp_path: Path) -> None:
    state = InMemoryStateStore()
    config = hier_config("plot-hier", rounds=2)
    fleet(config, state).drive()
    report = build_report(config, state)
    write_report(report, tmp_path)
    assert png_size(tmp_path / "report.png") == figure_size(report) == (WIDTH_PX, 4 * ROW_PX)
    assert imread(tmp_path / "report.png").shape[:2] == (4 * ROW_PX, WIDTH_PX)


def test_a_report_that_cannot_be_drawn_still_writes_report_json(tmp_path: Path) -> None:
    report: dict[str, Any] = {"run_id": "x", "rounds": [{"round": "not a number"}]}
    write_report(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["run_id"] == "x"
    assert not (tmp_path / "report.png").exists()
