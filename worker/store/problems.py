"""What an operator is told when the database cannot be used: which DATABASE_URL, and why."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from worker.errors import os_reason

# Every way connecting to (or migrating) the database fails for a reason outside the program:
# a socket that cannot open, a name that does not resolve, no answer, or PostgreSQL's refusal.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


def redacted_dsn(dsn: str) -> str:
    """The DSN with its password (in the user part or as a `password` parameter) masked."""
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        if ":" in user and user.split(":", 1)[1]:
            netloc = f"{user.split(':', 1)[0]}:***@{host}"
    query = parse_qsl(parts.query, keep_blank_values=True)
    masked = [(k, "***" if k.lower() == "password" else v) for k, v in query]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(masked, safe="/:")))


def describe_database_error(exc: BaseException, dsn: str) -> str:
    """One line: the database named by DATABASE_URL (password masked) and what went wrong."""
    where = f"DATABASE_URL={redacted_dsn(dsn)}"
    if isinstance(exc, asyncpg.PostgresError):
        return f"cannot use the database at {where}: PostgreSQL said: {exc}"
    return f"cannot connect to the database at {where}: {database_reason(exc)}"


def database_reason(exc: BaseException) -> str:
    """Why the database could not be used, in an operator's words: 'connection refused',
    'no answer in time', 'connection lost (...)', 'PostgreSQL said: ...'; never a class name."""
    if isinstance(exc, asyncpg.ConnectionDoesNotExistError):
        # Raised by the client, not sent by the server: the connection went away under it.
        return f"connection lost ({exc})"
    if isinstance(exc, asyncpg.PostgresError):
        return f"PostgreSQL said: {exc}"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, OSError):
        return os_reason(exc)
    return str(exc) or "connection failed"
