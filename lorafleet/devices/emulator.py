"""Emulated device heterogeneity: what a task costs a device on the virtual clock (pure)."""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

from lorafleet.devices.costmodel import CostModel
from schemas.messages import DeviceProfile


def jitter_factor(seed: int, device_id: str, round_no: int, jitter: float) -> float:
    """A deterministic lognormal factor with mean 1 and relative spread ``jitter``."""
    if jitter <= 0.0:
        return 1.0
    digest = hashlib.sha256(f"{seed}:{device_id}:{round_no}".encode()).digest()
    z = random.Random(int.from_bytes(digest[:8], "big")).gauss(0.0, 1.0)
    return math.exp(jitter * z - 0.5 * jitter * jitter)


def transfer_seconds(nbytes: int, mbps: float) -> float:
    """Seconds to move ``nbytes`` at ``mbps`` megabits per second."""
    return nbytes * 8.0 / (mbps * 1e6)


@dataclass(frozen=True)
class DeviceTimes:
    compute_s: float
    downlink_s: float
    uplink_s: float

    @property
    def total_s(self) -> float:
        return self.downlink_s + self.compute_s + self.uplink_s


@dataclass(frozen=True)
class DeviceEmulator:
    """Turns counted work into a device's times: cost-model seconds / speed x jitter, bytes / bandwidth."""

    device_id: str
    profile: DeviceProfile
    cost: CostModel
    seed: int = 0

    def times(
        self,
        *,
        round_no: int,
        lowest_block: int,
        tokens: int,
        embed_tokens: int,
        prefix_block_tokens: int,
        steps: int,
        bytes_down: int,
        bytes_up: int,
    ) -> DeviceTimes:
        host_s = self.cost.train_seconds(
            tokens=tokens,
            lowest_block=lowest_block,
            steps=steps,
            embed_tokens=embed_tokens,
            prefix_block_tokens=prefix_block_tokens,
        )
        factor = jitter_factor(self.seed, self.device_id, round_no, self.profile.jitter)
        return DeviceTimes(
            compute_s=host_s / self.profile.speed * factor,
            downlink_s=transfer_seconds(bytes_down, self.profile.downlink_mbps),
            uplink_s=transfer_seconds(bytes_up, self.profile.uplink_mbps),
        )
