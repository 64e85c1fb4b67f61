"""Checkpoint reading: a file or state dict in, the engine's canonical tensors and what the file says out.

Families read so far: torchvision (``maskrcnn_resnet50_fpn`` v1 and v2 layouts, basic-block
ResNet-18/34, bottleneck ResNet / ResNeXt of any depth), Detectron2 (model-zoo ``.pkl`` and ``.pth``),
mmdetection (2.x / 3.x ``.pth``) and matterport's Keras ``.h5`` files (:mod:`weights.matterport`,
needs h5py). The family is detected from the checkpoint's keys, or forced with ``family=``; each maps
onto the same canonical names (:mod:`weights.spec`).

Checkpoint files are untrusted: whatever a file holds, reading it gives the checkpoint or a
:class:`CheckpointError` (a missing path: FileNotFoundError), runs no code from it, reads no other
file and takes memory in proportion to its size. Each family reader says what it refuses.

This package is a leaf of the import map: it imports nothing from :mod:`engine`. It does not know
the engine's configuration; :func:`load_checkpoint` reports what the file itself states (batch-norm
eps, stride placement, pixel statistics, class names) and :mod:`engine.loading` turns that into the
family's preset and builds the network.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from weights import detectron2 as d2_format
from weights import matterport as mp_format
from weights import mmdetection as mm_format
from weights import torchvision as tv_format
from weights.errors import CheckpointError, format_list, key_name, require_zip_within_file
from weights.spec import ArchitectureSpec

__all__ = [
    "FAMILIES",
    "ArchitectureSpec",
    "Checkpoint",
    "CheckpointError",
    "read_state_dict",
    "detect_family",
    "load_checkpoint",
]

FAMILIES = ("torchvision", "detectron2", "mmdetection", "matterport")

# key prefixes that each family's Mask R-CNN parameters start with, to name the closest family
_FAMILY_PREFIXES = {
    "torchvision": ("backbone.body.", "backbone.fpn.", "rpn.head.", "roi_heads."),
    "detectron2": ("backbone.bottom_up.", "backbone.fpn_", "proposal_generator.", "roi_heads."),
    "mmdetection": ("backbone.conv1.", "backbone.bn1.", "backbone.layer", "neck.", "rpn_head.", "roi_head."),
}


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint in the engine's canonical layout, and what the file says about how it runs.

    Attributes:
        state_dict: float32 tensors under the engine's parameter names.
        spec: network sizes read from the tensors' shapes.
        family: checkpoint family name ("torchvision", "detectron2", "mmdetection", "matterport").
        bn_eps: batch-norm eps the file implies (torchvision: 0 without ``num_batches_tracked``,
            1e-5 with it; Detectron2 and mmdetection: 1e-5); None: the family preset's.
        stride_in_1x1: where the bottleneck stride sits (Detectron2's zoo convention, mmdetection's
            ``style``); None: the preset's.
        channel_order: "RGB" or "BGR" as the file's config states it (mmdetection); None: the preset's.
        pixel_mean, pixel_std: the normalisation the file stores or states (Detectron2 buffers or zoo
            defaults, mmdetection config text); None: the preset's.
        class_names: foreground class names the file carries (mmdetection's meta), in label order.
        notes: the family reader's full report (:class:`weights.detectron2.Detectron2Notes`,
            :class:`weights.mmdetection.MMDetectionNotes`), None for torchvision and matterport.
    """

    state_dict: dict[str, Tensor]
    spec: ArchitectureSpec
    family: str
    bn_eps: float | None = None
    stride_in_1x1: bool | None = None
    channel_order: str | None = None
    pixel_mean: tuple[float, float, float] | None = None
    pixel_std: tuple[float, float, float] | None = None
    class_names: tuple[str, ...] | None = None
    notes: object = None


def read_state_dict(source: str | os.PathLike | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A plain state dict of tensors from a ``.pth`` path or a mapping (which is not modified)."""
    state = _read_raw(source)
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            "expected a plain state dict of tensors; " + format_list("entries that are not tensors", map(str, bad))
        )
    return dict(state)


#: the first bytes of an HDF5 file (Keras .h5) without a user block
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _read_raw(source):
    """The checkpoint as stored: a mapping (state dict or container); a file is read once.

    Files are told apart by suffix and content: ``.pkl`` as a Detectron2 pickle, HDF5 (by suffix
    or signature) and Keras 3 archives (zip signature and members, refused there) as matterport,
    anything else with ``torch.load(weights_only=True)``. A missing path raises FileNotFoundError;
    a directory, device, empty or malformed file CheckpointError.
    """
    if isinstance(source, Mapping):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            "weights must be a path to a checkpoint file or a state dict (mapping of name to tensor); "
            f"got {type(source).__name__}"
        )
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
    if not path.is_file():
        what = "a directory" if path.is_dir() else "not a regular file (a device, a pipe?)"
        raise CheckpointError(f"{str(path)!r} is {what}; expected a checkpoint file (.pth, .pkl, .h5)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{str(path)!r} is empty (0 bytes); expected a checkpoint file (.pth, .pkl, .h5)")
    if path.suffix == ".pkl":
        return d2_format.read_detectron2(path)
    with open(path, "rb") as f:
        is_hdf5 = f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE
    if path.suffix in (".h5", ".hdf5", ".keras") or is_hdf5 or mp_format.is_keras_archive(path):
        return mp_format.read_matterport(path)
    require_zip_within_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or a model-zoo pickle under another name
        try:
            return d2_format.read_detectron2(path)
        except CheckpointError:
            mm_format.read_file(path)  # raises the clearer message when weights_only refused an object
            raise CheckpointError(
                f"could not read {str(path)!r} as a PyTorch checkpoint ({type(exc).__name__}: {exc}); "
                "expected a state dict saved with torch.save, or a Detectron2 .pkl/.pth"
            ) from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"expected a state dict (mapping of name to tensor) or a {{'model': state_dict}} container; "
            f"the file holds a {type(obj).__name__}"
        )
    return obj


def _parameter_keys(raw: Mapping) -> list[str]:
    """Parameter names of a state dict, or of a container's ``model`` (Detectron2) or ``state_dict`` (mmdet)."""
    for entry in ("model", "state_dict"):
        if isinstance(raw.get(entry), Mapping):
            return [key_name(k) for k in raw[entry]]
    return [key_name(k) for k in raw]


def detect_family(raw: Mapping) -> str:
    """The checkpoint family of a loaded state dict or container, from its key names.

    Raises:
        CheckpointError: no known family fits; names the closest family and the keys that did not fit.
    """
    keys = _parameter_keys(raw)
    if mp_format.looks_like_matterport(keys):
        return "matterport"
    if d2_format.looks_like_detectron2(keys):
        return "detectron2"
    if mm_format.looks_like_mmdetection(keys):
        return "mmdetection"
    if all(k in tv_format.rename_legacy_keys({k: None for k in keys}) for k in tv_format.SIGNATURE_KEYS):
        return "torchvision"
    fitting = {f: [k for k in keys if k.startswith(p)] for f, p in _FAMILY_PREFIXES.items()}
    closest = max(fitting, key=lambda f: len(fitting[f]))
    misfits = [k for k in keys if k not in set(fitting[closest])]
    raise CheckpointError(
        f"checkpoint of no known family (known: {', '.join(FAMILIES)}); closest: {closest}, "
        f"{len(fitting[closest])} of {len(keys)} keys fit its layout; " + format_list("keys that did not fit", misfits)
    )


def load_checkpoint(source: str | os.PathLike | Mapping[str, Tensor], *, family: str | None = None) -> Checkpoint:
    """Read a checkpoint and convert it to the engine's canonical layout.

    Args:
        source: a file path or an in-memory state dict / container (not modified).
        family: "torchvision", "detectron2", "mmdetection" or "matterport"; None detects it from the keys.

    Returns:
        The canonical tensors, the sizes read from their shapes, the family and what the file states
        about its behaviour; :func:`engine.loading.checkpoint_config` makes the configuration from it.
    """
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(map(repr, FAMILIES))} or None; got {family!r}")
    raw = _read_raw(source)
    family = family or detect_family(raw)
    try:
        return _convert(raw, family)
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, AttributeError, ValueError, RuntimeError) as exc:
        # a tensor missing or of an unexpected shape or type deep in a family's conversion: the
        # file is malformed for that family, whatever the Python error that found it
        detail = f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"malformed {family} checkpoint ({detail[:300]})") from exc


def _convert(raw, family: str) -> Checkpoint:
    """The canonical :class:`Checkpoint` of a checkpoint already read and of a known family."""
    if family == "matterport":
        canonical, spec = mp_format.convert(raw)
        return Checkpoint(state_dict=canonical, spec=spec, family="matterport")
    if family == "detectron2":
        canonical, spec, notes = d2_format.convert(d2_format.read_detectron2(raw))
        return Checkpoint(
            state_dict=canonical,
            spec=spec,
            family="detectron2",
            bn_eps=notes.bn_eps,
            stride_in_1x1=notes.stride_in_1x1,
            pixel_mean=tuple(notes.pixel_mean),
            pixel_std=tuple(notes.pixel_std),
            notes=notes,
        )
    if family == "mmdetection":
        canonical, spec, notes = mm_format.convert(raw)
        return Checkpoint(
            state_dict=canonical,
            spec=spec,
            family="mmdetection",
            bn_eps=notes.bn_eps,
            stride_in_1x1=notes.stride_in_1x1,
            channel_order=notes.channel_order,
            pixel_mean=tuple(notes.pixel_mean),
            pixel_std=tuple(notes.pixel_std),
            class_names=notes.class_names,
            notes=notes,
        )
    state = read_state_dict(raw)
    canonical, spec, eps = tv_format.convert(state)
    return Checkpoint(state_dict=canonical, spec=spec, family="torchvision", bn_eps=eps)
