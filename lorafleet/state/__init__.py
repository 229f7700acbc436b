"""The StateStore port and its adapters. Only :mod:`lorafleet.state.redis` imports redis."""

from lorafleet.state.base import RecordResult, RoundInfo, StateStore, StateStoreError
from lorafleet.state.memory import InMemoryStateStore

__all__ = ["InMemoryStateStore", "RecordResult", "RoundInfo", "StateStore", "StateStoreError"]
