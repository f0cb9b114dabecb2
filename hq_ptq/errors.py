"""One-line error messages: hq_ptq reports a failure as one line naming what to fix, so the underlying
exception is quoted by its first line only. No torch import."""

from __future__ import annotations


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first non-empty line of ``err``'s message (at most ``limit`` characters), else its type name."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
