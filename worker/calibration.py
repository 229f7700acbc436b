"""A measuring worker's calibration at registration: a few timed training steps at the shallowest and
the deepest LoRA depth, so that the orchestrator's first plan is not blind (devices.emulate false).

Each probe is a local task (never sent) of ``steps`` steps from a fresh adapter; its counted work and
the seconds the trainer measured (``TrainMetrics.compute_s``, as a task's update reports) become a
:class:`~schemas.messages.CalibrationProbe` of ``DeviceRegistered``, which the orchestrator turns into
a first capacity estimate (orchestrator/capacity.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from schemas.messages import CalibrationProbe, LoraSpec, TrainHyperParams, TrainTask
from schemas.tensors import encode_tensors
from worker.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """What to probe: ``specs`` in order (shallowest first), each for ``hparams.max_steps`` steps;
    probes after ``budget_s`` are spent are skipped."""

    specs: list[LoraSpec]
    hparams: TrainHyperParams
    initial_adapter: Callable[[LoraSpec], dict[str, Tensor]]
    budget_s: float = 5.0

    def run(
        self, trainer: Trainer, *, run_id: str, device_id: str, timer: Callable[[], float] = time.perf_counter
    ) -> list[CalibrationProbe]:
        """Train every probe (``timer`` keeps the budget); a probe that fails or counts no work or time is
        left out (a failure is logged)."""
        probes: list[CalibrationProbe] = []
        began = timer()
        for index, spec in enumerate(self.specs):
            if probes and timer() - began >= self.budget_s:
                break
            start = self.initial_adapter(spec)
            task = TrainTask(
                task_id=f"calibration-{index}",
                run_id=run_id,
                round=0,
                device_id=device_id,
                plan_version=0,
                lora=spec,
                hparams=self.hparams,
                adapter=encode_tensors(start),
                issued_at=0.0,
                deadline_at=0.0,
            )
            try:
                metrics = trainer.train(task, start).metrics
            except Exception:  # noqa: BLE001 - calibration is best effort: the first task measures too
                log.exception("worker %s: calibration probe %d failed", device_id, index)
                continue
            if metrics.compute_s <= 0.0 or metrics.steps < 1 or metrics.examples < 1:
                continue
            probes.append(
                CalibrationProbe(
                    lowest_block=min(spec.layer_ranks),
                    steps=metrics.steps,
                    examples=metrics.examples,
                    tokens=metrics.tokens,
                    embed_tokens=metrics.embed_tokens,
                    prefix_block_tokens=metrics.prefix_block_tokens,
                    compute_s=metrics.compute_s,
                )
            )
        return probes
