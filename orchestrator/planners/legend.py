"""LEGEND-style planning (pure): a LoRA depth and a rank distribution per device.

Our design after Liu et al., "Adaptive Parameter-Efficient Federated Fine-Tuning on Heterogeneous
Devices" (LEGEND, arXiv 2412.20004; the paper confirms per-device depth and rising ranks, the
planner below is ours). A device's configuration is a *depth* d (LoRA on the d blocks nearest the
output) and a top rank; ranks fall away from the output (the paper's observation: higher ranks near
the output). The planner picks a round deadline T* and, for every device, the most useful
configuration that finishes within T*, choosing T* to minimise time per unit of training progress:

    score(T*) = T* / sum_i n_i U(c_i(T*)),   U(c) = sum_{l in c} decay^(distance to output) * log(1 + r_l)

Every candidate deadline (each device's time for each of its configurations) is scored exactly with
one sweep over events sorted by time, O(N C log(N C)) for N devices and C configurations each.
Devices without a measurement yet get the cheapest configuration (the profiling round).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lorafleet.devices.costmodel import CostModel
from orchestrator.capacity import DEFAULT_TOKENS_PER_SAMPLE, DeviceEstimate
from orchestrator.planners.specs import DevicePlan, lora_spec, top_blocks
from schemas.config import LoraConfigSection


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
    for block in top_blocks(num_blocks, depth):
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
    lora: LoraConfigSection = LoraConfigSection(),
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
        times = time_matrix(measured, cands, cost, options)
        utilities = np.array([c.utility for c in cands])
        deadline = best_deadline(times, utilities, np.array([d.samples for d in measured], dtype=np.float64))
        # candidates are sorted by (utility, -bytes): the best feasible one is the last feasible index
        feasible = times <= deadline * (1 + 1e-9)
        best = np.where(feasible, np.arange(len(cands)), -1).max(axis=1)
        for row, (d, index) in enumerate(zip(measured, best.tolist(), strict=True)):
            choice[d.device_id] = cands[index]
            predicted[d.device_id] = float(times[row, index])
    plans = [DevicePlan(d.device_id, lora_spec(lora, choice[d.device_id].layer_ranks)) for d in devices]
    return LegendPlan(plans, deadline, predicted)


def time_matrix(
    devices: Sequence[DeviceInput], cands: list[Candidate], cost: CostModel, options: LegendOptions
) -> np.ndarray:
    """Predicted task time of every device (rows) at every configuration (columns); equals
    :func:`task_seconds` elementwise, vectorised (the cost model is linear in tokens and steps)."""
    est = [d.estimate for d in devices]
    assert all(e is not None for e in est)
    samples = np.array([d.samples for d in devices], dtype=np.float64)
    tps = np.array([e.tokens_per_sample or DEFAULT_TOKENS_PER_SAMPLE for e in est], dtype=np.float64)  # type: ignore[union-attr]
    tokens = np.floor(samples * options.local_epochs * tps)
    steps = np.ceil(samples / options.batch_size) * options.local_epochs
    slowdown = np.array([e.slowdown for e in est], dtype=np.float64)  # type: ignore[union-attr]
    per_byte = np.array([1.0 / e.down_bps + 1.0 / e.up_bps for e in est], dtype=np.float64)  # type: ignore[union-attr]
    lowest = [min(c.layer_ranks) for c in cands]
    per_token = np.array(
        [cost.task_seconds(tokens=1, lowest_block=b, steps=0, cached=options.cached) for b in lowest]
    )
    bytes_ = np.array([c.bytes for c in cands], dtype=np.float64)
    compute = (tokens[:, None] * per_token[None, :] + steps[:, None] * cost.step_s) * slowdown[:, None]
    return np.asarray(compute + per_byte[:, None] * bytes_[None, :])


def best_deadline(times: np.ndarray, utilities: np.ndarray, weights: np.ndarray) -> float:
    """The deadline T minimising T / sum_i w_i max{U_c : times[i, c] <= T}, over every candidate T.

    Exact: each device's best utility is a step function of T that rises at its own configuration
    times; summing every device's rises in time order gives the total at every candidate deadline.
    """
    lower = float(times.min(axis=1).max())  # the slowest device at its cheapest configuration
    order = np.argsort(times, axis=1, kind="stable")
    sorted_t = np.take_along_axis(times, order, axis=1)
    best_u = np.maximum.accumulate(utilities[order] * weights[:, None], axis=1)
    rises = np.diff(best_u, axis=1, prepend=0.0)
    flat_t = sorted_t.ravel()
    by_time = np.argsort(flat_t, kind="stable")
    t = flat_t[by_time]
    total = np.cumsum(rises.ravel()[by_time])
    # several events at one time: only the last of them gives the total at that time
    last = np.append(t[1:] != t[:-1], True)
    ok = last & (t >= lower) & (total > 0)
    if not ok.any():
        return lower
    score = np.where(ok, t / np.where(total > 0, total, 1.0), np.inf)
    return float(t[int(np.argmin(score))])
