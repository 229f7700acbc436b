"""A run's progress on the terminal (rich): a bar per round, silent when ``quiet``.

Each round gets a bar of the updates received out of those expected, with elapsed time and ETA; when
it closes, its close reason and traffic; when it is evaluated, its metrics on the same line. A
round's line stays live until it is both closed and evaluated (evaluation runs beside the next
round), then is printed for good; below the bars, the last evaluated round's accuracy is always
shown. On a console that is not a terminal (a log file) only the finished lines are written.

The services tell the reporter when rounds open, close and are evaluated; the updates in between
come from the state store, which the reporter polls every ``poll_s`` (``state``; without one the
bar moves at :meth:`RunReporter.update_received` calls and at the close). A hierarchical run's bar
is its global round: the updates of its groups' rounds out of each group's target times its devices.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

from lorafleet.run.round_numbers import intra_round
from lorafleet.state.base import StateStore, StateStoreError
from schemas.config import RunConfig, perplexity


@dataclass
class _RoundBar:
    task: TaskID
    closed: str | None = None  # how it closed: reason, seconds, traffic
    evaluated: str | None = None  # its metrics

    @property
    def result(self) -> str:
        return "  ".join(part for part in (self.evaluated, self.closed) if part)


class _RoundsProgress(Progress):
    """The round bars, then a footer line (the last evaluated round's metrics)."""

    footer: Text | None = None

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        if self.footer is not None:
            yield self.footer


def hierarchical_progress(state: StateStore, run_id: str, global_round: int) -> tuple[int, int] | None:
    """(updates received, updates expected) of a global round: over its groups' rounds opened so far,
    and each group's target frequency times its devices; None before the global round exists."""
    info = state.get_global_round(run_id, global_round)
    if info is None:
        return None
    done = expected = 0
    for group, target in info.targets.items():
        devices = 0
        for step in range(1, max(target, info.counts.get(group, 0)) + 1):
            round_info = state.get_round(run_id, intra_round(global_round, group, step))
            if round_info is None:
                break
            done += round_info.reported
            devices = len(round_info.tasks)
        expected += target * devices
    return done, max(done, expected)


class RunReporter:
    def __init__(
        self,
        config: RunConfig,
        *,
        quiet: bool = False,
        console: Console | None = None,
        state: StateStore | None = None,
        poll_s: float = 0.5,
    ) -> None:
        self.config = config
        self.quiet = quiet
        self.console = console or Console(stderr=True)
        self.state = state
        self.poll_s = poll_s
        self._progress: _RoundsProgress | None = None
        self._bars: dict[int, _RoundBar] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # -- events ---------------------------------------------------------------------------------------
    def device_registered(self, device_id: str, count: int) -> None:
        if count == self.config.devices.count or count % max(1, self.config.devices.count // 4) == 0:
            self._print(f"[dim]devices registered: {count}/{self.config.devices.count}[/dim]")

    def round_opened(self, round_no: int, tasks: int) -> None:
        if self.quiet:
            return
        with self._lock:
            progress = self._started()
            if round_no in self._bars:  # re-announced after a restart
                return
            description = f"round {round_no}/{self.config.rounds.max_rounds}"
            task = progress.add_task(description, total=max(1, tasks), result="")
            self._bars[round_no] = _RoundBar(task)

    def update_received(self, round_no: int, reported: int, expected: int | None = None) -> None:
        """``reported`` updates of round ``round_no`` are in (of ``expected``, when it changed)."""
        with self._lock:
            bar = self._bars.get(round_no)
            if bar is None or bar.closed or self._progress is None:
                return
            if expected is not None:
                self._progress.update(bar.task, total=max(1, expected))
            self._progress.update(bar.task, completed=reported)

    def round_closed(self, round_no: int, metrics: dict[str, Any]) -> None:
        reported, issued = metrics.get("devices_reported"), metrics.get("tasks_issued")
        summary = (
            f"{metrics.get('close_reason')}, {metrics.get('round_time_s', 0.0):.1f} s, "
            f"up {metrics.get('bytes_up', 0) / 1e6:.2f} MB, down {metrics.get('bytes_down', 0) / 1e6:.2f} MB"
        )
        with self._lock:
            bar = self._bars.get(round_no)
            if bar is None or self._progress is None:
                self._print(f"[cyan]round {round_no}[/cyan] closed ({summary}): {reported}/{issued} updates")
                return
            self._progress.update(bar.task, total=max(1, int(issued or 0)), completed=int(reported or 0))
            self._progress.stop_task(bar.task)
            bar.closed = summary
            self._progress.update(bar.task, result=bar.result)
            self._settle(round_no)

    def round_evaluated(self, round_no: int, accuracy: float, loss: float) -> None:
        """The round's metrics; a causal LM's accuracy is exact match, and it adds perplexity. The
        metric the target applies to is in bold, with the target."""
        text = self._metrics_text(accuracy, loss)
        with self._lock:
            bar = self._bars.get(round_no)
            if bar is None or self._progress is None:
                self._print(f"[green]round {round_no}[/green] {text}")
                return
            bar.evaluated = text
            self._progress.update(bar.task, result=bar.result)
            footer = f"last evaluated: [green]round {round_no}[/green] {text}"
            self._progress.footer = Text.from_markup(footer)
            self._settle(round_no)

    def finished(self, reason: str, final_round: int, accuracy: float | None, wall_s: float) -> None:
        """The run's end. The last rounds' evaluations may not have reached the orchestrator by
        then: their metrics come from the state store."""
        self._late_evaluations()
        with self._lock:  # a round opened after the final one (trained while its evaluation ran) never ends
            for round_no, bar in sorted(self._bars.items()):
                if round_no > final_round and not bar.closed and self._progress is not None:
                    self._progress.remove_task(bar.task)
                    del self._bars[round_no]
        self.close()
        acc = "n/a" if accuracy is None else f"{accuracy:.4f}"
        self._print(
            f"[bold]run finished[/bold] ({reason}) after round {final_round}: accuracy {acc}, {wall_s:.1f} s"
        )

    def close(self) -> None:
        """Stop the live display and the polling (the bars still live are printed once more)."""
        self._stop.set()
        with self._lock:
            if self._progress is not None:
                self._progress.stop()
                self._progress = None

    # -- internals ------------------------------------------------------------------------------------
    def _late_evaluations(self) -> None:
        with self._lock:
            pending = [r for r, bar in self._bars.items() if bar.evaluated is None]
        if not pending or self.state is None:
            return
        try:
            metrics = self.state.get_round_metrics(self.config.run_id)
        except StateStoreError:
            return
        for round_no in sorted(pending):
            m = metrics.get(round_no, {})
            if m.get("accuracy") is not None and m.get("loss") is not None:
                self.round_evaluated(round_no, float(m["accuracy"]), float(m["loss"]))

    def _print(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, highlight=False)

    def _metrics_text(self, accuracy: float, loss: float) -> str:
        rounds = self.config.rounds
        causal = self.config.model.task == "causal_lm"
        values = {"accuracy": accuracy, "loss": loss}
        if causal:
            values["perplexity"] = perplexity(loss)
        parts = []
        for name, value in values.items():
            label = "exact match" if causal and name == "accuracy" else name
            text = f"{label} {value:.4f}"
            if name == rounds.target_metric:
                target = rounds.target_value
                text = f"[bold]{text}[/bold]" + ("" if target is None else f" (target {target:g})")
            parts.append(text)
        return " ".join(parts)

    def _started(self) -> _RoundsProgress:
        if self._progress is None:
            fixed = Column(no_wrap=True)  # on a narrow console the result wraps, the bar's parts stay whole
            self._progress = _RoundsProgress(
                TextColumn("[cyan]{task.description}", table_column=fixed),
                BarColumn(bar_width=24),
                MofNCompleteColumn(table_column=fixed),
                TextColumn("updates", table_column=fixed),
                TimeElapsedColumn(table_column=fixed),
                TextColumn("eta", table_column=fixed),
                TimeRemainingColumn(table_column=fixed),
                TextColumn("{task.fields[result]}", table_column=Column(ratio=1, overflow="fold")),
                console=self.console,
            )
            self._progress.start()
            if self.state is not None and self._poller is None:
                self._poller = threading.Thread(target=self._poll_forever, daemon=True, name="progress")
                self._poller.start()
        return self._progress

    def _settle(self, round_no: int) -> None:
        """A round closed and evaluated leaves the live display for a line of its own."""
        bar = self._bars[round_no]
        if not (bar.closed and bar.evaluated) or self._progress is None:
            return
        task = next(t for t in self._progress.tasks if t.id == bar.task)
        self._progress.console.print(self._progress.make_tasks_table([task]))
        self._progress.remove_task(bar.task)
        del self._bars[round_no]  # what comes for it again (a restored run announces it anew) prints a line

    def _poll_forever(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def poll(self) -> None:
        """Read the open rounds' updates from the state store once."""
        if self.state is None:
            return
        with self._lock:
            open_rounds = [r for r, bar in self._bars.items() if not bar.closed]
        run_id = self.config.run_id
        for round_no in open_rounds:
            try:
                if self.config.hierarchical:
                    counts = hierarchical_progress(self.state, run_id, round_no)
                else:
                    info = self.state.get_round(run_id, round_no)
                    counts = None if info is None else (info.reported, len(info.tasks))
            except StateStoreError:
                return  # the services report the state store's failures themselves
            if counts is not None:
                self.update_received(round_no, counts[0], counts[1])
