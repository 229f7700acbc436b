"""A measuring worker's upload rate (pure): what its last publish-to-confirm took, per byte.

An update cannot carry its own upload time (the broker confirms it after it is sent), so it carries
its size at the rate the device's previous update went up at; the first update of a worker reports
none (0 s: the orchestrator's estimate keeps its upload rate unknown until the second).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class UploadRate:
    """Seconds per byte of the last confirmed publish (None: nothing published yet)."""

    seconds_per_byte: float | None = None

    def observe(self, nbytes: int, seconds: float) -> None:
        """Record a confirmed publish of ``nbytes`` that took ``seconds`` (publish to confirm)."""
        if nbytes > 0 and seconds >= 0.0:
            self.seconds_per_byte = seconds / nbytes

    def seconds(self, nbytes: int) -> float:
        """The predicted upload seconds of ``nbytes`` (0 before the first publish)."""
        return 0.0 if self.seconds_per_byte is None else self.seconds_per_byte * nbytes
