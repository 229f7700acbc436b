"""Local training of one task: the real LoRA trainer and a fake one for pipeline tests."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from lorafleet.data import EncodedDataset, iter_batches
from lorafleet.model import AdapterRuntime
from schemas.messages import TrainMetrics, TrainTask


@dataclass
class TrainOutcome:
    """The trained adapter tensors, what was measured, and the number of local samples."""

    tensors: dict[str, Tensor]
    metrics: TrainMetrics
    num_samples: int


class Trainer(Protocol):
    """Trains the adapter of ``task`` starting from ``start`` tensors."""

    def train(self, task: TrainTask, start: dict[str, Tensor]) -> TrainOutcome: ...


def task_seed(seed: int, round_: int, device_id: str) -> int:
    """A 63-bit seed derived from (hyper-parameter seed, round, device id); stable across processes."""
    digest = hashlib.sha256(f"{seed}:{round_}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class LoraTrainer:
    """Trains the task's LoRA on a local shard with AdamW; deterministic given the same inputs."""

    def __init__(self, runtime: AdapterRuntime, shard: EncodedDataset) -> None:
        self.runtime = runtime
        self.shard = shard

    def train(self, task: TrainTask, start: dict[str, Tensor]) -> TrainOutcome:
        """Load ``start`` into the task's adapter, train ``local_epochs`` (capped by ``max_steps``), export.

        Raises:
            ValueError: ``start`` does not fit ``task.lora``.
        """
        hp = task.hparams
        model = self.runtime.load(task.lora, start)
        params = list(self.runtime.parameters(task.lora).values())
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        seed = task_seed(hp.seed, task.round, task.device_id)
        torch.manual_seed(seed)
        model.train()
        steps, examples, loss_sum = 0, 0, 0.0
        started = time.perf_counter()
        for epoch in range(hp.local_epochs):
            for batch in iter_batches(self.shard, hp.batch_size, seed=seed + epoch):
                if hp.max_steps is not None and steps >= hp.max_steps:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                steps += 1
                examples += int(batch["labels"].shape[0])
                loss_sum += float(loss.detach())
        compute_s = time.perf_counter() - started
        model.eval()
        metrics = TrainMetrics(
            train_loss=loss_sum / steps if steps else 0.0, steps=steps, examples=examples, compute_s=compute_s
        )
        return TrainOutcome(self.runtime.export(task.lora), metrics, len(self.shard))


class FakeTrainer:
    """Returns ``start + delta`` for every tensor (exactly checkable aggregation); optional sleep."""

    def __init__(self, delta: float, num_samples: int, sleep_s: float = 0.0) -> None:
        self.delta = delta
        self.num_samples = num_samples
        self.sleep_s = sleep_s

    def train(self, task: TrainTask, start: dict[str, Tensor]) -> TrainOutcome:
        """``{k: v + delta}``, with steps=1, train_loss=0.0 and the measured time (incl. the sleep)."""
        started = time.perf_counter()
        if self.sleep_s > 0:
            time.sleep(self.sleep_s)
        tensors = {k: v + self.delta for k, v in start.items()}
        metrics = TrainMetrics(
            train_loss=0.0, steps=1, examples=self.num_samples, compute_s=time.perf_counter() - started
        )
        return TrainOutcome(tensors, metrics, self.num_samples)
