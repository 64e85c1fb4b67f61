"""Errors raised while reading and checking checkpoints."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

_SHOWN = 25


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, of an unknown layout, or with missing/unexpected/misshaped tensors."""


def format_list(title: str, items: Iterable[str]) -> str:
    """``title (n): a, b, ...`` with at most 25 items shown."""
    items = sorted(items)
    shown = ", ".join(items[:_SHOWN])
    more = f", ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"{title} ({len(items)}): {shown}{more}"


def format_lists(*labelled: tuple[str, list[str]]) -> list[str]:
    """:func:`format_list` of each ``(title, items)`` pair whose items are not empty, in order."""
    return [format_list(title, items) for title, items in labelled if items]


def require_keys(state: Mapping, keys: Iterable[str], *, family: str) -> None:
    """Raise CheckpointError naming the keys of ``keys`` that ``state`` lacks."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(
            f"this does not look like a {family} Mask R-CNN checkpoint; " + format_list("missing keys", missing)
        )
