"""Log formats (text, JSON) that a client's strings cannot forge lines in.

Client strings reach log lines (the ``request_id`` above all). A newline in one would start
a line that looks like the server's own; a carriage return or an ANSI escape would rewrite
what a terminal shows. Two defences: the servicer refuses such characters in
``request_id`` (``check_printable``, INVALID_ARGUMENT naming the field), and both formats
escape whatever control characters still reach a message (``escape_controls``), so one log
record is always one line. Tracebacks keep their newlines: they come from the server.
"""

from __future__ import annotations

import json
import logging
import unicodedata

from sae_runtime.errors import InvalidRequestError

# Cc: C0/C1 controls and DEL (newline, CR, ESC, ...); Cf: format characters (bidi overrides,
# zero-width); Zl/Zp: the Unicode line and paragraph separators.
_CONTROL_CATEGORIES = frozenset(("Cc", "Cf", "Zl", "Zp"))


def is_control(ch: str) -> bool:
    return unicodedata.category(ch) in _CONTROL_CATEGORIES


def escape_controls(s: str) -> str:
    """``s`` with every control character written as ``\\xNN`` / ``\\uNNNN``."""
    if s.isprintable() and s.isascii():  # the common case, no per-character work
        return s
    return "".join((f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
                   if is_control(c) else c for c in s)


def check_printable(field: str, value: str) -> None:
    """Raise InvalidRequestError naming ``field`` if ``value`` holds a control character."""
    for i, c in enumerate(value):
        if is_control(c):
            raise InvalidRequestError(
                field, f"control character U+{ord(c):04X} at index {i} is not allowed "
                       "(ids appear in logs)")


class TextFormatter(logging.Formatter):
    """``asctime level logger: message`` with control characters in the message escaped."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and request_id when a record has one.

    ``json.dumps`` escapes C0 controls, and with ``ensure_ascii`` everything beyond ASCII
    (C1 controls, U+2028/U+2029); DEL is escaped here too.
    """

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "msg": escape_controls(record.getMessage())}
        if getattr(record, "request_id", None):
            out["request_id"] = escape_controls(str(record.request_id))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def handler(log_format: str) -> logging.Handler:
    """A stderr handler with the ``--log-format`` formatter."""
    h = logging.StreamHandler()
    h.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    return h
