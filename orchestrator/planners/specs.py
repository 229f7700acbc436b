"""What LoRA a device trains, built in one place (pure).

Every planner says *which blocks at which ranks*; :func:`lora_spec` adds the rest of the run's LoRA
settings (target modules, alpha ratio, dropout). :func:`top_ranks` is the "top ``depth`` blocks at
rank ``r``" that FedLoRA, the hierarchical planner, the hetlora baseline and the global adapter use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from schemas.config import LoraConfigSection, RunConfig
from schemas.messages import LoraSpec
from schemas.strategies import StrategyName


@dataclass(frozen=True)
class DevicePlan:
    device_id: str
    lora: LoraSpec


def top_blocks(num_blocks: int, depth: int) -> range:
    """The ``depth`` blocks nearest the output (block ``num_blocks - 1`` is the last)."""
    if not 1 <= depth <= num_blocks:
        raise ValueError(f"depth {depth} outside 1..{num_blocks}")
    return range(num_blocks - depth, num_blocks)


def top_ranks(num_blocks: int, depth: int, rank: int) -> dict[int, int]:
    """LoRA at ``rank`` on the ``depth`` blocks nearest the output."""
    return dict.fromkeys(top_blocks(num_blocks, depth), rank)


def lora_spec(lora: LoraConfigSection, layer_ranks: Mapping[int, int]) -> LoraSpec:
    """The spec of ``layer_ranks`` with the run's target modules, alpha ratio and dropout."""
    return LoraSpec(
        target_modules=list(lora.target_modules),
        layer_ranks=dict(layer_ranks),
        alpha_ratio=lora.alpha_ratio,
        dropout=lora.dropout,
    )


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
    return lora_spec(lora, dict.fromkeys(lora_blocks(lora, num_blocks), lora.rank))


def global_spec(config: RunConfig, num_blocks: int) -> LoraSpec:
    """The LoRA the global adapter carries: every block any plan may use, at the highest rank."""
    if config.strategy in (StrategyName.FEDLORA, StrategyName.FEDRA) or config.hierarchical:
        return uniform_spec(config.lora, num_blocks)
    return lora_spec(config.lora, top_ranks(num_blocks, num_blocks, max(config.legend.top_ranks)))
