"""Pure planning: which devices train in a round and what LoRA each one trains.

Planners are functions of data: ``(device ids, config, number of blocks) -> [DevicePlan]``.
FedLoRA (FedIT) gives every device LoRA at one rank on the configured blocks.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from schemas.config import LoraConfigSection, RunConfig
from schemas.messages import LoraSpec


@dataclass(frozen=True)
class DevicePlan:
    device_id: str
    lora: LoraSpec


Planner = Callable[[Sequence[str], RunConfig, int], list[DevicePlan]]


def lora_blocks(lora: LoraConfigSection, num_blocks: int) -> list[int]:
    """The blocks the configuration puts LoRA on.

    Raises:
        ValueError: a configured block index is outside the model's ``num_blocks`` blocks.
    """
    if lora.layers == "all":
        return list(range(num_blocks))
    bad = [b for b in lora.layers if b >= num_blocks]
    if bad:
        raise ValueError(f"lora.layers {bad} outside the model's blocks 0..{num_blocks - 1}")
    return sorted(set(lora.layers))


def uniform_spec(lora: LoraConfigSection, num_blocks: int) -> LoraSpec:
    """LoRA at ``lora.rank`` on every configured block."""
    return LoraSpec(
        target_modules=list(lora.target_modules),
        layer_ranks={b: lora.rank for b in lora_blocks(lora, num_blocks)},
        alpha_ratio=lora.alpha_ratio,
        dropout=lora.dropout,
    )


def plan_fedlora(device_ids: Sequence[str], config: RunConfig, num_blocks: int) -> list[DevicePlan]:
    """FedLoRA: every device trains the same LoRA."""
    spec = uniform_spec(config.lora, num_blocks)
    return [DevicePlan(d, spec) for d in device_ids]


def global_spec(config: RunConfig, num_blocks: int) -> LoraSpec:
    """The LoRA the global adapter carries: every block any plan may use, at the highest rank."""
    if config.strategy in ("fedlora", "fedra") or config.hierarchical:
        return uniform_spec(config.lora, num_blocks)
    top = max(config.legend.top_ranks)
    return LoraSpec(
        target_modules=list(config.lora.target_modules),
        layer_ranks=dict.fromkeys(range(num_blocks), top),
        alpha_ratio=config.lora.alpha_ratio,
        dropout=config.lora.dropout,
    )


def sample_devices(device_ids: Sequence[str], fraction: float, round_no: int, seed: int) -> list[str]:
    """A seeded sample of ``ceil(fraction * n)`` devices for a round (all of them at 1.0), sorted."""
    ordered = sorted(device_ids)
    if fraction >= 1.0 or not ordered:
        return ordered
    count = max(1, math.ceil(fraction * len(ordered) - 1e-9))  # 0.07 * 100 is 7.000000000000001
    digest = hashlib.sha256(f"{seed}:{round_no}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return sorted(rng.sample(ordered, count))


def quorum_size(num_tasks: int, fraction: float) -> int:
    """How many reports close a round of ``num_tasks`` tasks."""
    if num_tasks < 1:
        raise ValueError("a round needs at least one task")
    return max(1, min(num_tasks, math.ceil(fraction * num_tasks - 1e-9)))


def task_id(run_id: str, round_no: int, device_id: str) -> str:
    """The id of a device's task in a round (deterministic, so re-issuing is idempotent)."""
    return f"{run_id}:{round_no}:{device_id}"
