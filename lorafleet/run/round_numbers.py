"""Round numbers of hierarchical runs (pure).

A flat run numbers its rounds 1, 2, ... A hierarchical (HierFedLoRA-style) run numbers its *global*
rounds 1, 2, ... the same way, and gives every intra-group round a number of its own, derived from
where it sits, so that re-issuing it after a crash is idempotent:

    intra_round(h, g, k) = h * 10_000 + g * 100 + k      (global round h, group g, its k-th round)

with ``0 <= g < 100`` groups and ``1 <= k < 100`` intra-group rounds per global round. Global rounds
stay below ``INTRA_BASE``, intra-group rounds are at or above it.
"""

from __future__ import annotations

from typing import NamedTuple

from schemas.config import MAX_GLOBAL_ROUNDS, MAX_GROUPS
from schemas.config import MAX_INTRA_ROUNDS as MAX_STEPS

GROUP_SLOT = MAX_STEPS + 1  # 100: a group's intra-group rounds within one global round
INTRA_BASE = MAX_GROUPS * GROUP_SLOT  # 10_000: one global round's intra-group numbers


class IntraRound(NamedTuple):
    global_round: int
    group: int
    step: int


def intra_round(global_round: int, group: int, step: int) -> int:
    """The round number of group ``group``'s ``step``-th round in global round ``global_round``.

    Raises:
        ValueError: any part outside its range.
    """
    if not 1 <= global_round <= MAX_GLOBAL_ROUNDS:
        raise ValueError(f"global round {global_round} outside 1..{MAX_GLOBAL_ROUNDS}")
    if not 0 <= group < MAX_GROUPS:
        raise ValueError(f"group {group} outside 0..{MAX_GROUPS - 1}")
    if not 1 <= step <= MAX_STEPS:
        raise ValueError(f"intra-group round {step} outside 1..{MAX_STEPS}")
    return global_round * INTRA_BASE + group * GROUP_SLOT + step


def parse_round(round_no: int) -> IntraRound | None:
    """The parts of an intra-group round number; None for a global (or flat) round number."""
    if round_no < INTRA_BASE:
        return None
    rest = round_no % INTRA_BASE
    return IntraRound(round_no // INTRA_BASE, rest // GROUP_SLOT, rest % GROUP_SLOT)
