"""The adapter a round's tasks start from, as the state store holds it: one rule for every service.

A flat round, and the first intra-group round of a hierarchical group, start from the global
adapter. Intra-group round ``k > 1`` starts from its group's adapter as round ``k - 1`` left it:
the group adapter must be at exactly that round. Earlier means the previous round was never merged
(a bug); later means round ``k`` itself was merged already, and what it started from is gone.
"""

from __future__ import annotations

from lorafleet.ml.lora import Tensors
from lorafleet.run.round_numbers import intra_round, parse_round
from lorafleet.state.base import StateStore
from schemas.errors import LorafleetError
from schemas.tensors import tensors_from_bytes


class StartAdapterGone(LorafleetError):
    """The group's adapter has moved past the start of the round (the round was merged already)."""


def start_adapter(state: StateStore, run_id: str, round_no: int) -> Tensors:
    """The tensors round ``round_no``'s tasks start from.

    Raises:
        StartAdapterGone: the group adapter is already past the round's start.
        RuntimeError: the adapter the round starts from was never stored.
    """
    parsed = parse_round(round_no)
    if parsed is None or parsed.step == 1:
        stored = state.get_global_adapter(run_id)
        if stored is None:
            raise RuntimeError(f"run {run_id}: no global adapter in the state store")
        return tensors_from_bytes(stored[1])
    stored = state.get_group_adapter(run_id, parsed.group)
    expected = intra_round(parsed.global_round, parsed.group, parsed.step - 1)
    if stored is not None and stored[0] > expected:
        raise StartAdapterGone(f"round {round_no}: group {parsed.group}'s adapter is at round {stored[0]}")
    if stored is None or stored[0] != expected:
        raise RuntimeError(
            f"round {round_no}: group {parsed.group}'s adapter is at "
            f"{None if stored is None else stored[0]}, not at round {expected}"
        )
    return tensors_from_bytes(stored[1])
