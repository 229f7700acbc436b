"""Torch threads sized to the cores a process may use (lorafleet/ml/cores.py), not the machine's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorafleet.ml.cores import cgroup_cpu_quota, usable_cores


def _v2(root: Path, text: str) -> Path:
    (root / "cpu.max").write_text(text)
    return root


def _v1(root: Path, quota_us: int, period_us: int = 100_000) -> Path:
    (root / "cpu").mkdir()
    (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota_us}\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(f"{period_us}\n")
    return root


def test_a_cgroup_v2_quota_is_read_in_cores(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(_v2(tmp_path, "150000 100000\n")) == 1.5


def test_an_unlimited_or_missing_cgroup_has_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(tmp_path) is None
    assert cgroup_cpu_quota(_v1(tmp_path, -1)) is None
    assert cgroup_cpu_quota(_v2(tmp_path, "max 100000\n")) is None


def test_a_cgroup_v1_quota_is_read_in_cores(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(_v1(tmp_path, 50_000)) == 0.5


def test_a_quota_caps_the_cores_rounded_up(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(_v1(tmp_path, 50_000)) == 1  # half a core still gets a thread
    assert usable_cores(_v2(tmp_path, "1000000 100000")) == affinity  # a quota above the cores
    assert usable_cores(tmp_path / "none") == affinity


@pytest.mark.skipif(
    shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2, reason="needs taskset and 2 cores"
)
def test_a_process_pinned_to_one_core_gets_one_torch_thread_by_default() -> None:
    # a worker started with --threads 0 (its share) under `taskset -c 0` on a machine of more cores
    code = "from lorafleet.ml.model import configure_torch_threads; print(configure_torch_threads(0))"
    pinned = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert pinned.stdout.strip() == "1"
