"""Redis adapter of the StateStore port: the only module of lorafleet that imports redis.

Every multi-key decision (open a round, count an update and close on quorum, close on deadline, mark
aggregated, store a newer global adapter) is one Lua script, so it is atomic on the server and safe under
any number of concurrent callers, threads or processes. Keys come from :mod:`lorafleet.state.keys` only.

Retries are configured on the connection pool (a hand-built pool without ``retry=`` would not retry at
all). A retried command whose first attempt did run but whose reply was lost must not change the answer,
so every state-changing script takes a per-call nonce and records in the round's state hash which call
opened it (``opened_by``), counted each task (``counted_by:<task_id>``), closed it (``closed_by``) and
aggregated it (``aggregated_by``). A replay of the same call returns the first answer instead of a second
effect: ``counted`` stays ``counted`` (no second ``update_counted``), ``closed_now`` and the rounds a sweep
closed are not lost, ``open_round``/``mark_aggregated`` still say True. Known limits of such a replay:
a non-counted outcome (duplicate, late, ...) bumps its ``update_*`` counter twice, :meth:`register_device`
may answer False for a new device, and :meth:`incr_counter` (HINCRBY) may count twice; these are
diagnostics. Whatever the replies, the pending-aggregation ZSET (the outbox) holds every closed round.

Redis exceptions never leave this module: they become :class:`lorafleet.state.base.StateStoreError`.
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelManagedConnection

from lorafleet.state import keys
from lorafleet.state.base import (
    CloseReason,
    GlobalRoundInfo,
    GlobalRoundStatus,
    GroupProgress,
    RecordOutcome,
    RecordResult,
    RoundInfo,
    RoundStatus,
    StateStore,
    StateStoreError,
)
from lorafleet.state.redis_url import parse_redis_url
from schemas.config import MAX_GROUPS
from schemas.errors import StateStoreRefused

__all__ = ["RedisStateStore"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

_HSET_CHUNK = 1000  # ARGV items per HSET inside a script (an even number: field/value pairs)

# Shared Lua helper: HSET ARGV[first..last] (field/value pairs) in chunks (unpack has a stack limit).
_LUA_HSET_RANGE = f"""
local function hset_range(key, first, last)
  local i = first
  while i <= last do
    local j = math.min(i + {_HSET_CHUNK - 1}, last)
    redis.call('HSET', key, unpack(ARGV, i, j))
    i = j + 1
  end
end
"""

# KEYS: state, tasks, specs, rounds index, open deadlines
# ARGV: round, quorum, deadline_ms, now_ms, nonce, n_tasks, task pairs..., spec pairs...
_OPEN_ROUND = (
    _LUA_HSET_RANGE
    + """
local opened_by = redis.call('HGET', KEYS[1], 'opened_by')
if opened_by then
  if opened_by == ARGV[5] then return 1 end  -- replay of this very call
  return 0
end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'status', 'open', 'quorum', ARGV[2], 'deadline_ms', ARGV[3],
           'opened_ms', ARGV[4], 'reported', 0, 'opened_by', ARGV[5])
local task_end = 6 + 2 * tonumber(ARGV[6])
hset_range(KEYS[2], 7, task_end)
hset_range(KEYS[3], task_end + 1, #ARGV)
redis.call('ZADD', KEYS[4], ARGV[1], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[3], ARGV[1])
return 1
"""
)

# KEYS: state, tasks, updates, open deadlines, pending, counters
# ARGV: task_id, device_id, update bytes, now_ms, round, nonce
# Checks in the twin's order: unknown_task, wrong_device, duplicate, late, recovered, counted.
_RECORD_UPDATE = """
local function finish(outcome, reported, closed)
  redis.call('HINCRBY', KEYS[6], 'update_' .. outcome, 1)
  return {outcome, reported, closed}
end
local st = redis.call('HMGET', KEYS[1], 'status', 'quorum', 'reported')
if not st[1] then return finish('unknown_task', 0, 0) end
local reported = tonumber(st[3])
local device = redis.call('HGET', KEYS[2], ARGV[1])
if not device then return finish('unknown_task', reported, 0) end
if device ~= ARGV[2] then return finish('wrong_device', reported, 0) end
local nonce = ARGV[6]
local existing = redis.call('HGET', KEYS[3], ARGV[1])
if existing then
  local memo = redis.call('HGET', KEYS[1], 'counted_by:' .. ARGV[1])
  if memo and string.sub(memo, 1, #nonce + 1) == nonce .. ':' then
    -- replay of this very call (client retry after a lost reply): the first answer, no second count
    local closer = redis.call('HGET', KEYS[1], 'closed_by')
    local closed = 0
    if closer == nonce then closed = 1 end
    return {'counted', tonumber(string.sub(memo, #nonce + 2)), closed}
  end
  if redis.call('HGET', KEYS[1], 'recovered_by:' .. ARGV[1]) == nonce then
    return {'recovered', reported, 0}  -- replay of the call that recovered it
  end
  if #existing > 0 or #ARGV[3] == 0 then return finish('duplicate', reported, 0) end
  if st[1] ~= 'open' then return finish('late', reported, 0) end
  -- a real update for a task reported empty (its device was dropped or failed): it replaces the
  -- empty report while the round is open; the round's count does not change
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
  redis.call('HSET', KEYS[1], 'recovered_by:' .. ARGV[1], nonce)
  return finish('recovered', reported, 0)
end
if st[1] ~= 'open' then return finish('late', reported, 0) end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
reported = reported + 1
redis.call('HSET', KEYS[1], 'reported', reported, 'counted_by:' .. ARGV[1], nonce .. ':' .. reported)
local closed = 0
if reported >= tonumber(st[2]) then
  redis.call('HSET', KEYS[1], 'status', 'closed', 'closed_ms', ARGV[4], 'close_reason', 'quorum',
             'closed_by', nonce)
  redis.call('ZREM', KEYS[4], ARGV[5])
  redis.call('ZADD', KEYS[5], ARGV[5], ARGV[5])
  closed = 1
end
return finish('counted', reported, closed)
"""

# KEYS: open deadlines, pending, state of each candidate round   ARGV: now_ms, nonce, candidate rounds...
_CLOSE_EXPIRED = """
local closed = {}
for i = 3, #KEYS do
  local r = ARGV[i]
  local st = redis.call('HMGET', KEYS[i], 'status', 'deadline_ms', 'closed_by')
  if st[1] == 'open' and tonumber(st[2]) <= tonumber(ARGV[1]) then
    redis.call('HSET', KEYS[i], 'status', 'closed', 'closed_ms', ARGV[1], 'close_reason', 'deadline',
               'closed_by', ARGV[2])
    redis.call('ZREM', KEYS[1], r)
    redis.call('ZADD', KEYS[2], r, r)
    table.insert(closed, r)
  elseif st[1] and st[1] ~= 'open' and st[3] == ARGV[2] then
    table.insert(closed, r)  -- replay of this very call
  elseif st[1] ~= 'open' then
    redis.call('ZREM', KEYS[1], r)  -- not open any more: drop a stale deadline entry
  end
end
return closed
"""

# KEYS: state, pending   ARGV: round, global_version, nonce
_MARK_AGGREGATED = """
local st = redis.call('HMGET', KEYS[1], 'status', 'aggregated_by')
if st[1] == 'closed' then
  redis.call('HSET', KEYS[1], 'status', 'aggregated', 'global_version', ARGV[2], 'aggregated_by', ARGV[3])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 1
end
if st[1] == 'aggregated' and st[2] == ARGV[3] then return 1 end  -- replay of this very call
return 0
"""

# KEYS: state, updates   ARGV: task, receipt, task, receipt, ...
_COMPACT_UPDATES = """
if redis.call('HGET', KEYS[1], 'status') ~= 'aggregated' then return 0 end
for i = 1, #ARGV, 2 do
  local stored = redis.call('HGET', KEYS[2], ARGV[i])
  if stored and #stored > 0 and #ARGV[i + 1] > 0 then redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
end
return 1
"""

# KEYS: global (or a group's) adapter hash   ARGV: version, data
_PUT_GLOBAL = """
local current = redis.call('HGET', KEYS[1], 'version')
if current and tonumber(current) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'data', ARGV[2])
return 1
"""

# KEYS: metrics hash   ARGV: round, expected JSON ('' when absent), new JSON  (compare-and-set)
_CAS_FIELD = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if (current or '') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""

# Shared Lua helpers of the hierarchy scripts: is every group of a global round at its target, and
# make the round ready (once; a replay with the same nonce sees its own readiness again).
_LUA_READY = """
local function all_reached(key)
  local flat = redis.call('HGETALL', key)
  local targets, counts = {}, {}
  for i = 1, #flat, 2 do
    local f, v = flat[i], flat[i + 1]
    if string.sub(f, 1, 7) == 'target:' then targets[string.sub(f, 8)] = tonumber(v)
    elseif string.sub(f, 1, 6) == 'count:' then counts[string.sub(f, 7)] = tonumber(v) end
  end
  for g, t in pairs(targets) do
    if (counts[g] or 0) < t then return false end
  end
  return true
end
local function maybe_ready(key, pending, h, nonce)
  if redis.call('HGET', key, 'status') == 'open' and all_reached(key) then
    redis.call('HSET', key, 'status', 'ready', 'ready_by', nonce)
    redis.call('ZADD', pending, h, h)
    return 1
  end
  if redis.call('HGET', key, 'ready_by') == nonce then return 1 end
  return 0
end
"""

# KEYS: global round state, global rounds index   ARGV: global round, nonce, group/target pairs...
_OPEN_GLOBAL = """
local opened_by = redis.call('HGET', KEYS[1], 'opened_by')
if opened_by then
  if opened_by == ARGV[2] then return 1 end
  return 0
end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'status', 'open', 'opened_by', ARGV[2])
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], 'target:' .. ARGV[i], ARGV[i + 1], 'count:' .. ARGV[i], 0)
end
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[1])
return 1
"""

# KEYS: global round state, pending global   ARGV: global round, group, round, nonce
# Returns {counted, count, target, ready_now}; {0, 0, 0, 0} for an unknown global round or group.
_RECORD_GROUP = (
    _LUA_READY
    + """
local g = ARGV[2]
local st = redis.call('HMGET', KEYS[1], 'status', 'target:' .. g)
if not st[1] or not st[2] then return {0, 0, 0, 0} end
local memo = redis.call('HGET', KEYS[1], 'counted:' .. ARGV[3])
local counted = 0
if not memo then
  redis.call('HSET', KEYS[1], 'counted:' .. ARGV[3], ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'count:' .. g, 1)
  counted = 1
elseif memo == ARGV[4] then
  counted = 1  -- replay of this very call
end
local ready = maybe_ready(KEYS[1], KEYS[2], ARGV[1], ARGV[4])
local now = redis.call('HMGET', KEYS[1], 'count:' .. g, 'target:' .. g)
return {counted, tonumber(now[1]), tonumber(now[2]), ready}
"""
)

# KEYS: global round state, pending global   ARGV: global round, group, target, nonce
_SET_TARGET = (
    _LUA_READY
    + """
local g = ARGV[2]
local st = redis.call('HMGET', KEYS[1], 'status', 'target:' .. g, 'count:' .. g)
if not st[1] or not st[2] then return {0, 0, 0, 0} end
if st[1] == 'open' then
  redis.call('HSET', KEYS[1], 'target:' .. g, math.max(tonumber(ARGV[3]), tonumber(st[3]), 1))
end
local ready = maybe_ready(KEYS[1], KEYS[2], ARGV[1], ARGV[4])
local now = redis.call('HMGET', KEYS[1], 'count:' .. g, 'target:' .. g)
return {0, tonumber(now[1]), tonumber(now[2]), ready}
"""
)

# KEYS: global round state, pending global, hierarchy   ARGV: global round, nonce
_MARK_GLOBAL = """
local st = redis.call('HMGET', KEYS[1], 'status', 'aggregated_by')
if st[1] == 'ready' then
  redis.call('HSET', KEYS[1], 'status', 'aggregated', 'aggregated_by', ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HINCRBY', KEYS[3], 'global_count', 1)
  return 1
end
if st[1] == 'aggregated' and st[2] == ARGV[2] then return 1 end  -- replay of this very call
return 0
"""

_ROUND_FIELDS = ("status", "quorum", "deadline_ms", "opened_ms", "reported", "closed_ms", "close_reason",
                 "global_version")  # fmt: skip
_CAS_ATTEMPTS = 100


def _translated(
    method: Callable[Concatenate[RedisStateStore, P], T],
) -> Callable[Concatenate[RedisStateStore, P], T]:
    """Turn any redis exception into StateStoreError (after the pool's retries were spent)."""

    @functools.wraps(method)
    def wrapper(self: RedisStateStore, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(self, *args, **kwargs)
        except redis.RedisError as exc:
            message = f"{method.__name__}: {type(exc).__name__}: {exc}"
            if isinstance(exc, redis.exceptions.NoPermissionError) or "NOPERM" in str(exc):
                raise StateStoreRefused(message) from exc  # in MULTI/EXEC it comes as EXECABORT
            raise StateStoreError(message) from exc

    return cast("Callable[Concatenate[RedisStateStore, P], T]", wrapper)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _opt_int(value: bytes | None) -> int | None:
    return None if value is None else int(value)


def _nonce() -> str:
    return uuid.uuid4().hex


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "\\*?[]" else c for c in text)


def _flatten(mapping: dict[str, str]) -> list[str]:
    return [item for pair in mapping.items() for item in pair]


_SNAPSHOT_FORMAT = "lorafleet-redis-snapshot-1"  # DUMP payloads: RESTORE needs the same or a newer Redis

#: how long a call waits for an unreachable Redis (a restart, a failover) before it fails
OUTAGE_S = 90.0


class _OutageRetry(Retry):
    """Retry a command on connection errors until ``outage_s`` have passed since its first try.

    The same command is sent again (the scripts' nonces are in its arguments), so a call whose reply
    was lost is answered from its first execution, never applied twice."""

    def __init__(self, outage_s: float) -> None:
        super().__init__(ExponentialBackoff(cap=1.0, base=0.05), retries=-1)
        self.outage_s = outage_s

    def call_with_retry(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        started = time.monotonic()
        failures = 0
        while True:
            try:
                return do()
            except self._supported_errors as error:
                if is_retryable is not None and not is_retryable(error):
                    raise
                failures += 1
                if with_failure_count:
                    fail(error, failures)
                else:
                    fail(error)
                waited = time.monotonic() - started
                if waited >= self.outage_s:
                    raise
                if failures == 1:
                    log.warning("redis unreachable (%s); retrying for up to %.0f s", error, self.outage_s)
                time.sleep(min(self._backoff.compute(failures), max(0.0, self.outage_s - waited)))


class _DiscoveringConnection(SentinelManagedConnection):
    """A connection to the Sentinels' primary that asks them again on *every* (re)connect.

    redis-py's own only does so in ``connect()``; a command sent on a dropped connection reconnects
    through ``connect_check_health()`` to the address it had. After a failover whose old primary came
    back as a replica on the same port, every retry went back to it and got READONLY, and the service
    gave up after the 90 s outage window (tests/integration/test_redis_sentinel.py, 1 run in 3)."""

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if self._sock is None and self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


class _QuorumSentinel(Sentinel):
    """Asks every Sentinel, not the first that answers: a Sentinel that missed a failover (a loaded
    host, a partition) still names the old primary, which, back as a replica, answers every write with
    READONLY; redis-py would keep asking that one Sentinel. The candidates are the primaries the
    Sentinels report, newest configuration epoch (then most Sentinels) first, that the Sentinel saw
    report the master role; the primary is the first that itself answers ``ROLE`` with ``master``
    (a Sentinel's view of the role is up to its INFO period old: a full run once kept writing to a
    demoted primary for 90 s). A user the ACL refuses ``ROLE`` takes the Sentinels' word."""

    def discover_master(self, service_name: str) -> tuple[str, int]:
        ranked: dict[tuple[str, int], tuple[int, int]] = {}  # address -> (config epoch, votes)
        for sentinel in self.sentinels:
            try:
                masters = sentinel.sentinel_masters()
            except (redis.ConnectionError, redis.TimeoutError):
                continue
            state = masters.get(service_name) if isinstance(masters, dict) else None
            if not state or not self.check_master_state(state, service_name):  # type: ignore[no-untyped-call]
                continue
            if state.get("role-reported", "master") != "master":
                continue  # this Sentinel's primary says it is a replica now: its view is stale
            address = (str(state["ip"]), int(state["port"]))
            epoch, votes = ranked.get(address, (0, 0))
            ranked[address] = (max(epoch, int(state.get("config-epoch", 0))), votes + 1)
        for address in sorted(ranked, key=lambda a: ranked[a], reverse=True):
            if self._confirms_master(address):
                return address
        raise MasterNotFoundError(f"No master found for {service_name!r}")

    def _confirms_master(self, address: tuple[str, int]) -> bool:
        kwargs = self.connection_kwargs
        probe = redis.Redis(
            host=address[0],
            port=address[1],
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            socket_timeout=kwargs.get("socket_connect_timeout", 2.0),
            socket_connect_timeout=kwargs.get("socket_connect_timeout", 2.0),
        )
        try:
            role = probe.role()
        except redis.ResponseError:
            return True  # NOPERM: this user may not ask (broker_config's users may)
        except (redis.ConnectionError, redis.TimeoutError):
            return False
        finally:
            probe.close()
        first = role[0] if isinstance(role, list | tuple) and role else b""
        return bool(first in (b"master", "master"))


class _Script:
    """A registered Lua script; with ``replicas`` > 0 each call is followed, on the same connection (one
    pipeline), by ``WAIT replicas timeout_ms``: the call returns once that many replicas have its
    writes, or the timeout passed (then it goes on, and says so: availability over durability)."""

    _warned_at = 0.0

    def __init__(self, client: redis.Redis, source: str, *, replicas: int, timeout_ms: int) -> None:
        self._client = client
        self._script = client.register_script(source)
        self._replicas = replicas
        self._timeout_ms = timeout_ms

    def __call__(self, keys: list[str], args: list[Any]) -> Any:
        if not self._replicas:
            return self._script(keys=keys, args=args)
        pipe = self._client.pipeline(transaction=False)
        self._script(keys=keys, args=args, client=pipe)
        pipe.wait(self._replicas, self._timeout_ms)
        result, acked = pipe.execute()
        if int(acked) < self._replicas and time.monotonic() - _Script._warned_at > 60.0:
            _Script._warned_at = time.monotonic()
            log.warning(
                "redis: a write reached %d of the %d replicas asked for within %d ms (going on)",
                int(acked),
                self._replicas,
                self._timeout_ms,
            )
        return result


class RedisStateStore:
    """:class:`lorafleet.state.base.StateStore` on Redis (one instance per process; thread-safe).

    A call rides out an unreachable Redis for up to ``outage_s`` (retrying the same command), then
    fails with :class:`StateStoreError`.
    """

    def __init__(
        self,
        url: str,
        *,
        socket_timeout: float = 5.0,
        socket_connect_timeout: float = 2.0,
        health_check_interval: int = 30,
        max_connections: int = 32,
        outage_s: float = OUTAGE_S,
    ) -> None:
        target = parse_redis_url(url)
        # Retry lives ON THE POOL: a retry= given to Redis(connection_pool=...) is ignored.
        options: dict[str, Any] = {
            "max_connections": max_connections,
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_connect_timeout,
            "health_check_interval": health_check_interval,
            "retry": _OutageRetry(outage_s),
            "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
            "decode_responses": False,
        }
        if target.sentinels:
            # the pool asks the Sentinels for the primary on every new connection, and a connection to
            # a primary demoted in a failover fails (ReadOnlyError -> ConnectionError): both retried
            # through Any: redis-py's Sentinel is untyped before 8.x and typed after, so no ignore fits both
            sentinel: Any = cast(Any, _QuorumSentinel)(
                target.sentinels,
                sentinel_kwargs={
                    "socket_timeout": socket_connect_timeout,
                    "socket_connect_timeout": socket_connect_timeout,
                    "password": target.sentinel_password,
                },
                username=target.username,  # for its ROLE probe of the candidates
                password=target.password,
                socket_connect_timeout=socket_connect_timeout,
            )
            assert target.service is not None
            client = sentinel.master_for(
                target.service,
                redis_class=redis.Redis,
                connection_class=_DiscoveringConnection,
                db=target.db,
                username=target.username,
                password=target.password,
                **options,
            )
        else:
            client = redis.Redis(connection_pool=redis.ConnectionPool.from_url(target.url, **options))
        self._init(client, owns_client=True, wait=(target.wait_replicas, target.wait_timeout_ms))

    @classmethod
    def from_client(cls, client: redis.Redis) -> RedisStateStore:
        """Wrap an existing client (its pool must return bytes; its retry policy is the caller's)."""
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("RedisStateStore needs a client with decode_responses=False")
        store = cls.__new__(cls)
        store._init(client, owns_client=False)
        return store

    def _init(self, client: redis.Redis, *, owns_client: bool, wait: tuple[int, int] = (0, 0)) -> None:
        self._r = client
        self._owns_client = owns_client

        def script(source: str) -> _Script:
            return _Script(client, source, replicas=wait[0], timeout_ms=wait[1])

        self._open_round = script(_OPEN_ROUND)
        self._record_update = script(_RECORD_UPDATE)
        self._compact_updates = script(_COMPACT_UPDATES)
        self._close_expired = script(_CLOSE_EXPIRED)
        self._mark_aggregated = script(_MARK_AGGREGATED)
        self._put_global = script(_PUT_GLOBAL)
        self._cas_field = script(_CAS_FIELD)
        self._open_global = script(_OPEN_GLOBAL)
        self._record_group = script(_RECORD_GROUP)
        self._set_target = script(_SET_TARGET)
        self._mark_global = script(_MARK_GLOBAL)

    # -- run ----------------------------------------------------------------------------------------
    @_translated
    def put_run_field(self, run_id: str, name: str, value: Any) -> None:
        self._r.hset(keys.run_meta(run_id), name, json.dumps(value))

    @_translated
    def get_run_fields(self, run_id: str) -> dict[str, Any]:
        raw = cast(dict[bytes, bytes], self._r.hgetall(keys.run_meta(run_id)))
        return {_s(k): json.loads(v) for k, v in raw.items()}

    # -- devices ------------------------------------------------------------------------------------
    @_translated
    def register_device(self, run_id: str, device_id: str, info: dict[str, Any]) -> bool:
        """True if the device was new. (A pool retry after a lost reply may answer False for a new one.)"""
        return bool(self._r.hset(keys.devices(run_id), device_id, json.dumps(info)))

    @_translated
    def get_devices(self, run_id: str) -> dict[str, dict[str, Any]]:
        raw = cast(dict[bytes, bytes], self._r.hgetall(keys.devices(run_id)))
        return {_s(k): json.loads(v) for k, v in raw.items()}

    @_translated
    def get_device(self, run_id: str, device_id: str) -> dict[str, Any] | None:
        raw = cast(bytes | None, self._r.hget(keys.devices(run_id), device_id))
        return None if raw is None else cast(dict[str, Any], json.loads(raw))

    @_translated
    def count_devices(self, run_id: str) -> int:
        return int(self._r.hlen(keys.devices(run_id)))

    @_translated
    def touch_device(self, run_id: str, device_id: str, expires_ms: int) -> None:
        self._r.zadd(keys.leases(run_id), {device_id: int(expires_ms)})

    @_translated
    def expired_devices(self, run_id: str, now_ms: int) -> list[str]:
        raw = cast(list[bytes], self._r.zrangebyscore(keys.leases(run_id), "-inf", int(now_ms)))
        return sorted(_s(d) for d in raw)

    # -- rounds -------------------------------------------------------------------------------------
    @_translated
    def open_round(
        self,
        run_id: str,
        round_no: int,
        tasks: dict[str, str],
        specs: dict[str, str],
        quorum: int,
        deadline_ms: int,
        now_ms: int,
    ) -> bool:
        if quorum < 1:
            raise ValueError("quorum must be at least 1")
        round_no = int(round_no)
        args: list[str | int] = [round_no, int(quorum), int(deadline_ms), int(now_ms), _nonce(), len(tasks)]
        opened = self._open_round(
            keys=[
                keys.round_state(run_id, round_no),
                keys.round_tasks(run_id, round_no),
                keys.round_specs(run_id, round_no),
                keys.rounds_index(run_id),
                keys.open_deadlines(run_id),
            ],
            args=[*args, *_flatten(tasks), *_flatten(specs)],
        )
        return bool(opened)

    @_translated
    def get_round(self, run_id: str, round_no: int) -> RoundInfo | None:
        pipe = self._r.pipeline(transaction=True)
        pipe.hmget(keys.round_state(run_id, round_no), list(_ROUND_FIELDS))
        pipe.hgetall(keys.round_tasks(run_id, round_no))
        state, tasks = cast(tuple[list[bytes | None], dict[bytes, bytes]], tuple(pipe.execute()))
        fields = dict(zip(_ROUND_FIELDS, state, strict=True))
        if fields["status"] is None:
            return None
        quorum, deadline, opened, reported = (
            fields[f] for f in ("quorum", "deadline_ms", "opened_ms", "reported")
        )
        assert quorum is not None and deadline is not None and opened is not None and reported is not None
        reason = fields["close_reason"]
        return RoundInfo(
            run_id=run_id,
            round=round_no,
            status=cast(RoundStatus, _s(fields["status"])),
            tasks={_s(k): _s(v) for k, v in tasks.items()},
            quorum=int(quorum),
            deadline_ms=int(deadline),
            opened_ms=int(opened),
            reported=int(reported),
            closed_ms=_opt_int(fields["closed_ms"]),
            close_reason=None if reason is None else cast(CloseReason, _s(reason)),
            global_version=_opt_int(fields["global_version"]),
        )

    @_translated
    def list_rounds(self, run_id: str) -> list[int]:
        raw = cast(list[bytes], self._r.zrange(keys.rounds_index(run_id), 0, -1))
        return sorted(int(r) for r in raw)

    @_translated
    def get_task_spec(self, run_id: str, round_no: int, task_id: str) -> str | None:
        raw = cast(bytes | None, self._r.hget(keys.round_specs(run_id, round_no), task_id))
        return None if raw is None else _s(raw)

    @_translated
    def record_update(
        self, run_id: str, round_no: int, task_id: str, device_id: str, update: bytes, now_ms: int
    ) -> RecordResult:
        return self._record(run_id, round_no, task_id, device_id, update, now_ms, _nonce())

    def _record(
        self, run_id: str, round_no: int, task_id: str, device_id: str, update: bytes, now_ms: int, nonce: str
    ) -> RecordResult:
        """record_update with an explicit nonce (a replay with the same nonce returns the first answer)."""
        round_no = int(round_no)
        outcome, reported, closed = self._record_update(
            keys=[
                keys.round_state(run_id, round_no),
                keys.round_tasks(run_id, round_no),
                keys.round_updates(run_id, round_no),
                keys.open_deadlines(run_id),
                keys.pending_aggregations(run_id),
                keys.counters(run_id),
            ],
            args=[task_id, device_id, bytes(update), int(now_ms), round_no, nonce],
        )
        return RecordResult(cast(RecordOutcome, _s(outcome)), int(reported), bool(closed))

    @_translated
    def close_expired_rounds(self, run_id: str, now_ms: int) -> list[int]:
        return self._close_expired_with(run_id, now_ms, _nonce())

    def _close_expired_with(self, run_id: str, now_ms: int, nonce: str) -> list[int]:
        now_ms = int(now_ms)
        candidates = [
            int(r)
            for r in cast(list[bytes], self._r.zrangebyscore(keys.open_deadlines(run_id), "-inf", now_ms))
        ]
        if not candidates:
            return []
        closed = self._close_expired(
            keys=[keys.open_deadlines(run_id), keys.pending_aggregations(run_id)]
            + [keys.round_state(run_id, r) for r in candidates],
            args=[now_ms, nonce, *candidates],
        )
        return sorted(int(r) for r in cast(list[bytes], closed))

    @_translated
    def pending_aggregations(self, run_id: str) -> list[int]:
        raw = cast(list[bytes], self._r.zrange(keys.pending_aggregations(run_id), 0, -1))
        return sorted(int(r) for r in raw)

    @_translated
    def get_updates(self, run_id: str, round_no: int) -> dict[str, bytes]:
        raw = cast(dict[bytes, bytes], self._r.hgetall(keys.round_updates(run_id, round_no)))
        return {_s(k): v for k, v in raw.items()}

    @_translated
    def get_update(self, run_id: str, round_no: int, task_id: str) -> bytes | None:
        return cast(bytes | None, self._r.hget(keys.round_updates(run_id, round_no), task_id))

    @_translated
    def compact_updates(self, run_id: str, round_no: int, receipts: dict[str, bytes]) -> bool:
        pairs: list[str | bytes] = [v for task, receipt in sorted(receipts.items()) for v in (task, receipt)]
        done = self._compact_updates(
            keys=[keys.round_state(run_id, round_no), keys.round_updates(run_id, round_no)], args=pairs
        )
        return bool(done)

    @_translated
    def mark_aggregated(self, run_id: str, round_no: int, global_version: int) -> bool:
        return self._mark_with(run_id, round_no, global_version, _nonce())

    def _mark_with(self, run_id: str, round_no: int, global_version: int, nonce: str) -> bool:
        round_no = int(round_no)
        done = self._mark_aggregated(
            keys=[keys.round_state(run_id, round_no), keys.pending_aggregations(run_id)],
            args=[round_no, int(global_version), nonce],
        )
        return bool(done)

    # -- hierarchy ----------------------------------------------------------------------------------
    @_translated
    def open_global_round(self, run_id: str, global_round: int, targets: dict[int, int]) -> bool:
        if not targets or any(t < 1 for t in targets.values()):
            raise ValueError(f"a global round needs groups with targets >= 1, got {targets}")
        pairs = [str(v) for g, t in sorted(targets.items()) for v in (int(g), int(t))]
        opened = self._open_global(
            keys=[keys.global_round_state(run_id, global_round), keys.global_rounds_index(run_id)],
            args=[int(global_round), _nonce(), *pairs],
        )
        return bool(opened)

    @_translated
    def record_group_aggregation(
        self, run_id: str, global_round: int, group: int, round_no: int
    ) -> GroupProgress:
        return self._record_group_with(run_id, global_round, group, round_no, _nonce())

    def _record_group_with(
        self, run_id: str, global_round: int, group: int, round_no: int, nonce: str
    ) -> GroupProgress:
        """record_group_aggregation with an explicit nonce (a replay returns the first answer)."""
        counted, count, target, ready = self._record_group(
            keys=[keys.global_round_state(run_id, global_round), keys.pending_global(run_id)],
            args=[int(global_round), int(group), int(round_no), nonce],
        )
        return GroupProgress(global_round, group, int(count), int(target), bool(counted), bool(ready))

    @_translated
    def set_group_target(self, run_id: str, global_round: int, group: int, target: int) -> GroupProgress:
        _, count, now, ready = self._set_target(
            keys=[keys.global_round_state(run_id, global_round), keys.pending_global(run_id)],
            args=[int(global_round), int(group), int(target), _nonce()],
        )
        return GroupProgress(global_round, group, int(count), int(now), False, bool(ready))

    @_translated
    def get_global_round(self, run_id: str, global_round: int) -> GlobalRoundInfo | None:
        raw = cast(dict[bytes, bytes], self._r.hgetall(keys.global_round_state(run_id, global_round)))
        fields = {_s(k): _s(v) for k, v in raw.items()}
        if "status" not in fields:
            return None
        targets = {int(k[7:]): int(v) for k, v in fields.items() if k.startswith("target:")}
        counts = {int(k[6:]): int(v) for k, v in fields.items() if k.startswith("count:")}
        status = cast(GlobalRoundStatus, fields["status"])
        return GlobalRoundInfo(run_id, global_round, status, targets, counts)

    @_translated
    def list_global_rounds(self, run_id: str) -> list[int]:
        raw = cast(list[bytes], self._r.zrange(keys.global_rounds_index(run_id), 0, -1))
        return sorted(int(r) for r in raw)

    @_translated
    def pending_global_aggregations(self, run_id: str) -> list[int]:
        raw = cast(list[bytes], self._r.zrange(keys.pending_global(run_id), 0, -1))
        return sorted(int(r) for r in raw)

    @_translated
    def mark_global_aggregated(self, run_id: str, global_round: int) -> bool:
        done = self._mark_global(
            keys=[
                keys.global_round_state(run_id, global_round),
                keys.pending_global(run_id),
                keys.hierarchy(run_id),
            ],
            args=[int(global_round), _nonce()],
        )
        return bool(done)

    @_translated
    def global_aggregations(self, run_id: str) -> int:
        raw = cast(bytes | None, self._r.hget(keys.hierarchy(run_id), "global_count"))
        return 0 if raw is None else int(raw)

    @_translated
    def put_group_adapter(self, run_id: str, group: int, version: int, data: bytes) -> None:
        self._put_global(keys=[keys.group_adapter(run_id, group)], args=[int(version), bytes(data)])

    @_translated
    def get_group_adapter(self, run_id: str, group: int) -> tuple[int, bytes] | None:
        version, data = cast(
            list[bytes | None], self._r.hmget(keys.group_adapter(run_id, group), ["version", "data"])
        )
        if version is None or data is None:
            return None
        return int(version), data

    # -- global adapter -----------------------------------------------------------------------------
    @_translated
    def put_global_adapter(self, run_id: str, version: int, data: bytes) -> None:
        self._put_global(keys=[keys.global_adapter(run_id)], args=[int(version), bytes(data)])

    @_translated
    def get_global_adapter(self, run_id: str) -> tuple[int, bytes] | None:
        version, data = cast(
            list[bytes | None], self._r.hmget(keys.global_adapter(run_id), ["version", "data"])
        )
        if version is None or data is None:
            return None
        return int(version), data

    # -- metrics and counters ----------------------------------------------------------------------
    @_translated
    def put_round_metrics(self, run_id: str, round_no: int, metrics: dict[str, Any]) -> None:
        """Merge (top-level keys, like dict.update) by compare-and-set of the round's JSON document.

        A Lua cjson merge would re-encode numbers (14 significant digits, doubles), so the merge is done
        here, on the exact JSON the twin would hold, and written only if nobody changed it meanwhile.
        """
        key, field = keys.round_metrics(run_id), str(int(round_no))
        incoming = json.loads(json.dumps(metrics))
        for _ in range(_CAS_ATTEMPTS):
            raw = cast(bytes | None, self._r.hget(key, field))
            expected = b"" if raw is None else raw
            merged: dict[str, Any] = {} if raw is None else json.loads(raw)
            merged.update(incoming)
            if self._cas_field(keys=[key], args=[field, expected, json.dumps(merged)]):
                return
        raise StateStoreError(
            f"put_round_metrics: {_CAS_ATTEMPTS} concurrent-write conflicts on round {round_no}"
        )

    @_translated
    def get_round_metrics(self, run_id: str) -> dict[int, dict[str, Any]]:
        raw = cast(dict[bytes, bytes], self._r.hgetall(keys.round_metrics(run_id)))
        return {n: m for n, m in sorted((int(k), json.loads(v)) for k, v in raw.items())}

    @_translated
    def incr_counter(self, run_id: str, name: str, amount: int = 1) -> int:
        """HINCRBY (a pool retry after a lost reply may count twice: counters are diagnostics)."""
        return int(self._r.hincrby(keys.counters(run_id), name, int(amount)))

    @_translated
    def get_counters(self, run_id: str) -> dict[str, int]:
        raw = cast(dict[bytes, bytes], self._r.hgetall(keys.counters(run_id)))
        return {_s(k): int(v) for k, v in raw.items()}

    @_translated
    def delete_run(self, run_id: str) -> None:
        """SCAN the run's keys (never KEYS) and UNLINK them in batches."""
        batch: list[bytes] = []
        pattern = keys.run_pattern(_glob_escape(run_id))
        for key in cast(Iterable[bytes], self._r.scan_iter(match=pattern, count=500)):
            batch.append(key)
            if len(batch) >= 500:
                self._r.unlink(*batch)
                batch.clear()
        if batch:
            self._r.unlink(*batch)

    @_translated
    def expire_run(self, run_id: str, ttl_s: float) -> None:
        """PEXPIRE every key of the run this user may write, pipelined; 0 or less deletes them all.

        The keys are listed from the run's round indexes, not by SCAN, which the services' ACL users
        may not send. Under those users each service may write only its part of the run: a key
        refused (NOPERM) is the other service's, which sets it when it finishes (each calls this).
        """
        if ttl_s <= 0:
            self.delete_run(run_id)
            return
        names = self._listed_keys(run_id)
        pipe = self._r.pipeline(transaction=False)
        for name in names:
            pipe.pexpire(name, int(ttl_s * 1000))
        for result in pipe.execute(raise_on_error=False):
            if isinstance(result, Exception) and not isinstance(result, redis.exceptions.NoPermissionError):
                raise result

    @_translated
    def list_runs(self) -> list[str]:
        """SCAN for the runs' field hashes (``lf:{RUN}:meta``)."""
        pattern = keys.run_meta("*")
        head, tail = keys.run_meta("\n").split("\n")
        names = (_s(k) for k in cast(Iterable[bytes], self._r.scan_iter(match=pattern, count=500)))
        return sorted(n[len(head) : -len(tail)] for n in names if n.startswith(head) and n.endswith(tail))

    # -- snapshots --------------------------------------------------------------------------------
    def _run_keys(self, run_id: str) -> list[bytes]:
        pattern = keys.run_pattern(_glob_escape(run_id))
        return sorted(cast(Iterable[bytes], self._r.scan_iter(match=pattern, count=500)))

    def _listed_keys(self, run_id: str) -> list[bytes]:
        """The run's keys, from its round indexes (no SCAN: the aggregator's ACL user may not); a key
        that does not exist is DUMPed as nil and left out."""
        rounds = [int(r) for r in cast(list[bytes], self._r.zrange(keys.rounds_index(run_id), 0, -1))]
        global_rounds = [
            int(g) for g in cast(list[bytes], self._r.zrange(keys.global_rounds_index(run_id), 0, -1))
        ]
        return [name.encode() for name in keys.run_keys(run_id, rounds, global_rounds, MAX_GROUPS)]

    @_translated
    def export_run(self, run_id: str) -> bytes:
        """DUMP of every key of the run, read in one MULTI/EXEC (one point in time); a key written
        after the indexes that list them were read is not in it (the services' resume paths tolerate
        that)."""
        names = self._listed_keys(run_id)
        pipe = self._r.pipeline(transaction=True)
        for name in names:
            pipe.dump(name)
            pipe.pttl(name)
        replies = pipe.execute()
        entries = [
            [_s(name), int(ttl), base64.b64encode(payload).decode()]
            for name, payload, ttl in zip(names, replies[0::2], replies[1::2], strict=True)
            if payload is not None  # gone between the SCAN and the transaction
        ]
        return json.dumps({"format": _SNAPSHOT_FORMAT, "run_id": run_id, "keys": entries}).encode()

    @_translated
    def import_run(self, run_id: str, snapshot: bytes) -> None:
        """Delete the run's keys and RESTORE the snapshot's in one MULTI/EXEC, the run record last."""
        try:
            doc = json.loads(snapshot)
            if doc["format"] != _SNAPSHOT_FORMAT or doc["run_id"] != run_id:
                raise ValueError(f"format {doc['format']!r} of run {doc['run_id']!r}")
            entries = [(str(k), int(ttl), base64.b64decode(p)) for k, ttl, p in doc["keys"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise StateStoreError(f"import_run: not a Redis snapshot of run {run_id!r}: {exc}") from exc
        meta = keys.run_meta(run_id)
        entries.sort(key=lambda entry: entry[0] == meta)
        pipe = self._r.pipeline(transaction=True)
        stale = self._run_keys(run_id)
        if stale:
            pipe.unlink(*stale)
        for name, ttl, payload in entries:
            pipe.restore(name, max(ttl, 0), payload, replace=True)
        pipe.execute()

    @_translated
    def close(self) -> None:
        if self._owns_client:
            self._r.close()
            self._r.connection_pool.disconnect()


def probe_state(url: str, timeout_s: float) -> None:
    """First contact: PING the Redis of ``url`` (through its Sentinels for a Sentinel URL) within
    ``timeout_s``, retrying refused or timed-out connections with backoff meanwhile. Separate from
    a store's calls, which ride out an outage of ``OUTAGE_S`` mid-run.

    Raises:
        StateStoreError: no answer within ``timeout_s``, or a refusal (credentials, ACL) at once.
    """
    deadline = time.monotonic() + timeout_s
    per_try = max(0.5, min(2.0, timeout_s))
    store = RedisStateStore(url, socket_timeout=per_try, socket_connect_timeout=per_try, outage_s=0.0)
    backoff = ExponentialBackoff(cap=2.0, base=0.2)
    try:
        for failures in itertools.count(1):
            try:
                store._r.ping()
                return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if isinstance(exc, redis.AuthenticationError):
                    raise StateStoreError(f"{type(exc).__name__}: {exc}") from None
                delay = backoff.compute(failures)
                if time.monotonic() + delay >= deadline:  # no attempt would start in time
                    raise StateStoreError(f"{type(exc).__name__}: {exc}") from None
                time.sleep(delay)
            except redis.RedisError as exc:
                raise StateStoreError(f"{type(exc).__name__}: {exc}") from None
    finally:
        store.close()


if TYPE_CHECKING:

    def _conforms(store: RedisStateStore) -> StateStore:  # mypy checks the protocol is fully implemented
        return store
