"""Capacity estimation (pure): a smoothed estimate per device from what its updates reported.

A device's compute is summarised as its *slowdown*: emulated device seconds per cost-model host
second (1 / speed, times whatever jitter it showed); its links as bytes per second each way.
Estimates are exponential moving averages, ``x <- rho * x + (1 - rho) * measurement``.

Where devices are not emulated (``devices.emulate``) the same holds with real seconds: the slowdown
is then measured device seconds per cost-model host second, and a device's first estimate comes from
the calibration it registered with (:func:`calibrated`), before any round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from lorafleet.devices.costmodel import CostModel
from schemas.measurement import DeviceMeasurement
from schemas.messages import CalibrationProbe

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


def calibrated(
    probes: Sequence[CalibrationProbe], cost: CostModel, previous: DeviceEstimate | None = None
) -> DeviceEstimate | None:
    """A device's first estimate from its registration's calibration probes: the slowdown over all of
    them (their seconds over their cost-model seconds, so the longer probe weighs more), links unknown
    (infinite: the first update measures them). None when the probes carry no usable work, or when a
    round's measurement made ``previous`` already (the probes are older, and were only a few steps).
    """
    if previous is not None:
        return previous
    usable = [p for p in probes if 0 <= p.lowest_block < cost.num_blocks]
    host_s = sum(
        cost.train_seconds(
            tokens=p.tokens,
            lowest_block=p.lowest_block,
            steps=p.steps,
            embed_tokens=p.embed_tokens,
            prefix_block_tokens=p.prefix_block_tokens,
        )
        for p in usable
    )
    examples = sum(p.examples for p in usable)
    if host_s <= 0 or examples <= 0:
        return None
    return DeviceEstimate(
        slowdown=sum(p.compute_s for p in usable) / host_s,
        down_bps=float("inf"),
        up_bps=float("inf"),
        tokens_per_sample=sum(p.tokens for p in usable) / examples,
        rounds_seen=0,
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
