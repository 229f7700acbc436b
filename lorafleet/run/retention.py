"""How long a finished run's records stay in the state store (``state.retention_s``).

Each service sets the expiry of the keys it may write when it finishes, the orchestrator when it ends
the run and the aggregator after its last merge: under the Redis ACL users of
broker_config/redis-users.acl.template neither may write every key of the run, and together they do.
"""

from __future__ import annotations

import logging

from lorafleet.state.base import StateStore
from schemas.errors import StateStoreError

log = logging.getLogger(__name__)


def expire_finished_run(state: StateStore, run_id: str, retention_s: float, service: str) -> bool:
    """Let the run's records expire ``retention_s`` from now (those ``service`` may write); a store
    that refuses is a warning, not a failure of the run. Returns whether the store took it."""
    try:
        state.expire_run(run_id, retention_s)
    except StateStoreError as exc:
        log.warning("%s: cannot set the run's retention (state.retention_s): %s", service, exc)
        return False
    return True
