"""Image files as untrusted input: the size from the header first, then a bounded decode.

A file's header says how many pixels decoding will allocate, and a 100-byte PNG can claim
100000 x 100000. So :func:`read_image_header` reads only the header (JPEG, PNG, BMP, TIFF and
BigTIFF, WebP: the formats of :data:`IMAGE_SUFFIXES`), :func:`check_pixels` refuses what is over
``max_pixels``, and only then :func:`decode_image_file` runs OpenCV's decoder, whose every
failure (``cv2.error`` included) becomes an :class:`ImageDecodeError` with a reason a person
can read. The default cap, :data:`DEFAULT_MAX_PIXELS`, is Pillow's own decompression-bomb
error threshold (2 x ``PIL.Image.MAX_IMAGE_PIXELS``, about 179 megapixels: a 12000 x 12000
photograph passes, and its decoded RGB takes 432 MB).

Errors are of two kinds, which the batch job records (``errors.jsonl``) and may retry:

- :class:`ImageDecodeError` (a ``ValueError``): the bytes are not an image this engine reads,
  are truncated or corrupt, or are over ``max_pixels``. Reading again gives the same answer.
- ``OSError``: the file could not be read (gone, no permission, a network file system's
  passing error). Reading again may work.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "ImageDecodeError",
    "ImageHeader",
    "check_pixels",
    "decode_image_bytes",
    "decode_image_file",
    "read_image_header",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

#: Pillow's DecompressionBombError threshold (2 * PIL.Image.MAX_IMAGE_PIXELS)
DEFAULT_MAX_PIXELS = 2 * 89_478_485


class ImageDecodeError(ValueError):
    """A file that is not a readable image: unknown format, corrupt, truncated, or too large.

    Attributes:
        reason: the kind, one of ``"not_an_image"``, ``"corrupt"``, ``"too_large"``.
        pixels: for ``"too_large"``, the pixel count the header claims.
    """

    def __init__(self, message: str, *, reason: str, pixels: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.pixels = pixels


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says: ``format`` (``"jpeg"``, ``"png"``, ``"bmp"``,
    ``"tiff"``, ``"webp"``) and its stored ``height`` and ``width`` in pixels (before any EXIF
    rotation, which OpenCV applies when decoding JPEG: a rotated photograph decodes as
    ``width x height``)."""

    format: str
    height: int
    width: int

    @property
    def pixels(self) -> int:
        return self.height * self.width


def _not_an_image(what: str) -> ImageDecodeError:
    return ImageDecodeError(what, reason="not_an_image")


def _read_exactly(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ImageDecodeError(f"truncated {what} header", reason="corrupt")
    return data


def _jpeg_size(f: BinaryIO) -> tuple[int, int]:
    """(height, width) from the first start-of-frame marker (ITU T.81 B.2.2), walking the
    segments after SOI; APPn segments (EXIF thumbnails included) are skipped by their length."""
    while True:
        byte = _read_exactly(f, 1, "JPEG")
        if byte != b"\xff":
            raise ImageDecodeError("corrupt JPEG header (no marker where one must be)", reason="corrupt")
        marker = _read_exactly(f, 1, "JPEG")[0]
        while marker == 0xFF:  # fill bytes
            marker = _read_exactly(f, 1, "JPEG")[0]
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:  # markers without a length
            continue
        if marker in (0xD9, 0xDA):
            raise ImageDecodeError("corrupt JPEG header (scan or end before any frame)", reason="corrupt")
        (length,) = struct.unpack(">H", _read_exactly(f, 2, "JPEG"))
        if length < 2:
            raise ImageDecodeError("corrupt JPEG header (segment length < 2)", reason="corrupt")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            _, height, width = struct.unpack(">BHH", _read_exactly(f, 5, "JPEG"))
            return height, width
        f.seek(length - 2, io.SEEK_CUR)


def _tiff_size(f: BinaryIO, order: str, big: bool) -> tuple[int, int]:
    """(height, width) from the first IFD's ImageLength (257) and ImageWidth (256) tags."""
    if big:
        _read_exactly(f, 4, "BigTIFF")  # offset size (8) and a reserved zero
        (offset,) = struct.unpack(order + "Q", _read_exactly(f, 8, "BigTIFF"))
    else:
        (offset,) = struct.unpack(order + "I", _read_exactly(f, 4, "TIFF"))
    f.seek(offset)
    count_format, entry_format, entry_size = ("Q", "HHQ8s", 20) if big else ("H", "HHI4s", 12)
    (count,) = struct.unpack(order + count_format, _read_exactly(f, struct.calcsize(count_format), "TIFF"))
    found: dict[int, int] = {}
    for _ in range(min(count, 4096)):
        tag, kind, _, value = struct.unpack(order + entry_format, _read_exactly(f, entry_size, "TIFF"))
        if tag in (256, 257):
            if kind == 3:  # SHORT
                found[tag] = struct.unpack(order + "H", value[:2])[0]
            elif kind == 4:  # LONG
                found[tag] = struct.unpack(order + "I", value[:4])[0]
            elif kind == 16:  # LONG8 (BigTIFF)
                found[tag] = struct.unpack(order + "Q", value[:8])[0]
        if len(found) == 2:
            return found[257], found[256]
    raise ImageDecodeError("corrupt TIFF header (no image width and length)", reason="corrupt")


def _read_header(f: BinaryIO) -> ImageHeader:
    head = f.read(32)
    if head.startswith(b"\xff\xd8"):
        f.seek(2)
        return ImageHeader("jpeg", *_jpeg_size(f))
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        if len(head) < 24 or head[12:16] != b"IHDR":
            raise ImageDecodeError("corrupt PNG header (no IHDR chunk first)", reason="corrupt")
        width, height = struct.unpack(">II", head[16:24])
        return ImageHeader("png", height, width)
    if head.startswith(b"BM"):
        if len(head) < 26:
            raise ImageDecodeError("truncated BMP header", reason="corrupt")
        (dib_size,) = struct.unpack("<I", head[14:18])
        if dib_size == 12:  # OS/2 BITMAPCOREHEADER
            width, height = struct.unpack("<HH", head[18:22])
        else:
            width, height = struct.unpack("<ii", head[18:26])
        return ImageHeader("bmp", abs(height), abs(width))  # negative height: rows top-down
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        order = "<" if head[:2] == b"II" else ">"
        f.seek(4)
        return ImageHeader("tiff", *_tiff_size(f, order, big=head[2:4] in (b"+\x00", b"\x00+")))
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        if len(head) < 30:
            raise ImageDecodeError("truncated WebP header", reason="corrupt")
        chunk = head[12:16]
        if chunk == b"VP8 ":
            width, height = struct.unpack("<HH", head[26:30])
            return ImageHeader("webp", height & 0x3FFF, width & 0x3FFF)
        if chunk == b"VP8L":
            (bits,) = struct.unpack("<I", head[21:25])
            return ImageHeader("webp", ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1)
        if chunk == b"VP8X":
            width = int.from_bytes(head[24:27], "little") + 1
            height = int.from_bytes(head[27:30], "little") + 1
            return ImageHeader("webp", height, width)
        raise ImageDecodeError("corrupt WebP header (unknown first chunk)", reason="corrupt")
    if not head:
        raise _not_an_image("empty file")
    raise _not_an_image("not an image this engine reads (JPEG, PNG, BMP, TIFF or WebP)")


def read_image_header(source: str | os.PathLike | bytes | BinaryIO) -> ImageHeader:
    """The format and stored size of an image, from its header alone (a few bytes to a few
    kilobytes are read, whatever the file's size).

    Args:
        source: a path, the file's bytes, or a binary file object positioned at its start.

    Raises:
        ImageDecodeError: not one of the formats read here, or a header that is cut short or
            inconsistent (``reason`` ``"not_an_image"`` or ``"corrupt"``).
        OSError: the file cannot be read.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _read_header(io.BytesIO(source))
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return _read_header(f)
    return _read_header(source)


def check_pixels(header: ImageHeader, max_pixels: int | None) -> None:
    """Raises :class:`ImageDecodeError` (``reason="too_large"``) when the header claims more
    than ``max_pixels`` pixels (``None``: no limit), or no pixels at all (``"corrupt"``)."""
    if header.height <= 0 or header.width <= 0:
        raise ImageDecodeError(f"{header.format.upper()} header claims {header.width}x{header.height} pixels", reason="corrupt")
    if max_pixels is not None and header.pixels > max_pixels:
        raise ImageDecodeError(
            f"{header.format.upper()} of {header.width}x{header.height} = {header.pixels:,} pixels is over the limit of "
            f"{max_pixels:,} (raise it with --max-pixels / max_pixels=, or 0 for no limit)",
            reason="too_large",
            pixels=header.pixels,
        )


class _BufferReader:
    """Just enough of a binary file's interface over a buffer, without copying it."""

    def __init__(self, buffer: memoryview) -> None:
        self.buffer, self.position = buffer, 0

    def read(self, n: int) -> bytes:
        data = self.buffer[self.position : self.position + n].tobytes()
        self.position += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = max(0, offset + (self.position if whence == io.SEEK_CUR else 0))
        return self.position

    def tell(self) -> int:
        return self.position


def _jpeg_is_complete(buffer: memoryview) -> bool:
    """Whether an end-of-image marker follows the frame header. Entropy-coded data never holds
    0xFF 0xD9 (an 0xFF there is stuffed as 0xFF 0x00), and EXIF thumbnails, with their own
    marker, come before the frame; data appended after the image (motion photos) is allowed."""
    if buffer[-2:].tobytes() == b"\xff\xd9":
        return True
    reader = _BufferReader(buffer)
    reader.seek(2)
    _jpeg_size(reader)
    return bytes(buffer).find(b"\xff\xd9", reader.tell()) >= 0


def decode_image_bytes(data: bytes | np.ndarray, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """uint8 [H, W, 3] RGB, C-contiguous, from an encoded image's bytes.

    The header is read and checked first (:func:`read_image_header`, :func:`check_pixels`), so
    a file that claims too many pixels is refused before any pixel memory is allocated. Grey,
    16-bit and alpha images are converted as ``cv2.IMREAD_COLOR`` does; EXIF orientation is
    applied (OpenCV's default, which mmcv's ``imfrombytes(flag="color")`` keeps too). A JPEG
    whose data ends before its end-of-image marker is refused as truncated: OpenCV 4 returns
    such an image with grey rows instead of failing.

    Args:
        max_pixels: the largest ``height * width`` accepted; ``None``: no limit of ours
            (OpenCV's own ``OPENCV_IO_MAX_IMAGE_PIXELS``, 2^30 by default, still applies).

    Raises:
        ImageDecodeError: not an image, corrupt, truncated or too large.
    """
    buffer = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    header = _read_header(_BufferReader(buffer.data))
    check_pixels(header, max_pixels)
    if header.format == "jpeg" and not _jpeg_is_complete(buffer.data):
        raise ImageDecodeError("truncated JPEG (no end-of-image marker)", reason="corrupt")
    import cv2

    try:
        if hasattr(cv2, "IMREAD_COLOR_RGB"):  # OpenCV >= 4.10 decodes straight to RGB
            image = cv2.imdecode(buffer, cv2.IMREAD_COLOR_RGB)
        else:
            image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
            if image is not None:
                cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)
    except cv2.error as exc:
        raise ImageDecodeError(f"OpenCV cannot decode this {header.format.upper()}: {str(exc).strip().splitlines()[-1]}", reason="corrupt") from None
    if image is None:
        raise ImageDecodeError(f"corrupt or truncated {header.format.upper()} (OpenCV could not decode it)", reason="corrupt")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageDecodeError(f"decoded to shape {image.shape}, not [H, W, 3]", reason="corrupt")
    return np.ascontiguousarray(image)


def decode_image_file(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """uint8 [H, W, 3] RGB from an image file; see :func:`decode_image_bytes`.

    The header is checked before the whole file is read, so a huge file that claims too many
    pixels costs a few bytes of reading; it is checked again on the bytes read, which are what
    OpenCV decodes (the file may have changed in between).

    Raises:
        ImageDecodeError: not an image, corrupt, truncated or too large.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        check_pixels(_read_header(f), max_pixels)
        f.seek(0)
        data = np.fromfile(f, dtype=np.uint8)
    return decode_image_bytes(data, max_pixels=max_pixels)
