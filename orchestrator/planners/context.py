"""What every planning strategy sees and returns: ``PlanningContext -> RoundPlan`` (pure)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lorafleet.devices.costmodel import CostModel
from lorafleet.ml.lora import Tensors, parse_key
from orchestrator.planners.legend import DeviceInput, SizeModel
from orchestrator.planners.specs import DevicePlan
from schemas.config import RunConfig

#: safetensors header and envelope overhead per task message, roughly (bytes)
MESSAGE_OVERHEAD_BYTES = 2048


@dataclass(frozen=True)
class PlanningContext:
    round_no: int
    devices: list[DeviceInput]
    num_blocks: int
    config: RunConfig
    cost: CostModel
    sizes: SizeModel


@dataclass(frozen=True)
class RoundPlan:
    plans: list[DevicePlan]
    deadline_s: float = 0.0  # the planner's predicted round time (0: no prediction)


Strategy = Callable[[PlanningContext], RoundPlan]


def size_model(global_tensors: Tensors) -> SizeModel:
    """Bytes per unit of rank per block, and the fixed bytes (head, overhead), of a global adapter."""
    per_rank: dict[int, int] = {}
    fixed = MESSAGE_OVERHEAD_BYTES
    for key, t in global_tensors.items():
        info = parse_key(key)
        if info.block is None or info.rank_axis is None:
            fixed += t.numel() * t.element_size()
            continue
        other = t.shape[1 - info.rank_axis]
        per_rank[info.block] = per_rank.get(info.block, 0) + int(other) * t.element_size()
    return SizeModel(per_rank, fixed)
