"""Every message that crosses the broker, as strict pydantic models.

Models are frozen, reject unknown fields, never coerce types (``strict``) and refuse NaN/Inf in
float fields. Identifiers are restricted to a safe alphabet so they can appear in queue names,
Redis keys and file paths. Each class has a ``KIND`` (its name in the envelope) and a
deterministic ``message_id`` used for deduplication.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

RunId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
DeviceId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
TaskId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,191}$")]
Round = Annotated[int, Field(ge=0, le=1_000_000_000)]  # hierarchical runs: lorafleet/run/round_numbers.py
Seconds = Annotated[float, Field(ge=0.0)]
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class StrictModel(BaseModel):
    """Base for every wire model: frozen, strict, no extra fields, no NaN/Inf."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class TensorPayload(StrictModel):
    """safetensors bytes of a set of adapter tensors, with their size and sha256."""

    data: bytes
    sha256: Sha256Hex
    nbytes: Annotated[int, Field(ge=0)]


class LoraSpec(StrictModel):
    """Exactly which LoRA a device trains: the blocks (0 = nearest the input) and a rank per block.

    ``lora_alpha`` of a block is ``alpha_ratio * rank``, so the LoRA scaling is the same at every
    rank, which keeps rank-index-wise averaging of heterogeneous ranks meaningful.
    """

    target_modules: Annotated[
        list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$")]],
        Field(min_length=1, max_length=16),
    ]
    layer_ranks: Annotated[
        dict[Annotated[int, Field(ge=0, le=1023)], Annotated[int, Field(ge=1, le=512)]], Field(min_length=1)
    ]
    alpha_ratio: Annotated[float, Field(gt=0.0, le=64.0)] = 2.0
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1

    @property
    def layers(self) -> list[int]:
        """The LoRA blocks, ascending."""
        return sorted(self.layer_ranks)

    @property
    def max_rank(self) -> int:
        return max(self.layer_ranks.values())


class TrainingSettings(StrictModel):
    """Local optimisation settings: the configuration's ``training:`` section, carried in every task."""

    local_epochs: Annotated[int, Field(ge=1, le=100)] = 1
    max_steps: Annotated[int, Field(ge=1)] | None = None
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 16
    lr: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    # the local optimiser, new for every task: AdamW, or SGD (which keeps the sum of the devices'
    # updates close to the fleet's gradient when their labels are skewed; AdamW's per-coordinate
    # normalisation does not)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # sgd only
    # FedProx (Li et al. 2020): (prox_mu / 2) ||w - w_start||^2 added to the local loss (0: off)
    prox_mu: Annotated[float, Field(ge=0.0, le=1000.0)] = 0.0
    # clip the global norm of each step's gradient over the trained tensors (None: off); bounds a
    # skewed device's step when a high lr or a deep configuration would otherwise blow it up
    max_grad_norm: Annotated[float, Field(gt=0.0)] | None = None


class TrainHyperParams(TrainingSettings):
    """Local optimisation settings for one task: the run's training settings and the task's seed."""

    seed: Annotated[int, Field(ge=0)] = 0


class TrainMetrics(StrictModel):
    """What a device measured while training one task.

    ``compute_s`` is the wall time this host spent; the ``device_*``/``*link_s`` fields are the
    emulated device's times (virtual clock): the calibrated cost of the work scaled by the device's
    speed, plus bytes over its bandwidth; or, where devices are not emulated (``devices.emulate``),
    the times the device measured: the task's compute, message arrival to decoded tensors, and its
    upload at the rate its previous update's publish-to-confirm took (worker/link_times.py).
    """

    train_loss: float
    steps: Annotated[int, Field(ge=0)]
    examples: Annotated[int, Field(ge=0)]
    compute_s: Seconds
    tokens: Annotated[int, Field(ge=0)] = 0  # padded tokens through the gradient path
    lowest_block: Annotated[int, Field(ge=0)] = 0  # the lowest LoRA block (where backward stops)
    embed_tokens: Annotated[int, Field(ge=0)] = 0  # tokens through the embeddings
    prefix_block_tokens: Annotated[int, Field(ge=0)] = (
        0  # sum over frozen prefix blocks of tokens through them
    )
    cached: bool = False  # the frozen-prefix activation cache was used
    device_compute_s: Seconds = 0.0
    downlink_s: Seconds = 0.0
    uplink_s: Seconds = 0.0
    bytes_down: Annotated[int, Field(ge=0)] = 0
    bytes_up: Annotated[int, Field(ge=0)] = 0

    @property
    def device_time_s(self) -> float:
        """The device's time for the task (emulated or measured): download, compute, upload."""
        return self.downlink_s + self.device_compute_s + self.uplink_s


class DeviceProfile(StrictModel):
    """Emulated device capacity: compute speed relative to this host (0.4 = 2.5x slower), link
    bandwidth in Mbit/s, and the relative spread of its per-round compute time (``jitter``)."""

    tier: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")] = "default"
    speed: Annotated[float, Field(gt=0.0, le=1000.0)] = 1.0
    uplink_mbps: Annotated[float, Field(gt=0.0)] = 100.0
    downlink_mbps: Annotated[float, Field(gt=0.0)] = 100.0
    jitter: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0


class CalibrationProbe(StrictModel):
    """A few training steps a measuring worker timed at registration, at one LoRA depth: the work
    counted as :class:`TrainMetrics` counts it, and the real seconds it took (worker/calibration.py)."""

    lowest_block: Annotated[int, Field(ge=0, le=1023)]  # the probe's lowest LoRA block
    steps: Annotated[int, Field(ge=1)]
    examples: Annotated[int, Field(ge=1)]
    tokens: Annotated[int, Field(ge=0)] = 0  # padded tokens through the gradient path
    embed_tokens: Annotated[int, Field(ge=0)] = 0
    prefix_block_tokens: Annotated[int, Field(ge=0)] = 0
    compute_s: Annotated[float, Field(gt=0.0)]  # the trainer's measured seconds (TrainMetrics.compute_s)


class DeviceRegistered(StrictModel):
    KIND: ClassVar[str] = "device_registered"
    run_id: RunId
    device_id: DeviceId
    num_samples: Annotated[int, Field(ge=0)]
    label_histogram: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=100_000)
    profile: DeviceProfile = Field(default_factory=DeviceProfile)
    incarnation: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = "0"
    eval_samples: Annotated[int, Field(ge=0)] = 0  # rows held out for federated evaluation (eval: section)
    # a measuring worker's calibration (devices.emulate false): the orchestrator's first capacity
    # estimate of the device (orchestrator/capacity.py); empty from emulating and older workers
    calibration: Annotated[list[CalibrationProbe], Field(max_length=16)] = Field(default_factory=list)

    @property
    def message_id(self) -> str:
        return f"register:{self.run_id}:{self.device_id}:{self.incarnation}"


class DeviceSlot(StrictModel):
    """A free device slot of a run: a worker without a device id claims one by holding this token."""

    KIND: ClassVar[str] = "device_slot"
    run_id: RunId
    device_id: DeviceId

    @property
    def message_id(self) -> str:
        return f"slot:{self.run_id}:{self.device_id}"


class Heartbeat(StrictModel):
    KIND: ClassVar[str] = "heartbeat"
    run_id: RunId
    device_id: DeviceId
    seq: Annotated[int, Field(ge=0)]
    busy_task_id: TaskId | None = None

    @property
    def message_id(self) -> str:
        return f"heartbeat:{self.run_id}:{self.device_id}:{self.seq}"


class RegisterAgain(StrictModel):
    """The orchestrator to a device whose heartbeat it heard but which the run does not have registered
    (the state store lost a run that was registering): send ``DeviceRegistered`` again."""

    KIND: ClassVar[str] = "register_again"
    run_id: RunId
    device_id: DeviceId
    seq: Annotated[int, Field(ge=0)]  # the heartbeat it answers

    @property
    def message_id(self) -> str:
        return f"register-again:{self.run_id}:{self.device_id}:{self.seq}"


class TrainTask(StrictModel):
    KIND: ClassVar[str] = "train_task"
    task_id: TaskId
    run_id: RunId
    round: Round
    device_id: DeviceId
    plan_version: Annotated[int, Field(ge=0)]
    lora: LoraSpec
    hparams: TrainHyperParams
    adapter: TensorPayload
    issued_at: Seconds
    deadline_at: Seconds

    @property
    def message_id(self) -> str:
        return f"task:{self.task_id}"


class LoraUpdate(StrictModel):
    KIND: ClassVar[str] = "lora_update"
    task_id: TaskId
    run_id: RunId
    round: Round
    device_id: DeviceId
    plan_version: Annotated[int, Field(ge=0)]
    num_samples: Annotated[int, Field(ge=1)]
    adapter: TensorPayload
    metrics: TrainMetrics
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None  # lorafleet/security/signing.py

    @property
    def message_id(self) -> str:
        return f"update:{self.task_id}"


class TaskFailed(StrictModel):
    KIND: ClassVar[str] = "task_failed"
    task_id: TaskId
    run_id: RunId
    round: Round
    device_id: DeviceId
    reason: Annotated[str, Field(max_length=2000)]
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None

    @property
    def message_id(self) -> str:
        return f"failed:{self.task_id}"


class EvalScore(StrictModel):
    """What an evaluation counted: rows, rows right (the class; a causal LM's every response token),
    and the cross-entropy summed over ``loss_count`` terms (rows of a classifier, response tokens of a
    causal LM). Scores of disjoint row sets add up to the score of their union (:meth:`total`)."""

    num_samples: Annotated[int, Field(ge=0)]
    correct: Annotated[int, Field(ge=0)]
    loss_sum: Annotated[float, Field(ge=0.0)]
    loss_count: Annotated[int, Field(ge=0)]

    @model_validator(mode="after")
    def _counts(self) -> EvalScore:
        if self.correct > self.num_samples:
            raise ValueError(f"correct ({self.correct}) exceeds num_samples ({self.num_samples})")
        return self

    @property
    def accuracy(self) -> float:
        """The share of rows right (0 for no rows)."""
        return self.correct / self.num_samples if self.num_samples else 0.0

    @property
    def loss(self) -> float:
        """The mean cross-entropy per loss term."""
        return self.loss_sum / max(self.loss_count, 1)

    @classmethod
    def total(cls, scores: Iterable[EvalScore]) -> EvalScore:
        """The score of the union of the scored rows (sums in the order given)."""
        rows, correct, loss_sum, count = 0, 0, 0.0, 0
        for s in scores:
            rows, correct, loss_sum, count = (
                rows + s.num_samples,
                correct + s.correct,
                loss_sum + s.loss_sum,
                count + s.loss_count,
            )
        return cls(num_samples=rows, correct=correct, loss_sum=loss_sum, loss_count=count)


class EvalTask(StrictModel):
    """The global adapter after a round, for every device to evaluate on its held-out rows (fan-out)."""

    KIND: ClassVar[str] = "eval_task"
    run_id: RunId
    round: Round
    lora: LoraSpec  # the global adapter's spec
    adapter: TensorPayload
    issued_at: Seconds

    @property
    def message_id(self) -> str:
        return f"eval:{self.run_id}:{self.round}"


class EvalResult(StrictModel):
    """A device's evaluation of a round's global adapter on its held-out rows (nothing of the rows)."""

    KIND: ClassVar[str] = "eval_result"
    run_id: RunId
    round: Round
    device_id: DeviceId
    score: EvalScore
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None

    @model_validator(mode="after")
    def _rows(self) -> EvalResult:
        if self.score.num_samples < 1:
            raise ValueError("an evaluation result scores at least one row")
        return self

    @property
    def message_id(self) -> str:
        return f"eval_result:{self.run_id}:{self.round}:{self.device_id}"


class RoundClosed(StrictModel):
    KIND: ClassVar[str] = "round_closed"
    run_id: RunId
    round: Round
    reason: Literal["quorum", "deadline", "global"]  # global: a hierarchical run's global aggregation
    tasks_issued: Annotated[int, Field(ge=0)]
    devices_reported: Annotated[int, Field(ge=0)]
    bytes_up: Annotated[int, Field(ge=0)]
    global_version: Annotated[int, Field(ge=0)]

    @property
    def message_id(self) -> str:
        return f"closed:{self.run_id}:{self.round}"


class RoundEvaluated(StrictModel):
    KIND: ClassVar[str] = "round_evaluated"
    run_id: RunId
    round: Round
    accuracy: Annotated[float, Field(ge=0.0, le=1.0)]
    loss: float
    eval_s: Seconds

    @property
    def message_id(self) -> str:
        return f"evaluated:{self.run_id}:{self.round}"


class ReplanRequest(StrictModel):
    KIND: ClassVar[str] = "replan_request"
    run_id: RunId
    round: Round
    reason: Annotated[str, Field(max_length=500)]

    @property
    def message_id(self) -> str:
        return f"replan:{self.run_id}:{self.round}:{self.reason[:40]}"


class RunFinished(StrictModel):
    KIND: ClassVar[str] = "run_finished"
    run_id: RunId
    reason: Literal["max_rounds", "target_accuracy", "time_budget", "virtual_budget", "aborted", "stopped"]
    rounds_completed: Annotated[int, Field(ge=0)]
    final_accuracy: Annotated[float, Field(ge=0.0, le=1.0)] | None = None

    @property
    def message_id(self) -> str:
        return f"finished:{self.run_id}"


Message = (
    DeviceRegistered
    | DeviceSlot
    | Heartbeat
    | RegisterAgain
    | TrainTask
    | LoraUpdate
    | TaskFailed
    | EvalTask
    | EvalResult
    | RoundClosed
    | RoundEvaluated
    | ReplanRequest
    | RunFinished
)

MESSAGE_TYPES: tuple[type[StrictModel], ...] = (
    DeviceRegistered,
    DeviceSlot,
    Heartbeat,
    RegisterAgain,
    TrainTask,
    LoraUpdate,
    TaskFailed,
    EvalTask,
    EvalResult,
    RoundClosed,
    RoundEvaluated,
    ReplanRequest,
    RunFinished,
)


assert len({m.KIND for m in MESSAGE_TYPES}) == len(MESSAGE_TYPES), "message KINDs must be unique"  # type: ignore[attr-defined]
