"""Builds services with their real collaborators from a run configuration.

The only place that knows how a device slot maps to its shard (URLs map to adapters in
lorafleet/app/connections.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aggregator.evaluation import Evaluation, evaluate
from aggregator.hierarchical_service import aggregator_class
from aggregator.service import AggregatorService
from lorafleet.app.malloc import TRAINING_MMAP_THRESHOLD_BYTES, pin_mmap_threshold, release_free_memory
from lorafleet.data.datasets import (
    EncodedDataset,
    TextDataset,
    encode_dataset,
    eval_set,
    load_device_train,
    load_train,
    num_labels,
    partition_rows,
)
from lorafleet.data.held_out import held_out_seed, split_held_out
from lorafleet.data.labels import label_names
from lorafleet.data.partition import label_histogram as histogram
from lorafleet.data.privacy import noise_seed, shared_histogram
from lorafleet.devices.costmodel import CostModel, cost_model_for
from lorafleet.devices.emulator import DeviceEmulator
from lorafleet.ml.lora import Tensors
from lorafleet.ml.model import AdapterRuntime
from lorafleet.run.clock import Clock
from lorafleet.run.progress import RunReporter
from lorafleet.settings import env_name
from lorafleet.state.base import StateStore
from lorafleet.transport.base import Transport
from orchestrator.hierarchical_service import orchestrator_class
from orchestrator.planners.specs import lora_spec, top_ranks
from orchestrator.service import OrchestratorService
from schemas.config import RunConfig, device_id
from schemas.errors import ConfigError
from schemas.messages import LoraSpec, TrainHyperParams
from worker.calibration import Calibration
from worker.evaluation import DeviceEvaluator, HeldOutRows
from worker.host_turns import HostTurns, TakingTurns
from worker.service import WorkerService
from worker.trainer import LoraTrainer, Trainer

#: The environment variable of ``lorafleet worker --data``: the device's own rows.
DEVICE_DATA_ENV = env_name("device_data")


def device_index(config: RunConfig, device: str) -> int:
    """The slot index of a device id (``dev-0003`` -> 3).

    Raises:
        ConfigError: not a device id of this run.
    """
    if device not in config.device_ids():
        raise ConfigError(
            f"device id {device!r} is not one of this run's {config.devices.count} slots "
            f"({device_id(0)} .. {device_id(config.devices.count - 1)})"
        )
    return int(device.rsplit("-", 1)[1])


@dataclass
class Shards:
    """The training rows of every device slot, loaded once: a central set split among the slots
    (``data.source: partition``), or one device's own rows (``local``: ``indices`` is None and every
    slot this process serves trains on ``train``)."""

    train: TextDataset
    indices: list[list[int]] | None

    @classmethod
    def load(cls, config: RunConfig, device_data: str | Path | None = None) -> Shards:
        """The rows of ``config``; under ``data.source: local`` those of the device's file
        ``device_data`` (``lorafleet worker --data``).

        Raises:
            DataError: the data is missing or bad (for a device file: the message names it).
            ConfigError: ``device_data`` missing under ``local``, or given under ``partition``.
        """
        if config.data.source == "local":
            if device_data is None:
                raise ConfigError(
                    "data.source is local: each worker reads its own rows (lorafleet worker --data PATH, "
                    f"or ${DEVICE_DATA_ENV}); a simulation partitions one set (data.source: partition)"
                )
            return cls(load_device_train(config, device_data), None)
        if device_data is not None:
            raise ConfigError(
                f"--data {device_data} is a device's own file, for data.source local; this run's "
                "data.source is partition (the slots share one partitioned set)"
            )
        train = load_train(config)
        indices = partition_rows(train, config)
        return cls(train, indices)

    def shard(self, index: int) -> TextDataset:
        if self.indices is None:
            return self.train
        return self.train.subset(self.indices[index])


def label_histogram(ds: TextDataset) -> list[int]:
    return histogram(ds.labels, ds.num_labels)


class RuntimeEvaluator:
    """Evaluates adapters on the run's evaluation split with a shared :class:`AdapterRuntime`; with
    ``turns``, in one of the host's turns (worker/host_turns.py), like the training beside it."""

    def __init__(
        self, runtime: AdapterRuntime, encoded_eval: EncodedDataset, turns: HostTurns | None = None
    ) -> None:
        self.runtime = runtime
        self.encoded_eval = encoded_eval
        self.turns = turns

    def evaluate(self, spec: LoraSpec, tensors: Tensors) -> Evaluation:
        with contextlib.nullcontext() if self.turns is None else self.turns.turn():
            return evaluate(self.runtime, spec, tensors, self.encoded_eval)


def build_cost_model(config: RunConfig, runtime: AdapterRuntime) -> CostModel:
    """The calibrated cost model for MiniLM; a size-scaled nominal one for other models."""
    return cost_model_for(config.model.name, runtime.num_blocks, runtime.hidden_size)


def build_runtime(config: RunConfig) -> AdapterRuntime:
    """The model of ``config``; its classes are ``data.labels`` when given (a device with its own rows
    needs no central dataset to know them), else those of ``data.dataset``."""
    labels = config.data.labels
    classes = len(labels) if labels else num_labels(config.data.dataset)
    return AdapterRuntime(config.model, classes, seed=config.seed)


def with_model_defaults(config: RunConfig, runtime: AdapterRuntime) -> RunConfig:
    """``config`` with ``lora.target_modules`` resolved against the loaded model (None: the family's
    default), so that every service plans the same LoRA and the report shows it.

    Raises:
        ConfigError: a configured target module names no linear module of a block.
    """
    try:
        targets = runtime.target_modules(config.lora.targets)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if targets == config.lora.targets:
        return config
    lora = config.lora.model_copy(update={"targets": targets})
    return config.model_copy(update={"lora": lora})


def build_orchestrator(
    config: RunConfig,
    transport: Transport,
    state: StateStore,
    runtime: AdapterRuntime,
    *,
    out_dir: Path | None,
    reporter: RunReporter | None = None,
    clock: Clock | None = None,
    embedded: bool = False,
) -> OrchestratorService:
    config = with_model_defaults(config, runtime)
    return orchestrator_class(config)(
        transport,
        state,
        config=config,
        num_blocks=runtime.num_blocks,
        initial_adapter=lambda spec: runtime.initial_adapter(spec, seed=config.seed),
        out_dir=out_dir,
        reporter=reporter,
        clock=clock,
        cost=build_cost_model(config, runtime),
        plan_live_only=not embedded,
    )


def build_aggregator(
    config: RunConfig,
    transport: Transport,
    state: StateStore,
    runtime: AdapterRuntime,
    *,
    out_dir: Path | None,
    clock: Clock | None = None,
    embedded: bool = False,
    fleet_key: bytes | None = None,
    snapshots: bool | None = None,
    turns: HostTurns | None = None,
) -> AggregatorService:
    """The aggregator; with ``turns`` it evaluates only in one of the host's turns."""
    config = with_model_defaults(config, runtime)
    if not embedded:  # its own process: update bodies of many MB go back to the OS when freed (malloc.py);
        pin_mmap_threshold()  # never beside training: every activation would be an mmap (2x slower rounds)
    encoded_eval = encode_dataset(runtime.tokenizer, eval_set(config), config.model.max_seq_len)
    labels = label_names(config)

    def write_checkpoint(spec: LoraSpec, tensors: Tensors, directory: Path) -> None:
        runtime.save_peft_checkpoint(spec, tensors, directory, dataset=config.data.dataset, labels=labels)

    return aggregator_class(config)(
        transport,
        state,
        config=config,
        evaluator=RuntimeEvaluator(runtime, encoded_eval, turns),
        write_checkpoint=write_checkpoint,
        out_dir=out_dir,
        clock=clock,
        drop_vanished=not embedded,
        fleet_key=fleet_key,
        snapshots=not embedded if snapshots is None else snapshots,
    )


def device_rows(config: RunConfig, index: int, shards: Shards) -> tuple[TextDataset, TextDataset]:
    """Device ``index``'s training rows and the ``eval.device_fraction`` of its rows held out of
    training, for federated evaluation."""
    return split_held_out(
        shards.shard(index), config.eval.device_fraction, held_out_seed(config.seed, device_id(index))
    )


def build_trainer(config: RunConfig, runtime: AdapterRuntime, shard: TextDataset) -> LoraTrainer:
    """The LoRA trainer of a device's training rows ``shard``."""
    encoded = encode_dataset(runtime.tokenizer, shard, config.model.max_seq_len)
    return LoraTrainer(runtime, encoded, cache=config.activation_cache)


def build_worker(
    config: RunConfig,
    index: int,
    transport: Transport,
    runtime: AdapterRuntime,
    shards: Shards,
    *,
    trainer: Trainer | None = None,
    clock: Clock | None = None,
    on_finished: Callable[[], None] | None = None,
    signing_key: bytes | None = None,
    wrap_trainer: Callable[[Trainer], Trainer] | None = None,
    own_process: bool = False,
    turns: HostTurns | None = None,
) -> WorkerService:
    """The worker of slot ``index``. ``own_process``: the worker is its process's only trainer (a
    ``lorafleet worker``), which pins the allocator at :data:`TRAINING_MMAP_THRESHOLD_BYTES` and gives a
    task's freed memory back after it; an embedded run's lanes share the allocator with everything else
    in the process and leave it be. ``turns``: it trains only in one of the host's turns
    (worker/host_turns.py)."""
    if own_process:
        pin_mmap_threshold(TRAINING_MMAP_THRESHOLD_BYTES)
    shard, held_out = device_rows(config, index, shards)
    evaluator = None
    if len(held_out):
        evaluator = DeviceEvaluator(
            transport,
            HeldOutRows(runtime, encode_dataset(runtime.tokenizer, held_out, config.model.max_seq_len)),
            run_id=config.run_id,
            device_id=device_id(index),
            limits=config.limits,
            signing_key=signing_key,
        )
    if trainer is None:
        trainer = build_trainer(config, runtime, shard)
    if wrap_trainer is not None:
        trainer = wrap_trainer(trainer)  # e.g. a poisoned device in the robustness benchmark
    if turns is not None:
        trainer = TakingTurns(trainer, turns, after=release_free_memory if own_process else None)
    profile = config.devices.profile_of(index)
    measured = config.device_times == "measured"
    emulator = None
    if not measured:
        cost = build_cost_model(config, runtime)
        emulator = DeviceEmulator(device_id(index), profile, cost, seed=config.seed)
    privacy = config.privacy
    shared = shared_histogram(
        label_histogram(shard),
        privacy.label_histogram,
        epsilon=privacy.epsilon,
        seed=noise_seed(config.run_id, config.seed, device_id(index)),
    )
    return WorkerService(
        transport,
        trainer,
        run_id=config.run_id,
        device_id=device_id(index),
        num_samples=len(shard),
        label_histogram=shared,
        profile=profile,
        limits=config.limits,
        clock=clock,
        incarnation=f"{os.getpid()}",
        emulator=emulator,
        sleep_device_time=config.devices.sleep,
        on_finished=on_finished,
        signing_key=signing_key,
        evaluator=evaluator,
        measure_times=measured,
        calibration=build_calibration(config, runtime) if measured else None,
    )


def build_calibration(config: RunConfig, runtime: AdapterRuntime) -> Calibration | None:
    """A measuring worker's calibration: ``devices.calibration_steps`` steps at the shallowest and the
    deepest LoRA depth (None: no steps)."""
    steps = config.devices.calibration_steps
    if steps == 0:
        return None
    config = with_model_defaults(config, runtime)
    depths = sorted({1, runtime.num_blocks})
    specs = [lora_spec(config.lora, top_ranks(runtime.num_blocks, d, config.lora.rank)) for d in depths]
    hparams = TrainHyperParams(
        **config.training.model_dump(exclude={"local_epochs", "max_steps"}),
        local_epochs=1,
        max_steps=steps,
        seed=config.seed,
    )
    return Calibration(
        specs,
        hparams,
        lambda spec: runtime.initial_adapter(spec, seed=config.seed),
        budget_s=config.devices.calibration_budget_s,
    )
