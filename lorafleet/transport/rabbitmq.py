"""The RabbitMQ adapter of the Transport port, over pika 1.4 (the only module that imports pika).

**pika's threading rule.** A pika connection and its channels are not thread-safe: each must be
created and used by one thread only. The single exception is
``BlockingConnection.add_callback_threadsafe(cb)``, which queues ``cb`` to run on the thread that
drives the connection's I/O loop. A ``BlockingConnection`` also sends and checks heartbeats only
while its owning thread is inside a pika call (``process_data_events``, a publish, ...). A service
that handles one delivery for minutes on the thread that owns the consuming connection therefore
starves the heartbeats, and the broker drops the connection and redelivers the message
(tests/integration/test_pika_heartbeat.py shows it on the real broker). Hence this layout:

* **Publishing** (and declares, ``queue_depth``, ``purge``) uses one connection per calling thread,
  held in a :class:`threading.local` and created lazily by that thread. The channel is in confirm
  mode and publishes are ``mandatory``, so ``publish`` returns only once the broker has the message,
  and a routing mistake raises instead of silently dropping it.
* **Consuming**: each subscription owns a connection that lives on its own background I/O thread,
  which loops in ``process_data_events`` (so heartbeats keep flowing) and pushes deliveries into a
  :class:`queue.Queue`. ``Subscription.get`` pops from it on the service thread. ``ack`` /
  ``requeue`` / ``dead_letter`` run on the service thread and are marshalled back to the I/O thread
  with ``add_callback_threadsafe``.

**Stale deliveries.** Delivery tags are per channel. When the consuming connection dies (heartbeat
loss, broker restart, consumer timeout), the broker puts every unacknowledged message back in the
queue and will redeliver it. Acking the old tag on the *new* channel would ack some other message,
or close the new channel with ``406 PRECONDITION_FAILED - unknown delivery tag``. So a settlement
whose channel has since died is skipped silently: the broker already returned the message, and it
comes back as a redelivery (the at-least-once contract; consumers are idempotent).

**Idle publishing connections** get no heartbeats while their thread does something else, so the
broker may drop one after about three heartbeat intervals. The next operation on it fails, and
``_run`` reconnects and retries it (publishes are confirmed, so a retried publish may duplicate a
message but never lose one; message ids make duplicates detectable).

**Several brokers (a cluster).** ``url`` may name several brokers, comma-separated or as a list
(``amqp://u:p@rabbit-0:5672/lf,amqp://u:p@rabbit-1:5672/lf``). pika tries them in order within one
connection attempt (``BlockingConnection`` takes a sequence of ``ConnectionParameters``), so every
connection, publishing or consuming, goes to the first broker that answers. When a connection to
one broker is lost, the next connection starts with the broker after it, so a dead node costs no
more than the one refused connect per cycle that pika's workflow makes. Quorum queues survive the
loss of a node (a new leader is elected); what was unacknowledged on the lost connection is
redelivered, and an unconfirmed publish is retried on the next broker (at-least-once, as above).
A publish the broker nacked is retried on a fresh channel: on RabbitMQ 3.10 a confirm channel whose
quorum queue lost its leader went on nacking for over a minute after a new leader was elected, where
a new channel was confirmed at once. One URL connects and reconnects as before.

**Bounded bodies.** pika hands a consumer whole messages: it keeps every body frame of a message
until the last one arrives and joins them, so a consumer holds up to ``prefetch`` whole bodies,
whatever their size, before the service sees any of them. A subscription given ``max_body_bytes``
replaces its channel's content assembler (:class:`_BodyLimit`): a message whose header announces a
larger body is handed out at once with an empty body and its announced size, and its body frames
(at most ``frame_max``, 128 KiB, each) are counted and dropped as they arrive. The service then
dead-letters it as too large without ever holding it, and the subscription's bodies take at most
``prefetch x max_body_bytes`` bytes (tests/integration/test_update_burst.py measures the aggregator's).

**Permissions.** Roles whose ``configure`` permission is ``^$`` (see broker_config/) cannot redeclare
the topology. ``declare_exchange`` / ``declare_queue`` then fall back to a passive declare, which
needs no permission, and accept what the broker administrator declared.

Every pika exception is translated to the errors of :mod:`lorafleet.transport.base` here; none
escapes this module.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue as queue_mod
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import pika
import pika.exceptions as pex
import pika.frame
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from lorafleet.transport.base import (
    DETAIL_HEADER,
    ORIGIN_EXCHANGE_HEADER,
    ORIGIN_QUEUE_HEADER,
    ORIGIN_ROUTING_KEY_HEADER,
    REASON_HEADER,
    AccessRefused,
    ExchangeNotFound,
    ExchangeSpec,
    QueueNotFound,
    QueueSpec,
    TransportClosed,
    TransportError,
    Unroutable,
)
from lorafleet.transport.memory import DELIVERY_COUNT_HEADER, amqp_header_problem
from lorafleet.transport.topology import DEAD_LETTER_EXCHANGE

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/msgpack"
#: Longest ``x-lorafleet-detail`` header written by ``dead_letter``.
MAX_DETAIL_CHARS = 500

#: Errors that mean "this connection (or channel) is gone; reconnect and try again".
_CONNECTION_LOST = (
    pex.AMQPConnectionError,  # StreamLostError, ConnectionClosed, AMQPHeartbeatTimeout, ...
    pex.ChannelWrongStateError,
    pex.ChannelClosedByClient,
    ConnectionError,
    OSError,
)

_T = TypeVar("_T")


def queue_arguments(spec: QueueSpec) -> dict[str, Any]:
    """The x-arguments a queue is declared with (broker_config/definitions.json uses the same).

    Quorum queues with a dead-letter exchange use at-least-once dead-lettering, which RabbitMQ
    honours only together with ``x-overflow: reject-publish``.
    """
    args: dict[str, Any] = {}
    if spec.quorum:
        args["x-queue-type"] = "quorum"
    if spec.dead_letter_exchange is not None:
        args["x-dead-letter-exchange"] = spec.dead_letter_exchange
        if spec.quorum:
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
    if spec.delivery_limit is not None and spec.quorum:
        args["x-delivery-limit"] = spec.delivery_limit  # classic queues have no delivery limit
    if spec.max_length is not None:
        args["x-max-length"] = spec.max_length
    args.update(spec.arguments)
    return args


def broker_urls(url: str | Sequence[str]) -> list[str]:
    """The AMQP URLs of one ``--broker`` value: a URL, several separated by commas, or a sequence.

    A comma inside a URL (in a password, say) must be percent-encoded (``%2C``).

    Raises:
        TransportError: no URL at all.
    """
    items = url.split(",") if isinstance(url, str) else [part for item in url for part in item.split(",")]
    urls = [item.strip() for item in items if item.strip()]
    if not urls:
        raise TransportError("no AMQP URL given")
    return urls


def _plain(value: Any) -> Any:
    """Header values as plain Python: pika decodes 64-bit ints as its own ``long`` subclass."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    return value


def _backoff(attempt: int, *, base: float = 0.2, cap: float = 5.0) -> float:
    """Capped exponential backoff with jitter: 0.2, 0.4, 0.8, ... seconds, at most ``cap``."""
    delay: float = min(cap, base * (2 ** max(0, attempt - 1)))
    return delay * random.uniform(0.8, 1.0)


def _parameters(url: str, defaults: dict[str, Any], heartbeat: int | None) -> pika.URLParameters:
    """One broker's connection parameters: the URL's, then ``defaults`` where its query sets none."""
    if not url.startswith(("amqp://", "amqps://")):
        raise TransportError(f"bad AMQP URL {url.split('@')[-1]!r}: not amqp:// or amqps://")
    try:
        params = pika.URLParameters(url)
    except Exception as exc:
        raise TransportError(f"bad AMQP URL: {exc}") from None
    given = set(parse_qs(urlsplit(url).query))
    for name, value in defaults.items():
        if name not in given:
            setattr(params, name, value)
    if heartbeat is not None:
        params.heartbeat = heartbeat
    return params


def _connected_to(connection: BlockingConnection, candidates: list[tuple[int, Any]]) -> int:
    """Which of the candidate brokers (index, parameters) pika connected to; the first if unknown.

    pika keeps a copy of the parameters it connected with (``BlockingConnection._impl.params``).
    """
    used = getattr(getattr(connection, "_impl", None), "params", None)
    if used is not None:
        for index, params in candidates:
            if (params.host, params.port, params.virtual_host) == (used.host, used.port, used.virtual_host):
                return index
    return candidates[0][0]


def _broker_error(exc: pex.ChannelClosedByBroker | pex.ConnectionClosedByBroker, what: str) -> TransportError:
    """Translate a broker-side channel/connection close into the port's error."""
    code, text = exc.reply_code, exc.reply_text
    message = f"{what}: {code} {text}"
    if code == 404:
        return ExchangeNotFound(message) if "no exchange" in text else QueueNotFound(message)
    if code in (403, 530):  # ACCESS_REFUSED, NOT_ALLOWED (vhost)
        return AccessRefused(message)
    if code == 320:  # CONNECTION_FORCED (broker shutting down, or closed by an operator)
        return TransportClosed(message)
    return TransportError(message)  # e.g. 406 PRECONDITION_FAILED (redeclared differently, too large)


class _ThreadConnection:
    """One thread's connection, with a confirm-mode channel for publishing and a plain one for the rest."""

    def __init__(self, connection: BlockingConnection, broker: int, owner: threading.Thread) -> None:
        self.connection = connection
        self.broker = broker  # index of the broker (URL) it is connected to
        self.owner = owner
        self.last_used = 0.0
        self._publish: BlockingChannel | None = None
        self._admin: BlockingChannel | None = None

    def publish_channel(self) -> BlockingChannel:
        if self._publish is None or not self._publish.is_open:
            self._publish = self.connection.channel()
            self._publish.confirm_delivery()
        return self._publish

    def drop_publish_channel(self) -> None:
        channel, self._publish = self._publish, None
        if channel is not None and channel.is_open:
            try:
                channel.close()
            except Exception:  # best effort: a broken channel is dropped either way
                log.debug("closing a publishing channel failed", exc_info=True)

    def admin_channel(self) -> BlockingChannel:
        # A failed passive declare (404) closes the channel it ran on; a fresh one is opened next time.
        if self._admin is None or not self._admin.is_open:
            self._admin = self.connection.channel()
        return self._admin

    def close(self) -> None:
        try:
            if self.connection.is_open:
                self.connection.close()
        except Exception:  # best effort on a broken connection
            log.debug("closing a broken AMQP connection failed", exc_info=True)


class PikaTransport:
    """A :class:`lorafleet.transport.base.Transport` over RabbitMQ.

    ``url`` is an AMQP URL such as ``amqp://user:pass@host:5672/vhost?heartbeat=30``; its query may
    set any pika connection parameter. Where the URL does not, the keyword arguments apply. Several
    URLs (comma-separated, or a sequence) name the nodes of one cluster: connections fail over
    between them (see the module docstring); pika makes ``connection_attempts`` passes over them all.
    ``max_reconnect_s`` bounds how long one operation (or a subscription) keeps reconnecting after
    the connection is lost before giving up with :class:`TransportClosed`.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        heartbeat: int | None = None,
        connection_attempts: int = 3,
        retry_delay: float = 2.0,
        socket_timeout: float = 10.0,
        stack_timeout: float = 15.0,
        blocked_connection_timeout: float = 300.0,
        max_reconnect_s: float = 60.0,
        publish_attempts: int = 5,
        settle_timeout_s: float = 10.0,
        dead_letter_exchange: str = DEAD_LETTER_EXCHANGE,
    ) -> None:
        defaults: dict[str, Any] = {
            "connection_attempts": connection_attempts,
            "retry_delay": retry_delay,
            "socket_timeout": socket_timeout,
            "stack_timeout": stack_timeout,
            "blocked_connection_timeout": blocked_connection_timeout,
        }
        #: one ConnectionParameters per broker, in the order given
        self._brokers = [_parameters(one, defaults, heartbeat) for one in broker_urls(url)]
        self._params = self._brokers[0]
        #: the broker the next connection tries first: the last one that worked, or the one after a
        #: broker whose connection was lost
        self._preferred = 0
        self._max_reconnect_s = max_reconnect_s
        self._publish_attempts = max(1, publish_attempts)
        self._settle_timeout_s = settle_timeout_s
        self._default_dlx = dead_letter_exchange
        #: DLX per queue this transport declared; others are assumed to use ``dead_letter_exchange``.
        self._queue_dlx: dict[str, str | None] = {}
        self._local = threading.local()
        self._lock = threading.Lock()
        self._thread_connections: list[_ThreadConnection] = []
        self._subscriptions: list[_PikaSubscription] = []
        self._closed = False

    # -- connections ----------------------------------------------------------------------------
    def _connect(self) -> tuple[BlockingConnection, int]:
        """Open a connection to the first broker that answers, starting with the preferred one, and
        return it with that broker's index (pika makes ``connection_attempts`` passes over all of
        them); auth failures are final."""
        with self._lock:
            first = self._preferred
        order = [(first + k) % len(self._brokers) for k in range(len(self._brokers))]
        try:
            connection = BlockingConnection([self._brokers[i] for i in order])
        except (pex.ProbableAuthenticationError, pex.AuthenticationError) as exc:
            raise AccessRefused(f"authentication failed: {exc!r}") from None
        except pex.ProbableAccessDeniedError as exc:
            raise AccessRefused(f"access to vhost {self._params.virtual_host!r} refused: {exc!r}") from None
        except pex.ConnectionClosedByBroker as exc:
            if exc.reply_code in (403, 530):
                raise _broker_error(exc, "connect") from None
            raise
        index = _connected_to(connection, [(i, self._brokers[i]) for i in order])
        with self._lock:
            self._preferred = index
        return connection, index

    def _connection_lost(self, broker: int) -> None:
        """A connection to ``broker`` was lost: the next connection tries the broker after it first."""
        if len(self._brokers) < 2:
            return
        with self._lock:
            if self._preferred != broker:
                return  # another thread already moved on
            self._preferred = (broker + 1) % len(self._brokers)
            following = self._brokers[self._preferred]
        lost = self._brokers[broker]
        log.warning(
            "lost the connection to broker %s:%s; failing over to %s:%s",
            lost.host,
            lost.port,
            following.host,
            following.port,
        )

    def _thread_connection(self) -> _ThreadConnection:
        current: _ThreadConnection | None = getattr(self._local, "connection", None)
        if current is not None and current.connection.is_open and not self._stale(current):
            current.last_used = time.monotonic()
            return current
        if current is not None:
            if current.connection.is_open:
                current.close()  # idle past a heartbeat: close it ourselves before the broker drops it
            self._forget(current)
        connection, broker = self._connect()
        current = _ThreadConnection(connection, broker, threading.current_thread())
        current.last_used = time.monotonic()
        self._local.connection = current
        with self._lock:
            self._thread_connections.append(current)
        return current

    def _stale(self, holder: _ThreadConnection) -> bool:
        """A thread's connection idle for longer than a heartbeat interval may be dropped by the broker
        any moment (no heartbeats flow while its thread does other work, e.g. training); replacing it
        costs a few milliseconds, a drop costs a failed call, a retry and an error in the logs."""
        heartbeat = self._brokers[holder.broker].heartbeat
        if heartbeat is None:
            heartbeat = 60  # the broker's default, which pika accepts when the URL names none
        if not isinstance(heartbeat, int | float) or heartbeat <= 0:
            return False  # heartbeats off (0) or negotiated by a callable
        return time.monotonic() - holder.last_used > float(heartbeat)

    def _forget(self, holder: _ThreadConnection) -> None:
        holder.close()
        with self._lock:
            if holder in self._thread_connections:
                self._thread_connections.remove(holder)
        if getattr(self._local, "connection", None) is holder:
            self._local.connection = None

    def _drop_thread_connection(self, *, lost: bool = False) -> None:
        """Forget this thread's connection; ``lost``: because it failed (fail over to the next broker)."""
        current: _ThreadConnection | None = getattr(self._local, "connection", None)
        if current is not None:
            self._forget(current)
            if lost:
                self._connection_lost(current.broker)

    def _drop_publish_channel(self) -> None:
        current: _ThreadConnection | None = getattr(self._local, "connection", None)
        if current is not None:
            current.drop_publish_channel()

    def _check_open(self) -> None:
        if self._closed:
            self._drop_thread_connection()  # one close() could not touch from its own thread
            raise TransportClosed("transport is closed")

    def _run(self, what: str, op: Callable[[_ThreadConnection], _T], *, nack_retries: bool = False) -> _T:
        """Run ``op`` on this thread's connection, reconnecting with capped backoff when it is lost.

        Broker refusals (404, 403, 406, unroutable) are final. A lost connection is retried until
        ``max_reconnect_s`` has passed; a publish the broker nacked is retried ``publish_attempts`` times.
        """
        self._check_open()
        deadline = time.monotonic() + self._max_reconnect_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return op(self._thread_connection())
            except TransportError:
                raise
            except pex.UnroutableError:
                raise Unroutable(f"{what}: no queue is bound for it") from None
            except pex.ChannelClosedByBroker as exc:
                raise _broker_error(exc, what) from None  # the channel is reopened on next use
            except pex.ConnectionClosedByBroker as exc:
                if exc.reply_code in (403, 530):
                    raise _broker_error(exc, what) from None
                self._drop_thread_connection(lost=True)
                failure: str = f"connection closed by broker: {exc.reply_code} {exc.reply_text}"
            except pex.NackError:
                # A fresh channel for the retry: a channel whose quorum queue lost its leader keeps
                # nacking long after a new leader was elected (RabbitMQ 3.10, measured: > 60 s; a new
                # channel on the same connection is confirmed at once).
                self._drop_publish_channel()
                if not nack_retries or attempt >= self._publish_attempts:
                    raise TransportError(f"{what}: the broker nacked it (queue full?)") from None
                failure = "nacked"
            except _CONNECTION_LOST as exc:
                self._drop_thread_connection(lost=True)
                failure = repr(exc)
            except pex.AMQPError as exc:
                self._drop_thread_connection()
                raise TransportError(f"{what}: {exc!r}") from None
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed:
                raise TransportClosed(f"{what}: gave up after {attempt} attempts ({failure})")
            delay = min(_backoff(attempt), remaining)
            log.warning("%s failed (%s); retrying in %.1fs", what, failure, delay)
            time.sleep(delay)

    # -- topology -------------------------------------------------------------------------------
    def declare_exchange(self, spec: ExchangeSpec) -> None:
        def op(conn: _ThreadConnection) -> None:
            conn.admin_channel().exchange_declare(spec.name, exchange_type=spec.type, durable=True)

        try:
            self._run(f"declare exchange {spec.name!r}", op)
        except AccessRefused:
            # Roles without "configure" permission cannot (re)declare; the broker administrator's
            # definitions.json declared it. A passive declare needs no permission and proves it exists.
            if not self._exists(spec.name, exchange=True):
                raise
            log.debug("no permission to declare exchange %r; it exists, using it as is", spec.name)

    def declare_queue(self, spec: QueueSpec) -> None:
        args = queue_arguments(spec)
        refused = False

        def declare(conn: _ThreadConnection) -> None:
            conn.admin_channel().queue_declare(spec.name, durable=True, arguments=args)

        try:
            self._run(f"declare queue {spec.name!r}", declare)
        except AccessRefused:
            if not self._exists(spec.name, exchange=False):
                raise
            refused = True  # administrator-managed queue (see declare_exchange)
        self._queue_dlx[spec.name] = spec.dead_letter_exchange
        for exchange, routing_key in spec.bindings:

            def bind(conn: _ThreadConnection, exchange: str = exchange, key: str = routing_key) -> None:
                conn.admin_channel().queue_bind(spec.name, exchange, routing_key=key)

            try:
                self._run(f"bind queue {spec.name!r} to {exchange!r}/{routing_key!r}", bind)
            except AccessRefused:
                if not refused:
                    raise
                log.debug("no permission to bind %r; trusting the administrator's bindings", spec.name)

    def _exists(self, name: str, *, exchange: bool) -> bool:
        def op(conn: _ThreadConnection) -> None:
            channel = conn.admin_channel()
            if exchange:
                channel.exchange_declare(name, passive=True)
            else:
                channel.queue_declare(name, passive=True)

        try:
            self._run(f"check {name!r}", op)
        except (QueueNotFound, ExchangeNotFound):
            return False
        return True

    # -- messages -------------------------------------------------------------------------------
    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: dict[str, Any] | None = None,
    ) -> None:
        problem = amqp_header_problem(headers or {})
        if problem is not None:
            raise TransportError(f"headers cannot travel over AMQP: {problem}")
        properties = pika.BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=message_id,
            headers=dict(headers or {}),
        )

        def op(conn: _ThreadConnection) -> None:
            # In confirm mode this blocks until the broker's ack; it raises UnroutableError for a
            # mandatory message no queue took, NackError when a queue refused it (reject-publish).
            conn.publish_channel().basic_publish(exchange, routing_key, body, properties, mandatory=True)

        self._run(f"publish to {exchange!r}/{routing_key!r}", op, nack_retries=True)

    def subscribe(
        self, queue: str, *, prefetch: int = 1, max_body_bytes: int | None = None
    ) -> _PikaSubscription:
        """Consume ``queue``, holding at most ``prefetch`` unsettled deliveries; bodies over
        ``max_body_bytes`` are dropped unread (see the module docstring, "Bounded bodies")."""
        self._check_open()
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        if max_body_bytes is not None and max_body_bytes < 0:
            raise ValueError("max_body_bytes must not be negative")
        dlx = self._queue_dlx.get(queue, self._default_dlx)
        subscription = _PikaSubscription(self, queue, prefetch, dlx, max_body_bytes)
        with self._lock:
            self._subscriptions = [s for s in self._subscriptions if not s.closed]
            self._subscriptions.append(subscription)
        return subscription

    def queue_depth(self, queue: str) -> int:
        def op(conn: _ThreadConnection) -> int:
            result = conn.admin_channel().queue_declare(queue, passive=True)
            return int(result.method.message_count)

        return self._run(f"queue depth of {queue!r}", op)

    def purge(self, queue: str) -> int:
        def op(conn: _ThreadConnection) -> int:
            result = conn.admin_channel().queue_purge(queue)
            return int(result.method.message_count)

        return self._run(f"purge {queue!r}", op)

    def close(self) -> None:
        """Close subscriptions (unsettled deliveries go back to their queues) and connections.

        A connection belonging to another thread that is still alive is not touched (pika is not
        thread-safe); that thread's next call raises :class:`TransportClosed` and closes it.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            subscriptions, self._subscriptions = self._subscriptions, []
            holders = list(self._thread_connections)
        for subscription in subscriptions:
            subscription.close()
        current = threading.current_thread()
        for holder in holders:
            if holder.owner is current or not holder.owner.is_alive():
                self._forget(holder)


class _PikaDelivery:
    """One message handed to the service thread; settled through its subscription's I/O thread."""

    def __init__(
        self,
        subscription: _PikaSubscription,
        generation: int,
        channel: BlockingChannel,
        method: Any,
        properties: pika.BasicProperties,
        body: bytes,
        body_size: int,
    ) -> None:
        self._subscription = subscription
        self._generation = generation
        self._channel = channel
        self._tag: int = method.delivery_tag
        self._exchange: str = method.exchange or ""
        self._routing_key: str = method.routing_key or ""
        self._redelivered = bool(method.redelivered)
        self._body = bytes(body)
        self._body_size = body_size
        self._message_id: str = properties.message_id or ""
        self._headers: dict[str, Any] = _plain(dict(properties.headers or {}))
        try:
            self._delivery_count = int(self._headers.get(DELIVERY_COUNT_HEADER) or 0)
        except (TypeError, ValueError):
            self._delivery_count = 0
        self._settled = False
        self._settle_lock = threading.Lock()

    @property
    def body(self) -> bytes:
        return self._body

    @property
    def body_size(self) -> int:
        return self._body_size

    @property
    def message_id(self) -> str:
        return self._message_id

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self._headers)

    @property
    def exchange(self) -> str:
        return self._exchange

    @property
    def routing_key(self) -> str:
        return self._routing_key

    @property
    def redelivered(self) -> bool:
        return self._redelivered

    @property
    def delivery_count(self) -> int:
        return self._delivery_count

    def _settle(self) -> None:
        with self._settle_lock:
            if self._settled:
                # RabbitMQ would close the channel with 406 unknown delivery tag; refuse it here.
                raise TransportError(f"delivery {self._message_id!r} already settled")
            self._settled = True

    def ack(self) -> None:
        self._settle()
        tag = self._tag
        self._subscription._on_io_thread(self, lambda channel: channel.basic_ack(tag))

    def requeue(self) -> None:
        self._settle()
        tag = self._tag
        # basic.reject (not basic.nack): on RabbitMQ 4.3+ only reject counts toward the delivery limit.
        self._subscription._on_io_thread(self, lambda channel: channel.basic_reject(tag, requeue=True))

    def dead_letter(self, reason: str, detail: str = "") -> None:
        self._settle()
        subscription = self._subscription
        if not subscription._is_live(self):
            return  # the broker already took it back and will redeliver it: no copy to the DLQ
        tag = self._tag
        dlx = subscription._dead_letter_exchange
        if dlx is None:
            # A queue without a DLX: reject it; the broker drops it (or applies a DLX policy).
            subscription._on_io_thread(self, lambda channel: channel.basic_reject(tag, requeue=False))
            return
        headers = {k: v for k, v in self._headers.items() if k != DELIVERY_COUNT_HEADER}
        headers.update(
            {
                REASON_HEADER: reason,
                DETAIL_HEADER: detail[:MAX_DETAIL_CHARS],
                ORIGIN_QUEUE_HEADER: subscription.queue,
                ORIGIN_EXCHANGE_HEADER: self._exchange,
                ORIGIN_ROUTING_KEY_HEADER: self._routing_key,
            }
        )
        try:
            # On the calling (service) thread's own publishing connection, with confirms.
            subscription._transport.publish(
                dlx, self._routing_key, self._body, message_id=self._message_id, headers=headers
            )
        except TransportError as exc:
            # Nothing is lost: the original goes back to its queue (and, if it keeps failing,
            # reaches the broker's delivery limit).
            log.error("could not dead-letter %r to %r (%s); requeueing it", self._message_id, dlx, exc)
            subscription._on_io_thread(self, lambda channel: channel.basic_reject(tag, requeue=True))
            return
        subscription._on_io_thread(self, lambda channel: channel.basic_ack(tag))


class _BodyLimit:
    """Stands in for pika's content assembler on a consuming channel (``Channel._content_assembler``,
    which turns a method frame, a header frame and body frames into one message): a message whose
    header announces a body over ``limit`` bytes is returned at once with an empty body, and its body
    frames are dropped as they arrive; every other frame goes to pika's own assembler.

    ``sizes`` maps the delivery tag of each message returned empty to its announced body size.
    """

    def __init__(self, inner: Any, limit: int) -> None:
        self._inner = inner
        self._limit = limit
        self._method: Any = None  # the last content-bearing method frame (Basic.Deliver)
        self._skipping = 0  # body bytes of a dropped message still to come
        self.sizes: dict[int, int] = {}

    def process(self, frame_value: Any) -> Any:
        if self._skipping:
            if not isinstance(frame_value, pika.frame.Body):
                raise pex.UnexpectedFrameError(frame_value)
            self._skipping -= len(frame_value.fragment)
            if self._skipping < 0:
                raise pex.BodyTooLongError(-self._skipping, 0)
            return None
        if isinstance(frame_value, pika.frame.Method):
            self._method = frame_value
        elif (
            isinstance(frame_value, pika.frame.Header)
            and frame_value.body_size > self._limit
            and self._method is not None
        ):
            method, self._method = self._method, None
            self._skipping = frame_value.body_size
            tag = getattr(method.method, "delivery_tag", None)
            if tag is not None:
                self.sizes[int(tag)] = frame_value.body_size
            return method, frame_value, b""
        return self._inner.process(frame_value)

    @classmethod
    def install(cls, channel: BlockingChannel, limit: int) -> _BodyLimit:
        """Put a body limit in front of the channel's assembler (before it consumes anything).

        Raises:
            TransportError: this pika keeps its assembler elsewhere (the limit cannot be enforced).
        """
        impl = getattr(channel, "_impl", None)
        inner = getattr(impl, "_content_assembler", None)
        if inner is None or not callable(getattr(inner, "process", None)):
            raise TransportError(f"pika {pika.__version__}: no content assembler to bound message bodies")
        bounded = cls(inner, limit)
        impl._content_assembler = bounded  # type: ignore[union-attr]
        return bounded


class _Wake:
    """Put into a subscription's inbox to wake a waiting ``get`` (closing, or the connection gave up)."""


_WAKE = _Wake()


class _PikaSubscription:
    """A consumer whose connection lives on its own I/O thread; see the module docstring."""

    def __init__(
        self,
        transport: PikaTransport,
        queue: str,
        prefetch: int,
        dlx: str | None,
        max_body_bytes: int | None = None,
    ) -> None:
        self._transport = transport
        self.queue = queue
        self._prefetch = prefetch
        self._max_body_bytes = max_body_bytes
        self._dead_letter_exchange = dlx
        self._inbox: queue_mod.Queue[_PikaDelivery | _Wake] = queue_mod.Queue()
        self._lock = threading.Lock()
        self._connection: BlockingConnection | None = None
        self._generation = 0  # how many connections this subscription has consumed on
        self._live_generation: int | None = None  # the generation now consuming, None when down
        self._error: TransportError | None = None  # final: get() raises it
        self._stop = threading.Event()
        self._started = threading.Event()
        self._cancelled = False
        self._consuming = False  # whether the current connection got as far as consuming
        self._broker: int | None = None  # the broker (index) of the current connection, once connected
        self.closed = False
        self._thread = threading.Thread(target=self._io_main, name=f"lorafleet-amqp:{queue}", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            self.closed = True
            raise self._error

    @property
    def connection_count(self) -> int:
        """How many connections this subscription has consumed on (1 unless it had to reconnect)."""
        return self._generation

    @property
    def live_connection(self) -> int | None:
        """The connection now consuming (its number, see ``connection_count``); None while it is down."""
        return self._live_generation

    # -- service-thread side --------------------------------------------------------------------
    def get(self, timeout: float = 0.0) -> _PikaDelivery | None:
        if self.closed:
            raise TransportClosed(f"subscription to {self.queue!r} is closed")
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            if self._error is not None and self._inbox.empty():
                raise self._error
            remaining = deadline - time.monotonic()
            try:
                item = self._inbox.get(timeout=remaining) if remaining > 0 else self._inbox.get_nowait()
            except queue_mod.Empty:
                item = None
            if isinstance(item, _PikaDelivery):
                if item._generation == self._live_generation:
                    return item
                continue  # from a connection that died: the broker will redeliver it
            if self._error is not None:
                raise self._error
            if self.closed:
                raise TransportClosed(f"subscription to {self.queue!r} is closed")
            if item is None:
                return None

    def _is_live(self, delivery: _PikaDelivery) -> bool:
        """Whether the delivery's channel is still the one consuming (so settling it means something)."""
        return self._live_generation == delivery._generation

    def _on_io_thread(self, delivery: _PikaDelivery, operation: Callable[[BlockingChannel], None]) -> None:
        """Run a settlement on the I/O thread, skipping it when the delivery's channel is gone."""
        generation = delivery._generation
        with self._lock:
            connection = self._connection if self._live_generation == generation else None
        if connection is None:
            log.debug("delivery %r outlived its channel; not settling it", delivery.message_id)
            return
        done = threading.Event()

        def run() -> None:
            try:
                if self._live_generation == generation and delivery._channel.is_open:
                    operation(delivery._channel)
            except pex.AMQPError:
                log.debug("settling %r failed; the broker will redeliver it", delivery.message_id)
            finally:
                done.set()

        try:
            connection.add_callback_threadsafe(run)
        except pex.AMQPError:
            return  # the connection closed meanwhile: stale
        if threading.current_thread() is self._thread:
            return
        give_up = time.monotonic() + self._transport._settle_timeout_s
        while not done.wait(0.05):
            if self._live_generation != generation or time.monotonic() > give_up:
                return

    def close(self) -> None:
        """Stop consuming; the broker returns unsettled deliveries to the queue."""
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        with self._lock:
            connection = self._connection
        if connection is not None:
            # Queued after any settlement this thread made, so those go out first.
            with contextlib.suppress(pex.AMQPError):
                connection.add_callback_threadsafe(lambda: None)
        self._thread.join(timeout=30.0)
        self._inbox.put(_WAKE)

    # -- I/O thread -----------------------------------------------------------------------------
    def _io_main(self) -> None:
        attempt = 0
        deadline: float | None = None
        try:
            while not self._stop.is_set():
                self._consuming = False
                try:
                    self._consume_once()
                    if self._stop.is_set():
                        return
                    failure = "consumer cancelled by the broker" if self._cancelled else "channel closed"
                except TransportError as exc:  # QueueNotFound, AccessRefused: final
                    self._error = exc
                    return
                except pex.ChannelClosedByBroker as exc:
                    error = _broker_error(exc, f"consume {self.queue!r}")
                    if isinstance(error, (QueueNotFound, AccessRefused)):
                        self._error = error
                        return
                    failure = str(error)
                except (pex.AMQPError, *_CONNECTION_LOST) as exc:
                    failure = repr(exc)
                    if self._broker is not None:  # connected, then lost: fail over to the next broker
                        self._transport._connection_lost(self._broker)
                if self._consuming:
                    attempt, deadline = 0, None  # that connection worked: the budget starts afresh
                attempt += 1
                now = time.monotonic()
                deadline = deadline if deadline is not None else now + self._transport._max_reconnect_s
                if now >= deadline:
                    self._error = TransportClosed(
                        f"subscription to {self.queue!r}: gave up reconnecting ({failure})"
                    )
                    return
                delay = min(_backoff(attempt, cap=10.0), deadline - now)
                log.warning("subscription to %r lost (%s); reconnecting in %.1fs", self.queue, failure, delay)
                self._stop.wait(delay)
        finally:
            self._started.set()
            self._inbox.put(_WAKE)

    def _consume_once(self) -> None:
        """Connect and consume until stopped, cancelled, or the connection fails."""
        self._broker = None
        connection, self._broker = self._transport._connect()
        try:
            channel = connection.channel()
            channel.queue_declare(self.queue, passive=True)  # QueueNotFound rather than an idle consumer
            limit = None
            if self._max_body_bytes is not None:
                limit = _BodyLimit.install(channel, self._max_body_bytes)
            channel.basic_qos(prefetch_count=self._prefetch)
            self._cancelled = False
            channel.add_on_cancel_callback(self._on_cancel)
            with self._lock:
                self._generation += 1
                generation = self._generation
                self._connection = connection
                self._live_generation = generation
            on_message = functools.partial(self._on_message, generation, limit)
            channel.basic_consume(self.queue, on_message, auto_ack=False)
            self._consuming = True
            self._started.set()
            while not self._stop.is_set() and not self._cancelled and channel.is_open:
                # Heartbeats, deliveries and the settlements queued by add_callback_threadsafe all
                # happen in here; a queued callback wakes it at once.
                connection.process_data_events(time_limit=1.0)
        finally:
            with self._lock:
                self._live_generation = None
                self._connection = None
            try:
                if connection.is_open:
                    connection.close()  # unacknowledged deliveries go back to the queue
            except Exception:  # best effort on a broken connection
                log.debug("closing the consumer connection failed", exc_info=True)

    def _on_message(
        self,
        generation: int,
        limit: _BodyLimit | None,
        channel: BlockingChannel,
        method: Any,
        properties: Any,
        body: bytes,
    ) -> None:
        size = len(body) if limit is None else limit.sizes.pop(int(method.delivery_tag), len(body))
        self._inbox.put(_PikaDelivery(self, generation, channel, method, properties, body, size))

    def _on_cancel(self, _frame: Any) -> None:
        # The queue was deleted (or its leader moved): reconnecting re-checks that it exists.
        self._cancelled = True


def _root_cause(exc: BaseException) -> str:
    """The innermost error pika wrapped (``ConnectionRefusedError: ...``), in one line."""
    while True:  # AMQPConnectionError(AMQPConnectorSocketConnectError(exception=ConnectionRefusedError))
        inner = exc.args[0] if exc.args else getattr(exc, "exception", None)
        if not isinstance(inner, BaseException):
            break
        exc = inner
    text = (exc.strerror if isinstance(exc, OSError) else None) or str(exc).strip() or repr(exc)
    return f"{type(exc).__name__}: {text}".replace("\n", " ")


def probe_broker(url: str, timeout_s: float) -> None:
    """First contact: open and close one connection to any broker of ``url`` within ``timeout_s``,
    retrying refused or timed-out attempts with backoff meanwhile; pika's own logging is silenced
    while it tries (each failed attempt would log several lines). A transport's later reconnections
    are not bounded by this: they follow ``max_reconnect_s``.

    Raises:
        AccessRefused: the broker refused the credentials or the vhost (at once, not retried).
        TransportClosed: no broker answered within ``timeout_s``; the message is the last cause.
    """
    deadline = time.monotonic() + timeout_s
    urls = broker_urls(url)
    pika_log = logging.getLogger("pika")
    level = pika_log.level
    pika_log.setLevel(logging.CRITICAL + 1)
    try:
        attempt = 0
        while True:
            attempt += 1
            per_try = max(0.5, min(5.0, deadline - time.monotonic()))
            defaults = {"connection_attempts": 1, "socket_timeout": per_try, "stack_timeout": per_try}
            params = [_parameters(u, defaults, None) for u in urls]
            try:
                BlockingConnection(params).close()
                return
            except (pex.ProbableAuthenticationError, pex.AuthenticationError) as exc:
                raise AccessRefused(f"authentication failed: {_root_cause(exc)}") from None
            except pex.ProbableAccessDeniedError as exc:
                raise AccessRefused(f"access to the vhost refused: {_root_cause(exc)}") from None
            except pex.AMQPError as exc:
                cause = _root_cause(exc)
            delay = _backoff(attempt)
            if time.monotonic() + delay >= deadline:  # no attempt would start in time: say why now
                raise TransportClosed(cause)
            time.sleep(delay)
    finally:
        pika_log.setLevel(level)
