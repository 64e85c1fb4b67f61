"""matterport Mask_RCNN checkpoints (Keras / TensorFlow 1, ``mask_rcnn_coco.h5``).

A matterport file is a Keras HDF5 weights file (``model.save_weights`` of Keras 2.x, or the
``model_weights`` group of a full-model ``.h5``): the root attribute ``layer_names`` lists the
layers, each layer group has an attribute ``weight_names`` (``conv1/kernel:0``, ...; Keras 3's
legacy writer drops the ``:0``) naming its datasets. The RPN's three layers live inside the
nested layer group ``rpn_model``. Reading needs ``h5py`` (``pip install h5py``, or the
project's ``matterport`` extra).

**Untrusted files.** HDF5 can point outside the file: external links, datasets stored in other
files or mapped from them (virtual datasets), filters that libhdf5 loads as plugins. Such a
file is refused before any weight is read (:func:`read_matterport`), as are a malformed Keras
layout (a group where a dataset belongs, names that are not UTF-8, non-numeric weights, wrong
ranks) and datasets declaring far more data than the file holds. Keras 3 ``.keras`` archives (zip)
are recognised by their signature and refused with a note on writing the legacy HDF5 file.

The mapping onto the engine's layout (reference notes, sections D.3-D.12 and E):

- Keras kernels are HWIO: convs are transposed to OIHW, Dense kernels (in, out) to (out, in),
  ``Conv2DTranspose`` kernels (kh, kw, out, in) to (in, out, kh, kw) (no spatial flip: both
  frameworks compute the adjoint of cross-correlation).
- Every backbone and mask-head conv has a bias and is followed by batch norm (Keras eps 1e-3):
  ``BN(conv(x) + b)`` is ``BN'(conv(x))`` with ``running_mean' = running_mean - b``, so the bias
  moves into the (frozen) batch norm's mean, exactly.
- The box head's ``mrcnn_class_conv1`` (7x7 valid conv on the pooled map, i.e. a fully connected
  layer over it) and ``mrcnn_class_conv2`` (1x1), each with batch norm, become the engine's
  ``fc6`` / ``fc7`` with the batch norm folded in (computed in float64, stored in float32).
- The RPN's 2-way softmax per anchor (channels ``2a`` background, ``2a + 1`` foreground) becomes
  one logit per anchor, ``fg - bg`` (so that ``sigmoid(logit)`` is the softmax's foreground
  probability); its anchors come in the order of ratios w/h (0.5, 1, 2), i.e. h/w (2, 1, 0.5),
  which the preset's ``anchor_aspect_ratios`` follow.
- Box deltas are stored (dy, dx, log dh, log dw); rows are reordered to the engine's (dx, dy, dw, dh).
- Classes: 81 (background first), box regressors for all 81, mask logits for all 81.

Backbone depth (ResNet-50 or -101) is read from the ``res4*`` layers present.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from weights.errors import CheckpointError, format_list, key_name
from weights.spec import ArchitectureSpec

FAMILY = "matterport"
BN_EPS = 1e-3  # Keras BatchNormalization's default epsilon

#: weights every matterport Mask R-CNN file has (names without Keras' ":0" suffix)
SIGNATURE_KEYS = (
    "conv1/kernel",
    "bn_conv1/gamma",
    "res2a_branch2a/kernel",
    "fpn_c5p5/kernel",
    "rpn_conv_shared/kernel",
    "mrcnn_class_logits/kernel",
    "mrcnn_mask/kernel",
)
_EXPECTED = (
    "expected a matterport Mask_RCNN Keras weights file (.h5) with layers such as conv1, bn_conv1, "
    "res2a_branch2a, fpn_c5p5, rpn_model/rpn_conv_shared, mrcnn_class_logits, mrcnn_mask"
)
_BN_PARTS = ("gamma", "beta", "moving_mean", "moving_variance")


# --- reading -----------------------------------------------------------------------------------

_ZIP_SIGNATURE = b"PK\x03\x04"
#: HDF5 filters built into libhdf5 and h5py (deflate, shuffle, fletcher32, szip, nbit,
#: scale-offset, lzf); any other id makes libhdf5 search its plugin path for a library to load
_BUILTIN_FILTERS = {1, 2, 3, 4, 5, 6, 32000}
#: datasets may declare at most this many times the file's size: Keras writes weights
#: uncompressed, and float weights hardly compress
_MAX_EXPANSION = 2
_LEGACY_H5 = (
    "this reader takes the Keras 2 / TF1 HDF5 weights file that matterport's "
    "model.keras_model.save_weights('mask_rcnn.h5') writes (root attribute layer_names, a group per layer); "
    "from Keras 3, model.save('mask_rcnn.h5') writes that legacy HDF5 layout"
)
_KERAS3_ARCHIVE = (
    "is a Keras 3 .keras archive (a zip of config.json, metadata.json and model.weights.h5), which is not "
    f"read; {_LEGACY_H5}"
)


def _strip(name: str) -> str:
    """``conv1/kernel:0`` -> ``conv1/kernel`` (Keras 2 suffixes variable names with the output index)."""
    return re.sub(r":\d+$", "", name)


def is_keras_archive(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Keras 3 ``.keras`` zip archive, told by its zip signature and members
    (whatever its suffix)."""
    with open(path, "rb") as f:
        if f.read(4) != _ZIP_SIGNATURE:
            return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False
    return "model.weights.h5" in names or {"config.json", "metadata.json"} <= names


def _refuse_zip(path: Path) -> None:
    """Keras 3 archives (and other zips) are not HDF5: say what they are instead of h5py's error."""
    if is_keras_archive(path):
        raise CheckpointError(f"{str(path)!r} {_KERAS3_ARCHIVE}")
    with open(path, "rb") as f:
        if f.read(4) == _ZIP_SIGNATURE:
            raise CheckpointError(
                f"{str(path)!r} is a zip archive, not an HDF5 file: a torch.save .pth, or a Keras 3 .keras archive "
                f"(cut short?); {_EXPECTED}"
            )


def _text(value: bytes) -> str:
    return value.decode("utf8", errors="backslashreplace")


def _check_links(root, where: str) -> None:
    """Refuse, before any weight is read, whatever would make libhdf5 read another file or load code.

    Walks every link of the file without following any: external links (to an object in another
    HDF5 file), datasets whose data lies in other files (external storage) or is mapped from
    other datasets and files (virtual datasets), datasets using filters other than the built-in
    ones (libhdf5 would search its plugin path for a library to load), and soft links whose target
    is not an object of this file reached by its own groups. A Keras weights file has none of these.
    """
    import h5py
    from h5py import h5l

    seen = set()  # groups already walked (hard links may make cycles)
    pending = [(root, "")]
    while pending:
        group, path = pending.pop()
        if group.id in seen:
            continue
        seen.add(group.id)
        names: list[bytes] = []
        group.id.links.iterate(names.append)  # link names only: nothing is followed
        for name in names:
            link = f"{path}/{_text(name)}"
            kind = group.id.links.get_info(name).type
            if kind == h5l.TYPE_EXTERNAL:
                filename, target = group.id.links.get_val(name)
                raise CheckpointError(
                    f"{where}: {link} is an external link to {_text(target)} in the file {_text(filename)!r}; "
                    "a checkpoint's weights must be in the file itself, and a crafted file could make the "
                    "reader open any other file"
                )
            if kind == h5l.TYPE_SOFT:
                _check_soft_link(root, path, link, _text(group.id.links.get_val(name)), where)
                continue
            if kind != h5l.TYPE_HARD:
                raise CheckpointError(f"{where}: {link} is a user-defined HDF5 link (type {kind}), which is not read")
            node = group[name]
            if isinstance(node, h5py.Group):
                pending.append((node, link))
            elif isinstance(node, h5py.Dataset):
                _check_dataset(node, link, where)


def _check_soft_link(root, parent: str, link: str, target: str, where: str) -> None:
    """A soft link must name an object of this file reached through hard links only."""
    from h5py import h5l

    full = target if target.startswith("/") else f"{parent}/{target}"
    group = root
    parts = [p for p in full.split("/") if p not in ("", ".")]
    for i, part in enumerate(parts):
        name = part.encode("utf8", errors="surrogateescape")
        exists = hasattr(group, "id") and hasattr(group.id, "links") and group.id.links.exists(name)
        if not exists or group.id.links.get_info(name).type != h5l.TYPE_HARD:
            raise CheckpointError(
                f"{where}: {link} is a soft link to {target}, which is not an object of this file reached by its "
                "groups (missing, or through other links)"
            )
        if i < len(parts) - 1:
            group = group[name]


def _check_dataset(dataset, path: str, where: str) -> None:
    if dataset.external:
        files = ", ".join(repr(_text(name) if isinstance(name, bytes) else str(name)) for name, *_ in dataset.external)
        raise CheckpointError(
            f"{where}: dataset {path} keeps its data in other files ({files}); a checkpoint's weights must be "
            "in the file itself, and a crafted file could make the reader read any other file"
        )
    if dataset.is_virtual:
        sources = ", ".join(f"{_text(s.file_name) if isinstance(s.file_name, bytes) else s.file_name}:{s.dset_name}"
                            for s in dataset.virtual_sources())
        raise CheckpointError(
            f"{where}: dataset {path} is a virtual dataset mapped from {sources}; a checkpoint's weights must be "
            "stored in the file itself"
        )
    plist = dataset.id.get_create_plist()
    plugins = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    plugins = [f for f in plugins if f not in _BUILTIN_FILTERS]
    if plugins:
        raise CheckpointError(
            f"{where}: dataset {path} needs HDF5 filter plugins {plugins}, which libhdf5 would load as shared "
            "libraries; Keras weights files use no filters"
        )


def _string_list(node, attr: str, where: str) -> list[str]:
    """A Keras name-list attribute (``layer_names``, ``weight_names``) as strings."""
    values = np.asarray(node.attrs[attr])
    if values.size == 0:
        return []
    if values.ndim != 1:
        raise CheckpointError(
            f"{where}: attribute {attr!r} of {node.name} is not a list of names (shape {values.shape})"
        )
    names = []
    for value in values:
        if not isinstance(value, (bytes, str)):
            raise CheckpointError(
                f"{where}: attribute {attr!r} of {node.name} holds a {type(value).__name__}, not a name"
            )
        # h5py gives fixed-length names as bytes, variable-length ones as str (bad bytes as surrogates)
        raw = bytes(value) if isinstance(value, bytes) else value.encode("utf8", errors="surrogateescape")
        try:
            names.append(raw.decode("utf8"))
        except UnicodeDecodeError:
            raise CheckpointError(
                f"{where}: attribute {attr!r} of {node.name} holds a name that is not UTF-8: {raw!r}"
            ) from None
    return names


def _weight_datasets(f, where: str) -> list[tuple[str, object]]:
    """``(name, dataset)`` of every weight that ``layer_names`` and each layer's ``weight_names`` list."""
    import h5py

    group = f.get("model_weights", f)
    if not isinstance(group, h5py.Group):
        raise CheckpointError(f"{where}: model_weights is a dataset, not a group of layers; {_EXPECTED}")
    if "layer_names" not in group.attrs:
        if "layers" in group and "vars" in group:
            raise CheckpointError(
                f"{where} is a Keras 3 weights file (model.save_weights('x.weights.h5'): layers/<name>/vars/<i>, "
                f"without weight names), which is not read; {_LEGACY_H5}"
            )
        raise CheckpointError(f"{where} is HDF5 but has no Keras 'layer_names' attribute; {_EXPECTED}")
    found = []
    for layer in _string_list(group, "layer_names", where):
        node = group.get(layer)
        if not isinstance(node, h5py.Group):
            what = "no such group" if node is None else f"a {type(node).__name__.lower()}, not a group"
            raise CheckpointError(f"{where}: layer_names lists {layer!r}, and {group.name} has {what} of that name")
        weight_names = _string_list(node, "weight_names", where) if "weight_names" in node.attrs else []
        for name in weight_names:
            dataset = node.get(name)
            if not isinstance(dataset, h5py.Dataset):
                what = "nothing" if dataset is None else "a group"
                raise CheckpointError(
                    f"{where}: layer {layer!r} lists the weight {name!r}, but {node.name} holds {what} of that name"
                )
            if dataset.dtype.kind not in "fiu":
                raise CheckpointError(f"{where}: weight {name!r} is of type {dataset.dtype}, not numbers")
            found.append((_strip(name), dataset))
    return found


def _check_total_size(datasets: list[tuple[str, object]], path: Path, where: str) -> None:
    """Refuse datasets declaring far more bytes than the file: their data cannot be in it (a tiny
    compressed or unwritten dataset of any shape reads as that many bytes)."""
    total = sum(math.prod(d.shape or ()) * d.dtype.itemsize for _, d in datasets)
    size = path.stat().st_size
    if total > _MAX_EXPANSION * size:
        raise CheckpointError(
            f"{where}: its weights declare {total} bytes, more than {_MAX_EXPANSION} x the {size} bytes of the file; "
            "Keras stores weights uncompressed, so the data of these is not in the file"
        )


def read_matterport(source: str | os.PathLike | Mapping) -> dict[str, np.ndarray]:
    """The file's weights as ``{"layer/weight": float32 ndarray}`` (``conv1/kernel``, ``bn_conv1/gamma``...).

    ``source``: a path to a Keras ``.h5`` weights or model file, or a mapping already in that
    form (names with or without ``:0``; values numpy arrays or tensors; not modified).

    The file is checked before any weight is read (:func:`_check_links`): no external links,
    external or virtual datasets, filter plugins or soft links out of the file. Then every layer
    that ``layer_names`` lists must be a group and every weight its ``weight_names`` lists a
    numeric dataset, together no larger than the file holds.

    Raises:
        CheckpointError: the file is not HDF5 (a Keras 3 ``.keras`` archive is named as such), is
            corrupt, refers outside itself, lacks the Keras layout, or h5py is missing.
    """
    if isinstance(source, Mapping):
        weights = {}
        for key, value in source.items():
            try:
                weights[_strip(key_name(key))] = np.asarray(
                    value.detach().cpu() if isinstance(value, Tensor) else value, dtype=np.float32
                )
            except (TypeError, ValueError) as exc:
                raise CheckpointError(
                    f"matterport weight {key_name(key)!r} is not an array of numbers ({exc})"
                ) from exc
        return weights
    try:
        import h5py
    except ImportError as exc:
        raise CheckpointError(
            "reading a matterport .h5 checkpoint needs h5py: pip install h5py (or this project's [matterport] extra)"
        ) from exc
    path = Path(source)
    where = repr(str(path))
    _refuse_zip(path)
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise CheckpointError(f"could not read {where} as an HDF5 file ({exc}); {_EXPECTED}") from exc
    with handle as f:
        try:
            _check_links(f, where)
            datasets = _weight_datasets(f, where)
            _check_total_size(datasets, path, where)
            return {name: np.asarray(dataset, dtype=np.float32) for name, dataset in datasets}
        except CheckpointError:
            raise
        except Exception as exc:  # a corrupt file fails in h5py as OSError, KeyError, RuntimeError, ValueError...
            raise CheckpointError(
                f"could not read {where} as a Keras HDF5 weights file, corrupt? ({type(exc).__name__}: {exc}); "
                f"{_EXPECTED}"
            ) from exc


def looks_like_matterport(keys: Iterable[str]) -> bool:
    """Whether the (Keras) weight names are those of a matterport Mask R-CNN."""
    names = {_strip(key_name(k)) for k in keys}
    return all(k in names for k in SIGNATURE_KEYS)


# --- conversion ----------------------------------------------------------------------------------


def _letters(weights: Mapping[str, np.ndarray], stage: int) -> list[str]:
    """Block letters of a ResNet stage present in the file, in order (stage 4 of R101: a..w)."""
    found = {m.group(1) for k in weights if (m := re.match(rf"^res{stage}([a-z]+)_branch2a/kernel$", k))}
    # Keras names blocks 'a', then chr(98 + i): single letters in alphabetical order
    return sorted(found, key=lambda s: (len(s), s))


def _conv(kernel: np.ndarray) -> Tensor:
    """Keras Conv2D kernel [kh, kw, in, out] -> PyTorch [out, in, kh, kw]."""
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))


def _tensor(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _deltas_to_xywh(weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Reorder a delta regressor's output rows from matterport's (dy, dx, dh, dw) per anchor or class
    to the engine's (dx, dy, dw, dh); ``weight`` [4K, ...], ``bias`` [4K]."""
    order = torch.arange(weight.shape[0]).view(-1, 4)[:, [1, 0, 3, 2]].reshape(-1)
    return weight[order].contiguous(), bias[order].contiguous()


#: the two Dense layers (2-D kernels); every other kernel is a Conv2D / Conv2DTranspose's (4-D)
_DENSE_KERNELS = ("mrcnn_class_logits/kernel", "mrcnn_bbox_fc/kernel")


def _check_ranks(weights: Mapping[str, np.ndarray]) -> None:
    """Kernels must be 4-D (2-D for the Dense layers), biases and batch-norm vectors 1-D."""
    wrong = []
    for name, value in weights.items():
        part = name.rsplit("/", 1)[-1]
        if part == "kernel":
            rank = 2 if name in _DENSE_KERNELS else 4
        elif part in ("bias", *_BN_PARTS):
            rank = 1
        else:
            continue  # named among the unused weights below
        if value.ndim != rank:
            wrong.append(f"{name} {value.shape} (expected {rank}-D)")
    if wrong:
        raise CheckpointError(
            "matterport checkpoint has weights of the wrong rank: " + format_list("wrong rank", wrong)
        )


def convert(source: str | os.PathLike | Mapping) -> tuple[dict[str, Tensor], ArchitectureSpec]:
    """Canonical float32 state dict (engine names) and sizes of a matterport checkpoint.

    Raises:
        CheckpointError: listing missing weights, weights that fit no parameter, and wrong shapes
            (ranks, and bias / batch-norm lengths against their layer's outputs).
    """
    weights = read_matterport(source)
    missing_sig = [k for k in SIGNATURE_KEYS if k not in weights]
    if missing_sig:
        raise CheckpointError(
            f"this is not a matterport Mask R-CNN checkpoint; {format_list('missing weights', missing_sig)}; {_EXPECTED}"
        )
    _check_ranks(weights)
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in weights:
            raise CheckpointError(f"matterport checkpoint is incomplete: missing weight {name!r}; {_EXPECTED}")
        used.add(name)
        return weights[name]

    def vector(name: str, length: int) -> np.ndarray:
        """A bias or batch-norm weight: one value per output of its layer."""
        value = take(name)
        if value.shape != (length,):
            raise CheckpointError(
                f"matterport weight {name} has shape {value.shape}; its layer has {length} outputs, "
                f"expected ({length},)"
            )
        return value

    def outputs(name: str, multiple: int, per: str) -> int:
        """Output count of a kernel whose outputs come in groups of ``multiple`` (``per`` anchor / class)."""
        count = int(take(name).shape[-1])
        if count % multiple:
            raise CheckpointError(f"matterport weight {name} has {count} outputs; matterport has {multiple} per {per}")
        return count

    out: dict[str, Tensor] = {}

    def conv_bn(conv: str, bn: str, dst_conv: str, dst_bn: str) -> None:
        """conv (+ bias) followed by batch norm -> bias-free conv + frozen BN (bias moved into the mean)."""
        kernel = take(conv + "/kernel")
        n = int(kernel.shape[3])
        out[dst_conv + ".weight"] = _conv(kernel)
        bias = vector(conv + "/bias", n) if conv + "/bias" in weights else 0.0
        gamma, beta, mean, var = (vector(f"{bn}/{p}", n) for p in _BN_PARTS)
        out[dst_bn + ".weight"] = _tensor(gamma)
        out[dst_bn + ".bias"] = _tensor(beta)
        out[dst_bn + ".running_mean"] = _tensor(mean.astype(np.float64) - bias)
        out[dst_bn + ".running_var"] = _tensor(var)

    def conv_bias(conv: str, dst: str) -> None:
        kernel = take(conv + "/kernel")
        out[dst + ".weight"] = _conv(kernel)
        out[dst + ".bias"] = _tensor(vector(conv + "/bias", int(kernel.shape[3])))

    def dense_bn(kernel: np.ndarray, bias: str, bn: str, dst: str) -> None:
        """Dense [out, in] + bias, then batch norm -> one Linear (folded in float64)."""
        n = int(kernel.shape[0])
        bias = vector(bias, n)
        gamma, beta, mean, var = (vector(f"{bn}/{p}", n).astype(np.float64) for p in _BN_PARTS)
        scale = gamma / np.sqrt(var + BN_EPS)
        out[dst + ".weight"] = _tensor(kernel.astype(np.float64) * scale[:, None])
        out[dst + ".bias"] = _tensor((bias.astype(np.float64) - mean) * scale + beta)

    # backbone: stem and bottleneck stages 2..5
    conv_bn("conv1", "bn_conv1", "backbone.body.conv1", "backbone.body.bn1")
    blocks = []
    widths, outs = [], []
    for stage in range(2, 6):
        letters = _letters(weights, stage)
        if not letters or letters[0] != "a":
            raise CheckpointError(f"matterport checkpoint has no res{stage}a block; {_EXPECTED}")
        blocks.append(len(letters))
        widths.append(int(take(f"res{stage}a_branch2a/kernel").shape[3]))
        outs.append(int(take(f"res{stage}a_branch2c/kernel").shape[3]))
        for b, letter in enumerate(letters):
            dst = f"backbone.body.layer{stage - 1}.{b}"
            for k, branch in enumerate("abc", start=1):
                conv_bn(f"res{stage}{letter}_branch2{branch}", f"bn{stage}{letter}_branch2{branch}", f"{dst}.conv{k}", f"{dst}.bn{k}")
            if b == 0:
                conv_bn(f"res{stage}a_branch1", f"bn{stage}a_branch1", f"{dst}.downsample.0", f"{dst}.downsample.1")

    # FPN
    for i, stage in enumerate(range(2, 6)):
        conv_bias(f"fpn_c{stage}p{stage}", f"backbone.fpn.inner_blocks.{i}.0")
        conv_bias(f"fpn_p{stage}", f"backbone.fpn.layer_blocks.{i}.0")
    fpn_channels = int(weights["fpn_c5p5/kernel"].shape[3])

    # RPN: one 3x3 conv, softmax pairs -> one logit per anchor, (dy, dx, dh, dw) -> (dx, dy, dw, dh)
    conv_bias("rpn_conv_shared", "rpn.head.conv.0.0")
    rpn_channels = int(weights["rpn_conv_shared/kernel"].shape[3])
    cls_w = _conv(take("rpn_class_raw/kernel")).double()
    cls_outputs = outputs("rpn_class_raw/kernel", 2, "anchor (bg, fg)")
    cls_b = torch.from_numpy(vector("rpn_class_raw/bias", cls_outputs)).double()
    num_anchors = cls_w.shape[0] // 2
    out["rpn.head.cls_logits.weight"] = (cls_w[1::2] - cls_w[0::2]).float()
    out["rpn.head.cls_logits.bias"] = (cls_b[1::2] - cls_b[0::2]).float()
    reg_w = _conv(take("rpn_bbox_pred/kernel"))
    reg_b = torch.from_numpy(vector("rpn_bbox_pred/bias", outputs("rpn_bbox_pred/kernel", 4, "anchor")))
    out["rpn.head.bbox_pred.weight"], out["rpn.head.bbox_pred.bias"] = _deltas_to_xywh(reg_w, reg_b)

    # box head: 7x7 valid conv + BN, 1x1 conv + BN -> fc6, fc7
    k1 = take("mrcnn_class_conv1/kernel")  # [P, P, C, R]
    pool = int(k1.shape[0])
    representation = int(k1.shape[3])
    dense_bn(k1.transpose(3, 2, 0, 1).reshape(representation, -1), "mrcnn_class_conv1/bias",
             "mrcnn_class_bn1", "roi_heads.box_head.fc6")
    k2 = take("mrcnn_class_conv2/kernel")
    dense_bn(k2.reshape(-1, k2.shape[3]).T, "mrcnn_class_conv2/bias", "mrcnn_class_bn2", "roi_heads.box_head.fc7")
    logits = take("mrcnn_class_logits/kernel")
    num_classes = int(logits.shape[1])
    out["roi_heads.box_predictor.cls_score.weight"] = _tensor(logits.T)
    out["roi_heads.box_predictor.cls_score.bias"] = _tensor(vector("mrcnn_class_logits/bias", num_classes))
    bbox_w = torch.from_numpy(np.ascontiguousarray(take("mrcnn_bbox_fc/kernel").T))
    bbox_b = torch.from_numpy(vector("mrcnn_bbox_fc/bias", outputs("mrcnn_bbox_fc/kernel", 4, "class")))
    out["roi_heads.box_predictor.bbox_pred.weight"], out["roi_heads.box_predictor.bbox_pred.bias"] = _deltas_to_xywh(
        bbox_w, bbox_b
    )

    # mask head: 4 x (3x3 conv + BN), 2x2 deconv, 1x1 logits
    mask_convs = 0
    while f"mrcnn_mask_conv{mask_convs + 1}/kernel" in weights:
        i = mask_convs
        conv_bn(f"mrcnn_mask_conv{i + 1}", f"mrcnn_mask_bn{i + 1}", f"roi_heads.mask_head.{i}.0", f"roi_heads.mask_head.{i}.1")
        mask_convs += 1
    deconv = take("mrcnn_mask_deconv/kernel")  # [kh, kw, out, in]
    out["roi_heads.mask_predictor.conv5_mask.weight"] = _conv(deconv)  # -> [in, out, kh, kw]
    out["roi_heads.mask_predictor.conv5_mask.bias"] = _tensor(vector("mrcnn_mask_deconv/bias", int(deconv.shape[2])))
    conv_bias("mrcnn_mask", "roi_heads.mask_predictor.mask_fcn_logits")
    mask_channels = int(deconv.shape[2])

    unused = [k for k in weights if k not in used]
    if unused:
        raise CheckpointError(
            "matterport checkpoint has weights that fit no parameter of a Mask R-CNN ResNet-FPN: "
            + format_list("unused weights", unused)
        )
    spec = ArchitectureSpec(
        block="bottleneck",
        blocks_per_stage=tuple(blocks),
        stage_widths=tuple(widths),
        stage_out_channels=tuple(outs),
        groups=1,
        fpn_channels=fpn_channels,
        num_anchors=num_anchors,
        rpn_conv_depth=1,
        rpn_channels=rpn_channels,
        representation_size=representation,
        num_classes=num_classes,
        num_box_classes=int(bbox_w.shape[0]) // 4,
        mask_convs=mask_convs,
        mask_channels=mask_channels,
        mask_norm=True,
        num_mask_classes=int(weights["mrcnn_mask/kernel"].shape[3]),
    )
    if pool != 7:
        raise CheckpointError(f"mrcnn_class_conv1 is {pool}x{pool}; the engine's matterport preset pools 7x7 for the box head")
    return out, spec
