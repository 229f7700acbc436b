"""The run's epoch: a token the orchestrator writes when it initialises the run's state.

Every service that has seen it checks it is still there; a state store that lost the run (a Redis
restart without persistence) no longer has it, and the service stops with :class:`StateLost`
instead of carrying on against an empty store (which would start the run again from nothing).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from schemas.errors import StateLost

EPOCH_FIELD = "epoch"


def new_epoch() -> str:
    return uuid.uuid4().hex


class EpochGuard:
    """Remembers the epoch a service saw and raises when the store stops showing it."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.epoch: str | None = None

    def check(self, fields: Mapping[str, object]) -> None:
        """``fields``: the run's fields as the state store has them now.

        Raises:
            StateLost: the epoch this service saw is gone or replaced.
        """
        current = fields.get(EPOCH_FIELD)
        if self.epoch is None:
            self.epoch = None if current is None else str(current)
            return
        if current != self.epoch:
            raise StateLost(
                f"the state of run {self.run_id!r} was lost from the state store (epoch {self.epoch} "
                f"{'gone' if current is None else f'replaced by {current}'}); stopping rather than "
                "beginning the run again: restart the run, or keep Redis persistent (append-only)"
            )
