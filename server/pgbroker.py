"""The PostgreSQL broker backend: the in-process broker, and LISTEN/NOTIFY between processes.

Several `corral serve` and `corral runner` processes on one PostgreSQL hear each other's
messages through one channel. Each process keeps one connection of its own for it (not one
of the app's pools): it LISTENs there, and sends what it publishes there too, as
`pg_notify` *after* the commit that stored it (publishers publish after their commit, as
with the in-process broker), so a process told of a row can read it.

A notification carries ids, seqs and statuses only, never a line's text or a secret: "lines
up to seq N of command C are stored" reaches the followers of C as a `LinesStored` nudge,
and they read the lines from the database by seq, like a subscriber that lagged. Pending
messages are sent together (several in one payload, far below NOTIFY's 8,000 bytes; a
command's line nudges merged into its latest). A process ignores its own notifications
(their sender is its own connection's backend).

When the connection drops, it is opened again with backoff; what this process published
meanwhile is sent then, and every local subscriber is made to re-read the database (a lag):
followers catch up by seq, the supervisor claims and looks for cancels again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from server.broker import (
    CANCEL_TOPIC,
    DEFAULT_MAX_BYTES,
    DRAIN_TOPIC,
    QUEUE_TOPIC,
    SCHEDULE_TOPIC,
    SECRETS_TOPIC,
    USAGE_TOPIC,
    Broker,
    LinesStored,
    StatusChange,
    UsageRecorded,
    command_topic,
)
from server.models import CommandStatus

log = logging.getLogger("corral.broker")

CHANNEL = "corral_events"
PAYLOAD_BYTES = 6000  # a notification's payload at most (PostgreSQL's limit is 8,000 bytes)
APPLICATION_NAME = "corral-broker"  # how the connection shows in pg_stat_activity
RECONNECT_FIRST_SECONDS = 0.1
RECONNECT_MAX_SECONDS = 5.0
KEEPALIVE_SECONDS = 10.0  # an idle connection is checked this often (a silent network loss)
START_TIMEOUT_SECONDS = 10.0
CONNECT_TIMEOUT_SECONDS = 10.0
CLOSE_FLUSH_SECONDS = 2.0
COMMAND_PREFIX = command_topic(0).removesuffix("0")

# Topics whose messages other processes hear, and the tag each goes by on the wire.
_SIGNALS = {
    QUEUE_TOPIC: "q",
    CANCEL_TOPIC: "c",
    SECRETS_TOPIC: "k",
    SCHEDULE_TOPIC: "h",
    DRAIN_TOPIC: "d",
}
_TOPICS = {tag: topic for topic, tag in _SIGNALS.items()}
# What these say is "look again" (a cancel names its id, a usage nudge its service).
_WAKEUPS = frozenset({"q", "k", "h", "u", "d"})


def _wakeup_key(entry: Entry) -> str | tuple[str, int]:
    """Wake-ups with the same key say the same: one of them waits to be sent."""
    return (entry[0], int(entry[1])) if entry[0] == "u" else str(entry[0])


Entry = list[Any]  # one message on the wire: [tag, ...ids, seqs or a status]


def wire_entry(topic: str, message: Any) -> Entry | None:
    """What other processes hear of `message` on `topic` (None: nothing, local only)."""
    tag = _SIGNALS.get(topic)
    if tag is not None:
        return [tag, message] if isinstance(message, int) else [tag]
    if topic == USAGE_TOPIC and isinstance(message, UsageRecorded):
        return ["u", message.service_id]
    if topic.startswith(COMMAND_PREFIX):
        runs = getattr(message, "runs", None)  # a StoredBatch of the log store
        if runs:
            return ["l", int(topic.removeprefix(COMMAND_PREFIX)), int(runs[-1].last_seq)]
    return None


def payloads(entries: list[Entry], limit: int = PAYLOAD_BYTES) -> list[str]:
    """The entries as JSON arrays of at most `limit` bytes each, in order."""
    out: list[str] = []
    parts: list[str] = []
    size = 2
    for entry in entries:
        part = json.dumps(entry, separators=(",", ":"))
        if parts and size + len(part) + 1 > limit:
            out.append("[" + ",".join(parts) + "]")
            parts, size = [], 2
        parts.append(part)
        size += len(part) + 1
    if parts:
        out.append("[" + ",".join(parts) + "]")
    return out


def connect_arguments(engine: AsyncEngine) -> dict[str, Any]:
    """asyncpg.connect's arguments for the engine's database (SQLAlchemy's own options out)."""
    _args, kwargs = engine.dialect.create_connect_args(engine.url)  # asyncpg's: all by name
    for option in ("prepared_statement_cache_size", "prepared_statement_name_func"):
        kwargs.pop(option, None)
    settings = dict(kwargs.get("server_settings") or {})
    settings.setdefault("application_name", APPLICATION_NAME)
    kwargs.setdefault("timeout", CONNECT_TIMEOUT_SECONDS)
    return {**kwargs, "server_settings": settings}


class PgBroker(Broker):
    """The in-process broker, and the same messages to and from other processes."""

    single_process = False  # other processes' lines arrive as nudges, or not at all (a drop)

    def __init__(self, engine: AsyncEngine, subscriber_max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        super().__init__(subscriber_max_bytes)
        self._connect_args = connect_arguments(engine)
        self._pending: list[Entry] = []
        self._pending_lines: dict[int, Entry] = {}  # command id -> its pending "l" entry
        self._pending_wakeups: set[str | tuple[str, int]] = set()
        self._wake = asyncio.Event()
        self._listening = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.backend_pid: int | None = None  # the listening connection's server process
        self.connections = 0  # how many times it connected (a reconnect makes it 2)
        self.notifications_sent = 0  # payloads sent (each carries one or more entries)
        self.notifications_received = 0  # payloads of other processes heard
        self._failing = False
        self._sent = asyncio.Event()  # set after each flush

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and LISTEN (waits for the first connection, a while at most: until it
        comes, other processes' messages are not heard, and the safety-net poll covers)."""
        self._task = asyncio.create_task(self._run(), name="pg-broker")
        try:
            await asyncio.wait_for(self._listening.wait(), START_TIMEOUT_SECONDS)
        except TimeoutError:
            log.warning("event=broker_not_listening detail=%s", "still connecting")

    async def close(self) -> None:
        """Stop listening; what is still pending is sent first if the connection is up
        (the statuses of commands a stopping runner put back, say)."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_FLUSH_SECONDS):
                while self._pending and self.listening:
                    self._sent.clear()
                    await self._sent.wait()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    def counters(self) -> dict[str, float]:
        """What /metrics shows of it (server.metrics.BROKER_COUNTERS)."""
        return {
            "notifications_sent": self.notifications_sent,
            "notifications_received": self.notifications_received,
            "reconnects": max(0, self.connections - 1),
        }

    @property
    def listening(self) -> bool:
        """Connected and listening now."""
        return self._listening.is_set()

    # -- publishing ----------------------------------------------------------------------

    def publish(self, topic: str, message: Any) -> None:
        """Deliver here, and send to the other processes (never blocks)."""
        self.deliver(topic, message)
        entry = wire_entry(topic, message)
        if entry is not None:
            self._send(entry)

    def publish_status(self, command_id: int, status: str) -> None:
        self.deliver_status(StatusChange(command_id, status))
        self._send(["s", command_id, status])

    def _send(self, entry: Entry) -> None:
        """Queue `entry` for the connection. While it is down, what waits stays small: a
        command's line nudges are one, and so is each kind of wake-up."""
        tag = entry[0]
        if tag == "l":
            pending = self._pending_lines.get(entry[1])
            if pending is not None:  # not sent yet: it says "up to here" now
                pending[2] = max(pending[2], entry[2])
                return
            self._pending_lines[entry[1]] = entry
        elif tag in _WAKEUPS:
            key = _wakeup_key(entry)
            if key in self._pending_wakeups:
                return
            self._pending_wakeups.add(key)
        self._pending.append(entry)
        self._wake.set()

    # -- receiving -----------------------------------------------------------------------

    def _on_notification(self, _connection: Any, pid: int, _channel: str, payload: str) -> None:
        if pid == self.backend_pid:
            return  # this process's own message, delivered here when it was published
        self.notifications_received += 1
        try:
            entries = json.loads(payload)
            for entry in entries:
                self._apply(entry)
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            log.warning("event=broker_bad_message error=%s", type(exc).__name__)

    def _apply(self, entry: Entry) -> None:
        tag = entry[0]
        if tag == "l":
            command_id = int(entry[1])
            self.deliver(command_topic(command_id), LinesStored(command_id, int(entry[2])))
        elif tag == "u":
            self.deliver(USAGE_TOPIC, UsageRecorded(int(entry[1])))
        elif tag == "s":
            status = CommandStatus(entry[2]).value  # a status there is, or a ValueError
            self.deliver_status(StatusChange(int(entry[1]), status))
        else:
            message = int(entry[1]) if len(entry) > 1 else None
            self.deliver(_TOPICS[tag], message)

    # -- the connection ------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = RECONNECT_FIRST_SECONDS
        while True:
            began = loop.time()
            try:
                connection = await asyncpg.connect(**self._connect_args)
            except Exception as exc:  # the database is away: try again, with backoff
                self._report("broker_connect_failed", exc)
            else:
                try:
                    await self._listen(connection)
                    await self._serve(connection)
                except Exception as exc:  # whatever broke, listening must come back
                    self._report("broker_connection_lost", exc)
                finally:
                    self._listening.clear()
                    self.backend_pid = None
                    await _close_quietly(connection)
            if loop.time() - began > RECONNECT_MAX_SECONDS:
                delay = RECONNECT_FIRST_SECONDS  # it had worked for a while: retry at once
            await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    def _report(self, event: str, exc: Exception) -> None:
        """One WARNING when the connection starts failing; DEBUG while it goes on failing."""
        level = logging.DEBUG if self._failing else logging.WARNING
        self._failing = True
        log.log(level, "event=%s error=%s", event, type(exc).__name__)

    async def _listen(self, connection: asyncpg.Connection) -> None:
        connection.add_termination_listener(lambda _connection: self._wake.set())
        self.backend_pid = connection.get_server_pid()
        await connection.add_listener(CHANNEL, self._on_notification)
        self.connections += 1
        self._listening.set()
        if self._failing:
            self._failing = False
            log.info("event=broker_reconnected connections=%d", self.connections)
        # Listening again: what others sent while this process was not is read back from
        # the database by every subscriber, whose re-read starts only now.
        self.lag_all()

    async def _serve(self, connection: asyncpg.Connection) -> None:
        """Send what is published until the connection is lost (an exception)."""
        while True:
            self._wake.clear()
            if connection.is_closed():
                raise ConnectionResetError("the broker's connection closed")
            if self._pending:
                await self._flush(connection)
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), KEEPALIVE_SECONDS)
            except TimeoutError:
                await asyncio.wait_for(connection.execute("SELECT 1"), KEEPALIVE_SECONDS)

    async def _flush(self, connection: asyncpg.Connection) -> None:
        entries, self._pending, self._pending_lines = self._pending, [], {}
        self._pending_wakeups = set()
        texts = payloads(entries)
        try:
            # One round trip, atomic: all of them are sent, or none (then again, later).
            await connection.executemany("SELECT pg_notify($1, $2)", [(CHANNEL, t) for t in texts])
        except BaseException:
            self._pending[:0] = entries
            self._pending_lines = {e[1]: e for e in self._pending if e[0] == "l"}
            self._pending_wakeups = {_wakeup_key(e) for e in self._pending if e[0] in _WAKEUPS}
            raise
        self.notifications_sent += len(texts)
        self._sent.set()


async def _close_quietly(connection: asyncpg.Connection) -> None:
    if connection.is_closed():
        return
    try:
        await asyncio.wait_for(connection.close(), 2.0)
    except Exception:
        connection.terminate()


async def start_broker(engine: AsyncEngine, subscriber_max_bytes: int) -> Broker:
    """The broker for the engine's database: LISTEN/NOTIFY on PostgreSQL (started), else
    the in-process one."""
    if engine.dialect.name != "postgresql":
        return Broker(subscriber_max_bytes)
    broker = PgBroker(engine, subscriber_max_bytes)
    await broker.start()
    return broker
