"""Capacity estimation (pure): a smoothed estimate per device from what its updates reported.

A device's compute is summarised as its *slowdown*: emulated device seconds per cost-model host
second (1 / speed, times whatever jitter it showed); its links as bytes per second each way.
Estimates are exponential moving averages, ``x <- rho * x + (1 - rho) * measurement``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lorafleet.devices.costmodel import CostModel
from schemas.measurement import DeviceMeasurement

DEFAULT_TOKENS_PER_SAMPLE = 32.0


@dataclass(frozen=True)
class DeviceEstimate:
    slowdown: float  # device seconds per cost-model host second
    down_bps: float
    up_bps: float
    tokens_per_sample: float
    rounds_seen: int = 1


def measure(m: DeviceMeasurement, cost: CostModel) -> DeviceEstimate | None:
    """A one-off estimate from a single measurement (None when it carries no usable work)."""
    host_s = cost.train_seconds(
        tokens=m.tokens,
        lowest_block=m.lowest_block,
        steps=m.steps,
        embed_tokens=m.embed_tokens,
        prefix_block_tokens=m.prefix_block_tokens,
    )
    if host_s <= 0 or m.device_compute_s <= 0 or m.examples <= 0:
        return None
    return DeviceEstimate(
        slowdown=m.device_compute_s / host_s,
        down_bps=m.bytes_down / m.downlink_s if m.downlink_s > 0 else float("inf"),
        up_bps=m.bytes_up / m.uplink_s if m.uplink_s > 0 else float("inf"),
        tokens_per_sample=m.tokens / max(1, m.examples),
    )


def update_estimate(
    previous: DeviceEstimate | None, m: DeviceMeasurement, cost: CostModel, rho: float = 0.7
) -> DeviceEstimate | None:
    """Fold a measurement into a device's estimate."""
    fresh = measure(m, cost)
    if fresh is None:
        return previous
    if previous is None:
        return fresh

    def ema(old: float, new: float) -> float:
        if old == float("inf") or new == float("inf"):
            return new if old == float("inf") else old
        return rho * old + (1.0 - rho) * new

    return replace(
        previous,
        slowdown=ema(previous.slowdown, fresh.slowdown),
        down_bps=ema(previous.down_bps, fresh.down_bps),
        up_bps=ema(previous.up_bps, fresh.up_bps),
        tokens_per_sample=ema(previous.tokens_per_sample, fresh.tokens_per_sample),
        rounds_seen=previous.rounds_seen + 1,
    )
