"""The images a caller passes -> the uint8 [H, W, 3] RGB arrays the pipeline reads.

:func:`as_rgb_uint8_images` accepts the forms images usually come in (numpy arrays from
OpenCV/PIL/scikit-image, torch tensors from torchvision-style loaders, grayscale, RGBA,
16-bit and floating-point images) and converts each one by the fixed rules below, or
rejects it with an error naming the image's index, what was received and what is accepted.

Conversion rules, applied per image:

* **Container.** One image, or a list/tuple of images (any mix of kinds and sizes). ``[]``
  gives ``[]``.
* **Kind.** ``numpy.ndarray`` or ``torch.Tensor`` (any device: it is copied to the CPU).
* **Layout.** 2-D ``[H, W]`` and ``[H, W, 1]`` are grayscale, replicated to three channels;
  ``[H, W, 3]`` is RGB; ``[H, W, 4]`` is RGBA, whose alpha is dropped before any value is
  read (so alpha never influences the checks or the scaling below). A 3-D torch tensor is
  channels-first ``[C, H, W]`` when its first dim is 1, 3 or 4 (torchvision's convention),
  otherwise ``[H, W, C]``; so a tensor ``[3, H, 4]`` is CHW. numpy arrays are always
  channels-last (the OpenCV/PIL convention): a CHW numpy array is rejected with a hint to
  transpose it. Channel order is taken as RGB; OpenCV's BGR arrays must be flipped by the
  caller (``img[..., ::-1]``), as no array says which order it holds.
* **dtype.**

  - ``uint8``: as is;
  - ``bool``: False -> 0, True -> 255;
  - ``uint16``: ``round(v * 255 / 65535)`` (65535 -> 255; exact, in integers);
  - floating (float16/32/64; bfloat16 and other torch float types via float32): when the
    largest colour value is <= 1.0 the image is taken as [0, 1] and multiplied by 255,
    otherwise as [0, 255]; then clipped to [0, 255] and rounded half up (0.5 -> 127.5 -> 128).
    NaN or infinite values are rejected;
  - other integers (int8..int64, uint32, uint64): taken as [0, 255]; rejected unless every
    colour value lies in [0, 255], since there is no one right way to rescale them;
  - complex, object, string and other dtypes are rejected.
* **Memory.** Strided, non-contiguous and negative-stride inputs (``img[:, ::-1]``) are
  accepted and copied to C-contiguous memory.

Ownership: the caller's arrays and tensors are never written to. Every conversion makes a new
array; only an input that needs no conversion at all (a C-contiguous uint8 ``[H, W, 3]`` numpy
array, returned as the same object, or a CPU uint8 tensor whose ``[H, W, 3]`` reading is
C-contiguous, returned as a numpy view of it) comes back without a copy, sharing the caller's
memory -- the engine only reads it, and a caller who writes into an output should copy it first.

Errors: ``TypeError`` for a wrong kind of object or dtype, ``ValueError`` for a wrong shape
(0-D, 1-D, 4-D and more, 2 or 5+ channels, H or W == 0) or wrong values (NaN/inf, integers
outside [0, 255]).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["as_rgb_uint8_images", "ACCEPTED_IMAGES"]

#: one line appended to every rejection, so the fix is in the message itself
ACCEPTED_IMAGES = (
    "accepted: a numpy array [H, W], [H, W, 1], [H, W, 3] (RGB) or [H, W, 4] (RGBA), "
    "or a torch tensor of those shapes or [1|3|4, H, W]; dtype uint8, uint16, bool, "
    "float ([0, 1] or [0, 255]) or integers in [0, 255]; H, W >= 1"
)

_CHANNEL_COUNTS = (1, 3, 4)
_UINT16_MAX = 65535


def as_rgb_uint8_images(images: Any) -> list[np.ndarray]:
    """Converts one image or a list/tuple of images to RGB uint8 arrays, by the module's rules.

    Args:
        images: a numpy array or torch tensor, or a list/tuple of them (see the module
            docstring for the layouts and dtypes accepted). Not modified.

    Returns:
        One C-contiguous ``np.uint8`` array ``[H, W, 3]`` (RGB) per image, in the order given;
        ``[]`` for an empty list/tuple. An input that is already such an array is returned as
        is (same object, no copy).

    Raises:
        TypeError: ``images`` is not an image or a list/tuple, or an element is not a numpy
            array / torch tensor, or has an unsupported dtype (complex, object, ...).
        ValueError: an image has an unsupported shape, is empty, or holds NaN/inf or integer
            values outside [0, 255].
    """
    if isinstance(images, (np.ndarray, torch.Tensor)):
        images = [images]
    elif not isinstance(images, (list, tuple)):
        raise TypeError(
            "images must be one image (e.g. a uint8 numpy array [H, W, 3] in RGB order, or a torch "
            f"tensor) or a list/tuple of images; got {_describe(images)}. {ACCEPTED_IMAGES}"
        )
    return [_as_rgb_uint8(image, index) for index, image in enumerate(images)]


def _as_rgb_uint8(image: Any, index: int) -> np.ndarray:
    """One image of any accepted form -> C-contiguous uint8 [H, W, 3]."""
    what = f"images[{index}]"
    if isinstance(image, torch.Tensor):
        array = _tensor_to_numpy(image, what)
        channels_first = _tensor_is_channels_first(tuple(image.shape))
    elif isinstance(image, np.ndarray):
        array = image
        channels_first = False
    else:
        raise TypeError(f"{what} is {_describe(image)}{_hint_for(image)}; {ACCEPTED_IMAGES}")

    _check_dtype(array, what, image)
    hwc = _to_hwc(array, channels_first, what, image)
    # RGBA: alpha is dropped here, before any value is read; other layouts keep the array object
    # itself so that an input needing no conversion is returned as is.
    colour = hwc[..., :3] if hwc.shape[2] == 4 else hwc
    converted = _to_uint8(colour, what, image)
    if converted.shape[2] == 1:
        # Grayscale: repeat after the dtype conversion, so that only one channel is converted.
        converted = np.repeat(converted, 3, axis=2)
    # No copy when already contiguous: an untouched uint8 RGB input comes back as itself.
    return np.ascontiguousarray(converted)


def _tensor_is_channels_first(shape: tuple[int, ...]) -> bool:
    """The layout rule for 3-D torch tensors: CHW when the first dim is a channel count.

    When both the first and the last dim could be channel counts (``[3, H, 4]``), torchvision's
    CHW convention wins; numpy arrays never reach here (they are always HWC).
    """
    return len(shape) == 3 and shape[0] in _CHANNEL_COUNTS


def _tensor_to_numpy(tensor: torch.Tensor, what: str) -> np.ndarray:
    """A CPU numpy view (or copy, for other devices and dtypes numpy lacks) of a tensor's values."""
    if tensor.layout != torch.strided:
        raise TypeError(
            f"{what} is {_describe(tensor)}; sparse tensors are not images, use .to_dense(). {ACCEPTED_IMAGES}"
        )
    if tensor.is_complex() or tensor.is_quantized:
        raise TypeError(
            f"{what} is {_describe(tensor)}; complex and quantized dtypes are not images. {ACCEPTED_IMAGES}"
        )
    if tensor.device.type == "meta":
        raise TypeError(f"{what} is {_describe(tensor)}; a meta tensor holds no pixel values. {ACCEPTED_IMAGES}")
    tensor = tensor.detach()
    if tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.float32, torch.float64):
        # bfloat16 and the float8 types have no numpy dtype; float32 holds all their values exactly.
        tensor = tensor.to(torch.float32)
    # .cpu() is a no-op for CPU tensors, so .numpy() then shares the caller's memory (read only).
    return tensor.cpu().numpy()


def _check_dtype(array: np.ndarray, what: str, original: Any) -> None:
    """TypeError unless the dtype is bool, an integer or a real float."""
    if array.dtype.kind not in "buif":
        raise TypeError(f"{what} has an unsupported dtype: {_describe(original)}; {ACCEPTED_IMAGES}")


def _to_hwc(array: np.ndarray, channels_first: bool, what: str, original: Any) -> np.ndarray:
    """Any accepted layout -> a view [H, W, C] with C in (1, 3, 4); checks H, W >= 1."""
    if array.ndim == 2:
        hwc = array[:, :, None]
    elif array.ndim == 3:
        hwc = array.transpose(1, 2, 0) if channels_first else array
        if hwc.shape[2] not in _CHANNEL_COUNTS:
            raise ValueError(
                f"{what} has {hwc.shape[2]} channels: {_describe(original)}; "
                f"{_layout_hint(original)}{ACCEPTED_IMAGES}"
            )
    else:
        batch_hint = " (for a batch, pass a list of images, e.g. list(batch))" if array.ndim == 4 else ""
        raise ValueError(f"{what} is {array.ndim}-D: {_describe(original)}{batch_hint}; {ACCEPTED_IMAGES}")
    if hwc.shape[0] == 0 or hwc.shape[1] == 0:
        raise ValueError(
            f"{what} is empty: {_describe(original)}; height and width must be at least 1. {ACCEPTED_IMAGES}"
        )
    return hwc


def _to_uint8(colour: np.ndarray, what: str, original: Any) -> np.ndarray:
    """Colour values [H, W, C] of any accepted dtype -> uint8 [H, W, C] by the module's dtype rules.

    Returns ``colour`` itself when it is already uint8, otherwise a new array.
    """
    kind, itemsize = colour.dtype.kind, colour.dtype.itemsize
    if kind == "u" and itemsize == 1:
        return colour
    if kind == "b":
        return colour.astype(np.uint8) * np.uint8(255)
    if kind == "u" and itemsize == 2:
        # round(v * 255 / 65535) in integers: 65535 is odd, so v * 255 / 65535 is never exactly
        # halfway and adding (65535 - 1) / 2 before the floor division rounds to nearest.
        wide = colour.astype(np.uint32) * 255 + (_UINT16_MAX - 1) // 2
        return (wide // _UINT16_MAX).astype(np.uint8)
    if kind in "iu":
        low, high = colour.min(), colour.max()
        if low < 0 or high > 255:
            raise ValueError(
                f"{what} has integer values outside [0, 255] (min {low}, max {high}): {_describe(original)}; "
                f"integer images other than uint16 must already be in [0, 255]. {ACCEPTED_IMAGES}"
            )
        return colour.astype(np.uint8)
    # Floating point. float64 (and wider) is worked in float64 so that values just below a
    # rounding boundary are not pushed across it; float32 is exact enough for the rest.
    work = colour.astype(np.float64 if itemsize >= 8 else np.float32)
    finite = np.isfinite(work)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise ValueError(f"{what} has {bad} NaN or infinite value(s): {_describe(original)}; {ACCEPTED_IMAGES}")
    if work.max() <= 1.0:
        work *= 255.0
    np.clip(work, 0.0, 255.0, out=work)
    # Round half up (not numpy's half to even), so that 0.5 and 127.5 map as one expects.
    return np.floor(work + 0.5).astype(np.uint8)


def _describe(obj: Any) -> str:
    """What was received, for error messages: the type, and shape/dtype/device for arrays and tensors."""
    if isinstance(obj, torch.Tensor):
        return f"a torch.Tensor of shape {tuple(obj.shape)}, dtype {obj.dtype}, on {obj.device}"
    if isinstance(obj, np.ndarray):
        return f"a numpy.ndarray of shape {obj.shape}, dtype {obj.dtype}"
    if obj is None:
        return "None"
    cls = type(obj)
    name = cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    return f"a {name}"


def _hint_for(obj: Any) -> str:
    """A conversion hint for common non-image objects (PIL images, nested lists, file paths)."""
    module = type(obj).__module__ or ""
    if module.split(".")[0] == "PIL":
        return ' (convert a PIL image with np.asarray(img.convert("RGB")))'
    if isinstance(obj, (list, tuple)):
        return " (images cannot be nested lists; pass each image as a numpy array, e.g. np.asarray(x, dtype=np.uint8))"
    if isinstance(obj, str):
        return " (file paths are not read; load the image first, e.g. with cv2 or PIL)"
    return ""


def _layout_hint(original: Any) -> str:
    """For a numpy array that looks channels-first, say how to make it channels-last."""
    if isinstance(original, np.ndarray) and original.ndim == 3 and original.shape[0] in _CHANNEL_COUNTS:
        return "numpy arrays are read as [H, W, C]; for a [C, H, W] array pass arr.transpose(1, 2, 0). "
    if isinstance(original, torch.Tensor):
        return "a 3-D tensor is read as [C, H, W] when its first dim is 1, 3 or 4, otherwise as [H, W, C]. "
    return ""
