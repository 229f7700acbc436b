"""The baselines LEGEND-style and HierFedLoRA-style planning are measured against (pure).

* ``fedlora``: FedIT, every device LoRA on all configured blocks at one rank.
* ``hetlora``: all blocks; per-device rank by capacity (fastest third the highest rank), merged
  with zero-padding and norm weights (aggregator/merge/hetlora.py).
* ``fedra``: each round a random subset of blocks per device, as many as LEGEND would give it
  (same budget, random placement instead of top-aligned), one rank.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from orchestrator.planners.context import PlanningContext, RoundPlan
from orchestrator.planners.legend_strategies import strategy_legend_uniform_rank
from orchestrator.planners.specs import DevicePlan, lora_spec, top_ranks, uniform_spec
from schemas.config import RunConfig


def plan_fedlora(device_ids: Sequence[str], config: RunConfig, num_blocks: int) -> list[DevicePlan]:
    """FedLoRA: every device trains the same LoRA."""
    spec = uniform_spec(config.lora, num_blocks)
    return [DevicePlan(d, spec) for d in device_ids]


def strategy_fedlora(ctx: PlanningContext) -> RoundPlan:
    return RoundPlan(plan_fedlora([d.device_id for d in ctx.devices], ctx.config, ctx.num_blocks))


def strategy_hetlora(ctx: PlanningContext) -> RoundPlan:
    """All blocks; rank by capacity: measured devices split in thirds by slowdown, fastest highest."""
    ranks = sorted(ctx.config.legend.top_ranks, reverse=True)
    measured = sorted(
        (d for d in ctx.devices if d.estimate is not None),
        key=lambda d: d.estimate.slowdown,  # type: ignore[union-attr]
    )
    rank_of = {
        d.device_id: ranks[min(len(ranks) - 1, i * len(ranks) // max(1, len(measured)))]
        for i, d in enumerate(measured)
    }
    every_block = ctx.num_blocks
    plans = [
        DevicePlan(d.device_id, lora_spec(ctx.config.lora, top_ranks(every_block, every_block, rank)))
        for d in ctx.devices
        for rank in [rank_of.get(d.device_id, ranks[-1])]
    ]
    return RoundPlan(plans)


def strategy_fedra(ctx: PlanningContext) -> RoundPlan:
    """Random blocks, LEGEND's per-device budget of blocks, one rank (``lora.rank``)."""
    budget = strategy_legend_uniform_rank(ctx)
    lora = ctx.config.lora
    plans = []
    for plan in budget.plans:
        digest = hashlib.sha256(f"{ctx.config.seed}:{ctx.round_no}:{plan.device_id}".encode()).digest()
        blocks = random.Random(int.from_bytes(digest[:8], "big")).sample(
            range(ctx.num_blocks), len(plan.lora.layer_ranks)
        )
        plans.append(DevicePlan(plan.device_id, lora_spec(lora, dict.fromkeys(sorted(blocks), lora.rank))))
    return RoundPlan(plans)
