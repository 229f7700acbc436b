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
    probes after ``budget_s`` are spent are skipped. With ``warmup`` one untimed step at the deepest
    spec goes first: a fresh process pays its framework's one-off costs (lazy initialisation, the first
    backward pass) there, not in a probe."""

    specs: list[LoraSpec]
    hparams: TrainHyperParams
    initial_adapter: Callable[[LoraSpec], dict[str, Tensor]]
    budget_s: float = 5.0
    warmup: bool = True

    def run(
        self, trainer: Trainer, *, run_id: str, device_id: str, timer: Callable[[], float] = time.perf_counter
    ) -> list[CalibrationProbe]:
        """Train every probe (``timer`` keeps the budget); a probe that fails or counts no work or time is
        left out (a failure is logged)."""
        if self.warmup and self.specs:
            spec = self.specs[-1]
            start = self.initial_adapter(spec)
            one_step = self.hparams.model_copy(update={"max_steps": 1})
            try:
                trainer.train(self._task("warmup", spec, one_step, start, run_id, device_id), start)
            except Exception:  # noqa: BLE001 - a probe of the same spec reports the failure
                log.debug("worker %s: calibration warm-up failed", device_id, exc_info=True)
        probes: list[CalibrationProbe] = []
        began = timer()
        for index, spec in enumerate(self.specs):
            if probes and timer() - began >= self.budget_s:
                break
            start = self.initial_adapter(spec)
            task = self._task(str(index), spec, self.hparams, start, run_id, device_id)
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

    @staticmethod
    def _task(
        name: str,
        spec: LoraSpec,
        hparams: TrainHyperParams,
        start: dict[str, Tensor],
        run_id: str,
        device_id: str,
    ) -> TrainTask:
        """A local task (never sent) of the probe ``name``."""
        return TrainTask(
            task_id=f"calibration-{name}",
            run_id=run_id,
            round=0,
            device_id=device_id,
            plan_version=0,
            lora=spec,
            hparams=hparams,
            adapter=encode_tensors(start),
            issued_at=0.0,
            deadline_at=0.0,
        )
