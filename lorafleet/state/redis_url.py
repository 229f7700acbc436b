"""Where the Redis state store is: a ``redis://`` (``rediss://``, ``unix://``) URL, or a Sentinel URL.

``redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]`` names the Sentinels and
the service (the ``sentinel monitor`` name) whose primary the client follows through failovers; the
password is the data nodes' (``sentinel_password=`` in the query for Sentinels that have their own).
Either kind takes ``wait_replicas=N`` (and ``wait_timeout_ms=``, default 1000): every state-changing
script is followed by ``WAIT N`` on its connection, so that what the services act on (an update
counted, a round closed or aggregated) is on N replicas before they ack a message or announce a round
(README "Replicated state store" has what that does and does not guarantee).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from schemas.errors import ConfigError

SENTINEL_SCHEME = "redis+sentinel"
_OURS = ("wait_replicas", "wait_timeout_ms", "sentinel_password")


@dataclass(frozen=True)
class RedisTarget:
    url: str  # a redis:// URL without lorafleet's query parameters (for a Sentinel target: unused)
    sentinels: list[tuple[str, int]] = field(default_factory=list)  # empty: not through Sentinel
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    wait_replicas: int = 0
    wait_timeout_ms: int = 1000


def parse_redis_url(url: str) -> RedisTarget:
    """Raises:
    ConfigError: naming what is wrong with the URL (never the password)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    try:
        wait_replicas = int(query.pop("wait_replicas", "0"))
        wait_timeout_ms = int(query.pop("wait_timeout_ms", "1000"))
    except ValueError as exc:
        raise ConfigError(f"state URL: wait_replicas and wait_timeout_ms are integers ({exc})") from exc
    if wait_replicas < 0 or wait_timeout_ms < 0:
        raise ConfigError("state URL: wait_replicas and wait_timeout_ms may not be negative")
    sentinel_password = query.pop("sentinel_password", None)
    if parts.scheme != SENTINEL_SCHEME:
        plain = urlunsplit(parts._replace(query=urlencode(query)))
        return RedisTarget(url=plain, wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    sentinels = []
    for host_port in hosts.split(","):
        host, sep, port = host_port.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"state URL: Sentinel {host_port!r} is not HOST:PORT")
        sentinels.append((host, int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigError("state URL: a Sentinel URL ends in /SERVICE or /SERVICE/DB (the monitored name)")
    return RedisTarget(
        url="",
        sentinels=sentinels,
        service=path[0],
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(username) or None,
        password=unquote(password) or None,
        sentinel_password=sentinel_password,
        wait_replicas=wait_replicas,
        wait_timeout_ms=wait_timeout_ms,
    )
