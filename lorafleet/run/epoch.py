"""The run's epoch: a token the orchestrator writes when it initialises the run's state.

Every service that has seen it checks it is still there; a state store that lost the run (a Redis
restart without persistence) no longer has it, and the service raises :class:`StateLost` instead of
carrying on against an empty store (which would start the run again from nothing). A service may also
*fence* a run field it advances (the orchestrator's round, the aggregator's aggregated round): a store
that shows less than the service wrote lost writes in a failover (:class:`StateRolledBack`). A
restore from a snapshot (:mod:`lorafleet.run.recovery`) writes a new ``restored`` token, which tells
every service to take its view from the store again.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from schemas.errors import StateLost, StateRolledBack

EPOCH_FIELD = "epoch"
RESTORED_FIELD = "restored"  # a new token each time the run's state is restored from a snapshot


def new_epoch() -> str:
    return uuid.uuid4().hex


class EpochGuard:
    """Remembers the epoch (and the fenced fields) a service saw; raises when the store stops showing
    them."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.epoch: str | None = None
        self.restored: object = None
        self._fences: dict[str, int] = {}

    def check(self, fields: Mapping[str, object]) -> bool:
        """``fields``: the run's fields as the state store has them now. True when the state was
        restored from a snapshot since the last check (the service must take its view from the store
        again: :meth:`accept` has been called with these fields).

        Raises:
            StateLost: the epoch this service saw is gone or replaced.
            StateRolledBack: a fenced field is behind what this service wrote.
        """
        current = fields.get(EPOCH_FIELD)
        if self.epoch is None:
            self.accept(fields)
            return False
        if current != self.epoch:
            raise StateLost(
                f"the state of run {self.run_id!r} was lost from the state store (epoch {self.epoch} "
                f"{'gone' if current is None else f'replaced by {current}'})"
            )
        if fields.get(RESTORED_FIELD) != self.restored:
            self.accept(fields)
            return True
        for name, value in self._fences.items():
            stored = int(str(fields.get(name, 0)))
            if stored < value:
                raise StateRolledBack(
                    f"the state store shows run {self.run_id!r} at {name} {stored}, behind the {value} "
                    "this service wrote (writes lost in a failover)"
                )
        return False

    def changed(self, fields: Mapping[str, object]) -> bool:
        """Whether :meth:`check` would raise or report a restore for ``fields``; accepts nothing (a
        failed step asks this, then lets the service's own check take the run back)."""
        if self.epoch is None:
            return False
        if fields.get(EPOCH_FIELD) != self.epoch or fields.get(RESTORED_FIELD) != self.restored:
            return True
        return any(int(str(fields.get(name, 0))) < value for name, value in self._fences.items())

    def accept(self, fields: Mapping[str, object]) -> None:
        """Take the store's view as it is now: its epoch, its restore token, no fences."""
        current = fields.get(EPOCH_FIELD)
        self.epoch = None if current is None else str(current)
        self.restored = fields.get(RESTORED_FIELD)
        self._fences.clear()

    def fence(self, name: str, value: int) -> None:
        """This service wrote run field ``name`` = ``value`` (and it succeeded)."""
        self._fences[name] = max(value, self._fences.get(name, value))
