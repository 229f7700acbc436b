"""Local training of one task: the real LoRA trainer and a fake one for pipeline tests."""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from lorafleet.data.datasets import EncodedDataset, collate
from lorafleet.ml.model import AdapterRuntime, forward_inputs
from lorafleet.ml.prefix_cache import CHECK_SAMPLES, DEFAULT_MAX_BYTES, ModelSplit, PrefixCache, PrefixCounts
from schemas.messages import TrainHyperParams, TrainMetrics, TrainTask


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


def epoch_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """The sample indices of each batch of one epoch: the order of ``datasets.iter_batches``."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[start : start + batch_size] for start in range(0, n, batch_size)]


def task_batches(n: int, hp: TrainHyperParams, seed: int) -> list[list[int]]:
    """Every batch of a task: ``local_epochs`` epochs (epoch ``e`` shuffled by ``seed + e``), capped by
    ``max_steps``."""
    batches: list[list[int]] = []
    for epoch in range(hp.local_epochs):
        batches += epoch_batches(n, hp.batch_size, seed + epoch)
    return batches if hp.max_steps is None else batches[: hp.max_steps]


class LoraTrainer:
    """Trains the task's LoRA on a local shard (AdamW or SGD); deterministic given the same inputs.

    The loss is the model's own for the task: cross-entropy of the class (sequence classification) or
    of the response tokens (causal LM; prompt and padding are labelled -100 in the shard's batches).

    With ``cache=True`` (the default) the trainer keeps a :class:`~lorafleet.ml.prefix_cache.PrefixCache`
    of its shard: a task whose lowest LoRA block is ``b`` reads the hidden states entering block ``b``
    (computed once, eval mode, no dropout in the frozen prefix) and runs only blocks ``b..L-1`` and the
    head. Without it (or for a model the split forward does not reproduce, or a boundary that does not
    fit in ``cache_max_bytes``) every step runs the whole model.

    Metrics count tokens as the cost model wants them: ``tokens`` = sum over training batches of batch
    size x padded length (the gradient path from ``lowest_block`` up); ``embed_tokens`` and
    ``prefix_block_tokens`` = what went through the embeddings and the frozen blocks below
    ``lowest_block`` (uncached: ``tokens`` and ``tokens * lowest_block``; cached: only the prefix
    computed for samples not cached yet).
    """

    def __init__(
        self,
        runtime: AdapterRuntime,
        shard: EncodedDataset,
        cache: bool = True,
        cache_max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.runtime = runtime
        self.shard = shard
        self.cache = (
            PrefixCache(shard, runtime.hidden_size, cache_max_bytes, dtype=runtime.dtype) if cache else None
        )

    def train(self, task: TrainTask, start: dict[str, Tensor]) -> TrainOutcome:
        """Load ``start`` into the task's adapter, train ``local_epochs`` (capped by ``max_steps``), export.

        Raises:
            ValueError: ``start`` does not fit ``task.lora``.
        """
        hp = task.hparams
        model = self.runtime.load(task.lora, start)
        started = time.perf_counter()
        lowest = min(task.lora.layer_ranks)
        seed = task_seed(hp.seed, task.round, task.device_id)
        batches = task_batches(len(self.shard), hp, seed)
        split = self._split(lowest)
        counts: PrefixCounts | None = None
        if self.cache is not None and split is not None:
            counts = self.cache.ensure(split, lowest, sorted({i for batch in batches for i in batch}))
        params = list(self.runtime.parameters(task.lora).values())
        anchor = [p.detach().clone() for p in params] if hp.prox_mu > 0 else []
        optimizer = local_optimizer(params, hp)
        torch.manual_seed(seed)
        model.train()
        tokens, examples, loss_sum = 0, 0, 0.0
        for indices in batches:
            optimizer.zero_grad(set_to_none=True)
            batch = forward_inputs(collate(self.shard, indices))
            if counts is not None and split is not None and self.cache is not None:
                hidden, _ = self.cache.batch(lowest, indices)
                loss: Tensor = split.forward(lowest, hidden, batch).loss
            else:
                loss = model(**batch).loss
            tokens += int(batch["input_ids"].numel())
            if anchor:  # FedProx: (mu / 2) ||w - w_start||^2 keeps a skewed device near the global model
                loss = loss + proximal_term(params, anchor, hp.prox_mu)
            loss.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
            if hp.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
            optimizer.step()
            examples += len(indices)
            loss_sum += float(loss.detach())
        compute_s = time.perf_counter() - started
        model.eval()
        steps = len(batches)
        if counts is None:
            counts = PrefixCounts(tokens, tokens * lowest)
            cached = False
        else:
            cached = True
        metrics = TrainMetrics(
            train_loss=loss_sum / steps if steps else 0.0,
            steps=steps,
            examples=examples,
            compute_s=compute_s,
            tokens=tokens,
            lowest_block=lowest,
            embed_tokens=counts.embed_tokens,
            prefix_block_tokens=counts.prefix_block_tokens,
            cached=cached,
        )
        return TrainOutcome(self.runtime.export(task.lora), metrics, len(self.shard))

    def _split(self, boundary: int) -> ModelSplit | None:
        """The runtime's split forward if the cache is on and the split reproduces the plain forward at
        ``boundary`` (checked once per boundary on the shard's first samples), else None."""
        split = self.runtime.split if self.cache is not None and len(self.shard) else None
        if split is None:
            return None
        probe = forward_inputs(collate(self.shard, range(min(CHECK_SAMPLES, len(self.shard)))))
        return split if split.check(boundary, probe["input_ids"], probe["attention_mask"]) else None


def proximal_term(params: list[torch.nn.Parameter], anchor: list[Tensor], mu: float) -> Tensor:
    """FedProx's (mu / 2) * ||w - w_start||^2 over the trained tensors."""
    total = torch.zeros(())
    for p, a in zip(params, anchor, strict=True):
        total = total + ((p - a) ** 2).sum()
    return 0.5 * mu * total


def local_optimizer(params: list[torch.nn.Parameter], hp: TrainHyperParams) -> torch.optim.Optimizer:
    """A task's optimiser, new for every task."""
    if hp.optimizer == "sgd":
        return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)


class FakeTrainer:
    """Returns ``start + delta`` for every tensor (exactly checkable aggregation); optional sleep."""

    def __init__(
        self, delta: float, num_samples: int, sleep_s: float = 0.0, tokens_per_sample: int = 0
    ) -> None:
        self.delta = delta
        self.num_samples = num_samples
        self.sleep_s = sleep_s
        self.tokens_per_sample = tokens_per_sample  # reported work, for the virtual clock and planners

    def train(self, task: TrainTask, start: dict[str, Tensor]) -> TrainOutcome:
        """``{k: v + delta}``, with train_loss=0.0, the measured time (incl. the sleep) and
        ``tokens_per_sample`` tokens per sample through the task's LoRA blocks (and then as many steps
        as a real trainer would take; one step otherwise)."""
        started = time.perf_counter()
        if self.sleep_s > 0:
            time.sleep(self.sleep_s)
        tensors = {k: v + self.delta for k, v in start.items()}
        metrics = TrainMetrics(
            train_loss=0.0,
            steps=self._steps(task),
            examples=self.num_samples,
            compute_s=time.perf_counter() - started,
            tokens=self.num_samples * self.tokens_per_sample,
            lowest_block=min(task.lora.layer_ranks, default=0),
        )
        return TrainOutcome(tensors, metrics, self.num_samples)

    def _steps(self, task: TrainTask) -> int:
        """One step, or (when it reports tokens) the steps a real trainer would take."""
        if not self.tokens_per_sample:
            return 1
        h = task.hparams
        return math.ceil(self.num_samples / h.batch_size) * h.local_epochs
