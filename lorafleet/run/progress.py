"""Per-round progress on the terminal (rich). Silent when ``quiet``."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from schemas.config import RunConfig, perplexity


class RunReporter:
    def __init__(self, config: RunConfig, *, quiet: bool = False, console: Console | None = None) -> None:
        self.config = config
        self.quiet = quiet
        self.console = console or Console(stderr=True)

    def _print(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, highlight=False)

    def device_registered(self, device_id: str, count: int) -> None:
        if count == self.config.devices.count or count % max(1, self.config.devices.count // 4) == 0:
            self._print(f"[dim]devices registered: {count}/{self.config.devices.count}[/dim]")

    def round_opened(self, round_no: int, tasks: int) -> None:
        self._print(f"[cyan]round {round_no}/{self.config.rounds.max_rounds}[/cyan]: {tasks} tasks out")

    def round_closed(self, round_no: int, metrics: dict[str, Any]) -> None:
        self._print(
            f"[cyan]round {round_no}[/cyan] closed ({metrics.get('close_reason')}): "
            f"{metrics.get('devices_reported')}/{metrics.get('tasks_issued')} updates, "
            f"{metrics.get('round_time_s', 0.0):.1f} s, up {metrics.get('bytes_up', 0) / 1e6:.2f} MB, "
            f"down {metrics.get('bytes_down', 0) / 1e6:.2f} MB"
        )

    def round_evaluated(self, round_no: int, accuracy: float, loss: float) -> None:
        """The round's metrics; a causal LM's accuracy is exact match, and it adds perplexity. The
        metric the target applies to is in bold, with the target."""
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
        self._print(f"[green]round {round_no}[/green] " + " ".join(parts))

    def finished(self, reason: str, final_round: int, accuracy: float | None, wall_s: float) -> None:
        acc = "n/a" if accuracy is None else f"{accuracy:.4f}"
        self._print(
            f"[bold]run finished[/bold] ({reason}) after round {final_round}: accuracy {acc}, {wall_s:.1f} s"
        )
