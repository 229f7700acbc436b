"""What a device shares of its label histogram (``privacy.label_histogram``).

``exact``: the counts. ``noisy``: each count plus Laplace noise of scale ``1/epsilon``, rounded and
clamped at zero: the Laplace mechanism on a histogram whose counts change by at most one when one row
is added or removed, so the shared histogram is epsilon-differentially private towards the server
(local DP of the histogram only; the updates are not protected by it). The noise is seeded by the
run, its seed and the device, so a restarted worker shares the same histogram (no averaging of fresh
draws). ``off``: an empty histogram (the row count is still shared).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

HistogramMode = Literal["exact", "noisy", "off"]


def laplace(rng: random.Random, scale: float) -> float:
    """One draw of Laplace(0, ``scale``): the difference of two exponential draws of mean ``scale``."""
    return rng.expovariate(1.0 / scale) - rng.expovariate(1.0 / scale)


def noise_seed(run_id: str, seed: int, device_id: str) -> str:
    """The seed of a device's histogram noise (a string: ``random`` hashes it stably, with SHA-512)."""
    return f"label-histogram:{run_id}:{seed}:{device_id}"


def shared_histogram(counts: Sequence[int], mode: HistogramMode, *, epsilon: float, seed: str) -> list[int]:
    """The histogram a device registers with under ``mode`` (see the module docstring).

    Raises:
        ValueError: ``epsilon`` is not positive under ``noisy``.
    """
    if mode == "off":
        return []
    if mode == "exact":
        return [int(c) for c in counts]
    if epsilon <= 0:
        raise ValueError(f"privacy.epsilon must be positive, got {epsilon}")
    rng = random.Random(seed)
    return [max(0, round(c + laplace(rng, 1.0 / epsilon))) for c in counts]
