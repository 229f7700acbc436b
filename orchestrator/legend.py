"""LEGEND-style planning (pure): a LoRA depth and a rank distribution per device.

Our design after Liu et al., "Adaptive Parameter-Efficient Federated Fine-Tuning on Heterogeneous
Devices" (LEGEND, arXiv 2412.20004; see reference/papers.md §1.5-1.7 for what is confirmed and what
is ours). A device's configuration is a *depth* d (LoRA on the d blocks nearest the output) and a
top rank; ranks fall away from the output (the paper's observation: higher ranks near the output).
The planner picks a round deadline T* and, for every device, the most useful configuration that
finishes within T*, choosing T* to minimise time per unit of training progress:

    score(T*) = T* / sum_i n_i U(c_i(T*)),   U(c) = sum_{l in c} decay^(distance to output) * log(1 + r_l)

Every candidate deadline (each device's time for each of its configurations) is scored exactly with
one sweep over events sorted by time, O(N C log(N C)) for N devices and C configurations each.
Devices without a measurement yet get the cheapest configuration (the profiling round).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lorafleet.costmodel import CostModel
from orchestrator.capacity import DEFAULT_TOKENS_PER_SAMPLE, DeviceEstimate
from orchestrator.planning import DevicePlan
from schemas.messages import LoraSpec


@dataclass(frozen=True)
class LegendOptions:
    depths: tuple[int, ...] | None = None  # None: 1 .. number of blocks
    top_ranks: tuple[int, ...] = (4, 8, 16)
    min_rank: int = 2
    rank_profile: str = "rising"  # "rising" (rank halves every `halving` blocks from the output) | "uniform"
    halving: int = 2
    decay: float = 0.7  # utility weight per block away from the output
    fixed_depth: int | None = None  # ablation: every device at this depth
    cached: bool = True  # devices use the frozen-prefix activation cache
    local_epochs: int = 1
    batch_size: int = 16


@dataclass(frozen=True)
class SizeModel:
    """Bytes a task moves each way: ``fixed_bytes`` plus ``per_rank_bytes[block]`` per unit of rank."""

    per_rank_bytes: dict[int, int]
    fixed_bytes: int

    def payload_bytes(self, layer_ranks: dict[int, int]) -> int:
        return self.fixed_bytes + sum(self.per_rank_bytes[b] * r for b, r in layer_ranks.items())


@dataclass(frozen=True)
class DeviceInput:
    device_id: str
    samples: int
    estimate: DeviceEstimate | None  # None: not measured yet


@dataclass(frozen=True)
class Candidate:
    layer_ranks: dict[int, int]
    utility: float
    bytes: int


@dataclass(frozen=True)
class LegendPlan:
    plans: list[DevicePlan]
    deadline_s: float  # the chosen T* (predicted round time)
    predicted_s: dict[str, float]  # device -> predicted task time


def rank_template(depth: int, top_rank: int, num_blocks: int, options: LegendOptions) -> dict[int, int]:
    """Ranks for the ``depth`` blocks nearest the output, non-decreasing toward it."""
    ranks = {}
    for block in range(num_blocks - depth, num_blocks):
        distance = num_blocks - 1 - block
        if options.rank_profile == "uniform":
            rank = top_rank
        else:
            rank = max(options.min_rank, top_rank >> (distance // max(1, options.halving)))
        ranks[block] = min(rank, top_rank)
    return ranks


def utility(layer_ranks: dict[int, int], num_blocks: int, decay: float) -> float:
    """Diminishing returns in rank, blocks nearer the output worth more."""
    return sum(decay ** (num_blocks - 1 - b) * math.log1p(r) for b, r in layer_ranks.items())


def candidates(num_blocks: int, options: LegendOptions, sizes: SizeModel) -> list[Candidate]:
    depths = (
        (options.fixed_depth,) if options.fixed_depth else (options.depths or tuple(range(1, num_blocks + 1)))
    )
    seen: dict[tuple[tuple[int, int], ...], Candidate] = {}
    for depth in depths:
        if not 1 <= depth <= num_blocks:
            raise ValueError(f"depth {depth} outside 1..{num_blocks}")
        for top in options.top_ranks:
            ranks = rank_template(depth, top, num_blocks, options)
            key = tuple(sorted(ranks.items()))
            seen[key] = Candidate(
                ranks, utility(ranks, num_blocks, options.decay), sizes.payload_bytes(ranks)
            )
    return sorted(seen.values(), key=lambda c: (c.utility, -c.bytes))


def task_seconds(
    estimate: DeviceEstimate, samples: int, cand: Candidate, cost: CostModel, options: LegendOptions
) -> float:
    """Predicted device time of a task: compute at the device's slowdown plus transfers."""
    tokens = int(samples * options.local_epochs * (estimate.tokens_per_sample or DEFAULT_TOKENS_PER_SAMPLE))
    steps = math.ceil(samples / options.batch_size) * options.local_epochs
    compute = (
        cost.task_seconds(
            tokens=tokens, lowest_block=min(cand.layer_ranks), steps=steps, cached=options.cached
        )
        * estimate.slowdown
    )
    return compute + cand.bytes / estimate.down_bps + cand.bytes / estimate.up_bps


def plan_legend(
    devices: Sequence[DeviceInput],
    *,
    num_blocks: int,
    cost: CostModel,
    sizes: SizeModel,
    options: LegendOptions,
    target_modules: list[str],
    alpha_ratio: float = 2.0,
    dropout: float = 0.1,
) -> LegendPlan:
    """Choose every device's configuration (see the module docstring).

    Raises:
        ValueError: no devices, or an impossible depth in ``options``.
    """
    if not devices:
        raise ValueError("no devices to plan")
    cands = candidates(num_blocks, options, sizes)
    cheapest = min(cands, key=lambda c: (len(c.layer_ranks), c.bytes))
    measured = [d for d in devices if d.estimate is not None]
    choice: dict[str, Candidate] = {d.device_id: cheapest for d in devices if d.estimate is None}
    predicted: dict[str, float] = {}
    deadline = 0.0
    if measured:
        times = [
            [task_seconds(d.estimate, d.samples, c, cost, options) for c in cands]  # type: ignore[arg-type]
            for d in measured
        ]
        deadline = _best_deadline(measured, cands, times)
        for d, row in zip(measured, times, strict=True):
            feasible = [i for i, t in enumerate(row) if t <= deadline * (1 + 1e-9)]
            best = max(feasible, key=lambda i: (cands[i].utility, -cands[i].bytes))
            choice[d.device_id] = cands[best]
            predicted[d.device_id] = row[best]
    plans = [
        DevicePlan(
            d.device_id,
            LoraSpec(
                target_modules=list(target_modules),
                layer_ranks=dict(choice[d.device_id].layer_ranks),
                alpha_ratio=alpha_ratio,
                dropout=dropout,
            ),
        )
        for d in devices
    ]
    return LegendPlan(plans, deadline, predicted)


def _best_deadline(devices: Sequence[DeviceInput], cands: list[Candidate], times: list[list[float]]) -> float:
    """The deadline minimising T / sum_i n_i U_i(T), over every candidate T (exact event sweep)."""
    lower = max(min(row) for row in times)  # the slowest device at its cheapest configuration
    events = sorted((t, i, c) for i, row in enumerate(times) for c, t in enumerate(row))
    best_u = [0.0] * len(devices)
    total = 0.0
    best_score, best_t = math.inf, lower
    for t, i, c in events:
        u = cands[c].utility * devices[i].samples
        if u > best_u[i]:
            total += u - best_u[i]
            best_u[i] = u
        if t >= lower and total > 0:
            score = t / total
            if score < best_score - 1e-15:
                best_score, best_t = score, t
    return best_t
