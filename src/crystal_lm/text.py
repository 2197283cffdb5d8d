"""Small wording helpers shared by error messages."""

from __future__ import annotations

from collections.abc import Sequence


def first_few(items: Sequence[str], shown: int = 5, sep: str = ", ") -> str:
    """`a, b, c, d, e and 3 more` (with sep "; ": `a; b; c; d; e; and 3 more`): a long list in a message, cut
    to its first `shown` items."""
    if len(items) <= shown:
        return sep.join(items)
    joiner = " " if sep == ", " else sep
    return f"{sep.join(items[:shown])}{joiner}and {len(items) - shown} more"
