"""Both log formats keep one record on one line whatever a client string holds."""

from __future__ import annotations

import io
import json
import logging

import pytest

from server import logs

HOSTILE = ["x\n2026-01-01 00:00:00,000 ERROR steerd: forged", "x\rOVERWRITE", "x\x1b[2J\x1b[31mred",
           "x\u2028y", "x\u0085y", "x\x7fy", "\u202eevil"]


def emit(fmt: str, rid: str, exc: bool = False) -> str:
    out = io.StringIO()
    h = logs.handler(fmt)
    h.setStream(out)
    log = logging.getLogger(f"steerd.test.{fmt}")
    log.propagate = False
    log.handlers = [h]
    log.setLevel(logging.INFO)
    if exc:
        try:
            raise ValueError("inner")
        except ValueError:
            log.exception("request %s failed", rid, extra={"request_id": rid})
    else:
        log.info("generate request_id=%s prompt_tokens=3", rid, extra={"request_id": rid})
    return out.getvalue()


def _no_controls(s: str) -> bool:
    return not any(logs.is_control(c) for c in s)


@pytest.mark.parametrize("rid", HOSTILE)
def test_text_format_escapes_controls_in_the_message(rid):
    text = emit("text", rid)
    assert text.endswith("\n") and text.count("\n") == 1 and _no_controls(text[:-1])
    assert f"request_id={logs.escape_controls(rid)} prompt_tokens=3" in text


@pytest.mark.parametrize("rid", HOSTILE)
def test_json_format_is_one_object_per_line(rid):
    text = emit("json", rid)
    assert text.count("\n") == 1 and _no_controls(text[:-1])
    rec = json.loads(text)
    assert _no_controls(rec["msg"]) and _no_controls(rec["request_id"])
    assert rec["msg"].startswith("generate request_id=")


def test_tracebacks_keep_their_lines_but_the_message_does_not_split():
    text = emit("text", "a\nforged", exc=True)
    first, *rest = text.splitlines()
    assert "request a\\x0aforged failed" in first
    assert any("ValueError: inner" in ln for ln in rest)  # the server's own traceback
    rec = json.loads(emit("json", "a\nforged", exc=True))
    assert "ValueError: inner" in rec["exc"] and "\n" not in rec["msg"]


def test_escape_leaves_printable_text_alone():
    for s in ("plain id-42", "ünïcode é 日本"):
        assert logs.escape_controls(s) == s
    assert logs.escape_controls("a\tb\nc\x1b") == "a\\x09b\\x0ac\\x1b"
    assert logs.escape_controls("a\u2029b") == "a\\u2029b"
