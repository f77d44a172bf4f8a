"""structlog set-up: JSON lines off a TTY, readable on a TTY, and no secret in any line."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import structlog

# Keys whose values are never logged, whatever their content.
SECRET_KEYS = frozenset(
    {
        "password",
        "token",
        "auth_token",
        "x-auth-token",
        "x-subject-token",
        "secret",
        "application_credential_secret",
        "dsn_password",
    }
)
# Credentials inside URLs (postgresql://user:secret@host) are masked wherever they appear.
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^:/@\s]+:)[^@\s]+@", re.I)


# What a terminal acts on rather than shows: C0 controls (ESC, BEL, CR, LF, ...), DEL, C1
# controls, line separators and bidirectional overrides. Names from manifests and Glance are
# data and may hold any of them.
_OTHER_CONTROLS = "\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNPRINTABLE = re.compile(f"[\x00-\x1f{_OTHER_CONTROLS}]")
_UNPRINTABLE_BUT_NEWLINE = re.compile(f"[\x00-\x09\x0b-\x1f{_OTHER_CONTROLS}]")
# Multi-line by nature: a traceback keeps its line breaks (its other controls are escaped).
_MULTI_LINE_KEYS = frozenset({"exception", "stack"})


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """`text` safe to show on a terminal: every control character written as its escape."""
    pattern = _UNPRINTABLE_BUT_NEWLINE if keep_newlines else _UNPRINTABLE
    return pattern.sub(lambda found: found.group().encode("unicode_escape").decode(), text)


def _printable(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # Console lines only: JSON lines escape control characters themselves.
    for key, value in list(event.items()):
        # Other values are shown by their repr, which escapes control characters already.
        if isinstance(value, str):
            event[key] = printable(value, keep_newlines=key in _MULTI_LINE_KEYS)
    return event


def redact_url(text: str) -> str:
    """Mask the password in any URL inside `text`."""
    return _URL_PASSWORD.sub(r"\g<scheme>***@", text)


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if key.lower() in SECRET_KEYS:
            event[key] = "***"
        elif isinstance(event[key], str):
            event[key] = redact_url(event[key])
    return event


_configured_level = "info"


def debugging() -> bool:
    """Whether the process logs at debug level (then errors may show their traceback)."""
    return _configured_level == "debug"


class _CurrentStderr:
    """Whatever `sys.stderr` is when a line is written: while progress bars are drawn, rich
    swaps it for a proxy that prints each line above the bars."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(
    *, level: str = "info", stream: TextIO | None = None, json: bool | None = None
) -> None:
    """Configure structlog once per process. `json=None` chooses by whether `stream` is a TTY."""
    global _configured_level
    _configured_level = level.lower()
    if json is None:
        json = not (stream or sys.stderr).isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=(stream or sys.stderr).isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            *([] if json else [_printable]),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream or cast(TextIO, _CurrentStderr())),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    """A logger named after its module."""
    return structlog.get_logger(name)
