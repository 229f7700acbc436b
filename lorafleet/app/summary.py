"""What ``lorafleet run`` says when it is done: the result, where its files are, what to run next."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from schemas.strategies import StrategyName


def run_summary(report: dict[str, Any], out: Path, config: Path, overrides: list[str] | None = None) -> str:
    """The lines printed at the end of a run: the final accuracy with the run's wall and virtual
    seconds, the report, its plot and the adapter (with a ``predict`` to try), and, unless the run
    was FedLoRA, the one command that runs the same configuration with FedLoRA to compare."""
    wall, virtual = report.get("wall_time_s"), report.get("virtual_time_s")
    times = ", ".join(
        f"{value:.0f} {what}"
        for value, what in ((wall, "s of run"), (virtual, "virtual s"))
        if value is not None
    )
    adapter = out / "adapter"
    lines = [
        f"final accuracy {report.get('final_accuracy')} after {report.get('final_round')} rounds"
        + (f" ({times})" if times else ""),
        f"report:  {out / 'report.json'}",
        f"plot:    {out / 'report.png'}",
        f"adapter: {adapter}  (try: lorafleet predict {shlex.quote(str(adapter))} --text 'a witty film')",
    ]
    if report.get("strategy") != StrategyName.FEDLORA.value:
        sets = [arg for value in overrides or [] for arg in ("--set", value)]
        command = [
            "lorafleet",
            "run",
            str(config),
            "--out",
            f"{out}-fedlora",
            *sets,
            "--set",
            "strategy=fedlora",
        ]
        lines.append(f"compare with FedLoRA: {shlex.join(command)}")
    return "\n".join(lines)
