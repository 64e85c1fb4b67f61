"""Errors raised while reading and checking checkpoints."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Mapping

_SHOWN = 25


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, of an unknown layout, or with missing/unexpected/misshaped tensors."""


def key_name(key, limit: int = 200) -> str:
    """A checkpoint key as shown in messages: strings as they are (cut at ``limit`` characters),
    other keys by their type (``str()`` of a hostile file's 5000-digit int key raises)."""
    if not isinstance(key, str):
        return f"<{type(key).__name__} key>"
    return key if len(key) <= limit else f"{key[:limit]}... ({len(key)} characters)"


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


#: a zip's members may declare at most this many times the file's size
_MAX_ZIP_EXPANSION = 2


def require_zip_within_file(path: str | os.PathLike) -> None:
    """Refuse a zip (``torch.save``) file whose members unpack to more than twice its size.

    ``torch.save`` stores its records uncompressed, but ``torch.load`` inflates compressed ones:
    a crafted file of a few kilobytes could unpack to gigabytes of zeros. A file that is not a
    readable zip passes (``torch.load`` then says what is wrong with it).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(member.file_size for member in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        return
    size = os.path.getsize(path)
    if declared > _MAX_ZIP_EXPANSION * size:
        raise CheckpointError(
            f"{str(path)!r}: its zip members unpack to {declared} bytes, more than {_MAX_ZIP_EXPANSION} x the "
            f"{size} bytes of the file; torch.save writes its records uncompressed, so this is not one of its files"
        )
