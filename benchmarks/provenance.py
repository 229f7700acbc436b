"""Where a benchmark's measurement came from, recorded beside it in its JSON."""

from __future__ import annotations

import os
import time
from typing import Any

import torch


def provenance(command: str, load_before: tuple[float, float, float], quiet: Any) -> dict[str, Any]:
    """Where a measurement came from: the command, when, on what, and how loaded the host was
    (``quiet`` is a ``calibrate.QuietRunner``)."""
    return {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "foreign_load": quiet.summary(),
        "foreign_load_per_unit": quiet.log,
    }
