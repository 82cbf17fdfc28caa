"""How the runner's store tells a database that is away (wait for it) from one that
refuses a statement (trying it again would never end), through SQLAlchemy's wrappers to the
driver's own error."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, IntegrityError

# SQLSTATE classes worth another try: connection exception, transaction rollback
# (serialization failure, deadlock), insufficient resources, operator intervention.
RETRYABLE_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57"})
# SQLite primary result codes worth another try: BUSY, LOCKED, NOMEM, READONLY, IOERR,
# FULL, CANTOPEN, PROTOCOL (a file that is locked, unwritable or gone for a while).
RETRYABLE_SQLITE_CODES = frozenset({5, 6, 7, 8, 10, 13, 14, 15})
UNIQUE_VIOLATION = "23505"  # PostgreSQL's SQLSTATE
SQLITE_DUPLICATE_KEYS = frozenset({1555, 2067})  # SQLITE_CONSTRAINT_PRIMARYKEY, _UNIQUE
# What a claim raises when another runner took a command of the same profile at the same
# moment (a unique violation, said as SQLAlchemy says it whatever the driver).
ClaimConflict = IntegrityError


class ConnectionLost(Exception):
    """The store's own PostgreSQL connection broke during a flush (it is replaced)."""


class JobFailed(Exception):
    """A job of a flush (a claim) failed: the flush is rolled back and tried without it."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(repr(error))
        self.index = index  # its place in the jobs of the flush
        self.error = error


def duplicate_key(exc: BaseException) -> bool:
    """Whether the database refused `exc`'s statement for a key it holds already (looking
    through SQLAlchemy's wrapper to the driver's error)."""
    current: BaseException | None = exc
    for _ in range(5):
        if current is None:
            break
        if getattr(current, "sqlstate", None) == UNIQUE_VIOLATION:
            return True
        if getattr(current, "sqlite_errorcode", None) in SQLITE_DUPLICATE_KEYS:
            return True
        current = getattr(current, "orig", None) or current.__cause__
    return False


def retryable_database_error(exc: BaseException) -> bool:
    """A database that is down, unreachable, busy or overloaded (worth waiting for), as
    against one that refuses the statement itself (trying that again would never end).
    Looks through SQLAlchemy's wrapper to the driver's error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionLost | OSError | TimeoutError):
            return True
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        state = getattr(current, "sqlstate", None)
        if isinstance(state, str) and state:
            return state[:2] in RETRYABLE_SQLSTATE_CLASSES
        code = getattr(current, "sqlite_errorcode", None)
        if isinstance(code, int):
            return code & 0xFF in RETRYABLE_SQLITE_CODES
        current = getattr(current, "orig", None) or current.__cause__
    return False


def summary(error: BaseException) -> str:
    """An error in one short line (the driver's own message, not SQLAlchemy's statement and
    parameters), in ASCII: it goes into a log line that must be storable itself."""
    if isinstance(error, DBAPIError) and error.orig is not None:
        error = error.orig
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0][:200] if lines else ''}"
    return text.encode("ascii", "backslashreplace").decode("ascii")


# Where a database error comes from: SQLAlchemy and the drivers (an OSError raised in one of
# these is the database's socket or file, not ours).
DATABASE_PACKAGES = frozenset({"sqlalchemy", "asyncpg", "aiosqlite", "sqlite3"})


def raised_by_database(exc: BaseException) -> bool:
    """Whether `exc`, or an error it wraps, was raised inside SQLAlchemy or a driver."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DBAPIError):
            return True
        frame = current.__traceback__
        while frame is not None:
            module = frame.tb_frame.f_globals.get("__name__", "")
            if module.partition(".")[0] in DATABASE_PACKAGES:
                return True
            frame = frame.tb_next
        current = getattr(current, "orig", None) or current.__cause__
    return False


def database_unreachable(exc: BaseException) -> bool:
    """`retryable_database_error` for code that does more than database work (a resolver, a
    page, a credential check): an OSError or a timeout counts only when the database stack
    raised it (a missing file or a proxy that does not answer is not a database outage)."""
    return retryable_database_error(exc) and raised_by_database(exc)
