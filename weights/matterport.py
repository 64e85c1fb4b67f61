"""matterport Mask_RCNN checkpoints (Keras / TensorFlow 1, ``mask_rcnn_coco.h5``).

A matterport file is a Keras HDF5 weights file (``model.save_weights`` of Keras 2.x, or the
``model_weights`` group of a full-model ``.h5``): the root attribute ``layer_names`` lists the
layers, each layer group has an attribute ``weight_names`` (``conv1/kernel:0``, ...; Keras 3's
legacy writer drops the ``:0``) naming its datasets. The RPN's three layers live inside the
nested layer group ``rpn_model``. Reading needs ``h5py`` (``pip install h5py``, or the
project's ``matterport`` extra).

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

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from weights.errors import CheckpointError, format_list
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


def _strip(name: str) -> str:
    """``conv1/kernel:0`` -> ``conv1/kernel`` (Keras 2 suffixes variable names with the output index)."""
    return re.sub(r":\d+$", "", name)


def _decode(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def read_matterport(source: str | os.PathLike | Mapping) -> dict[str, np.ndarray]:
    """The file's weights as ``{"layer/weight": float32 ndarray}`` (``conv1/kernel``, ``bn_conv1/gamma``...).

    ``source``: a path to a Keras ``.h5`` weights or model file, or a mapping already in that
    form (names with or without ``:0``; values numpy arrays or tensors; not modified).

    Raises:
        CheckpointError: the file is not HDF5, has no Keras layer list, or h5py is missing.
    """
    if isinstance(source, Mapping):
        return {_strip(str(k)): np.asarray(v.detach().cpu() if isinstance(v, Tensor) else v, dtype=np.float32)
                for k, v in source.items()}
    try:
        import h5py
    except ImportError as exc:
        raise CheckpointError(
            "reading a matterport .h5 checkpoint needs h5py: pip install h5py (or this project's [matterport] extra)"
        ) from exc
    path = Path(source)
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise CheckpointError(f"could not read {str(path)!r} as an HDF5 file ({exc}); {_EXPECTED}") from exc
    with handle as f:
        group = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in group.attrs:
            raise CheckpointError(f"{str(path)!r} is HDF5 but has no Keras 'layer_names' attribute; {_EXPECTED}")
        weights: dict[str, np.ndarray] = {}
        for layer in (_decode(n) for n in group.attrs["layer_names"]):
            layer_group = group[layer]
            for name in (_decode(n) for n in layer_group.attrs.get("weight_names", [])):
                weights[_strip(name)] = np.asarray(layer_group[name], dtype=np.float32)
    return weights


def looks_like_matterport(keys: Iterable[str]) -> bool:
    """Whether the (Keras) weight names are those of a matterport Mask R-CNN."""
    names = {_strip(str(k)) for k in keys}
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


def convert(source: str | os.PathLike | Mapping) -> tuple[dict[str, Tensor], ArchitectureSpec]:
    """Canonical float32 state dict (engine names) and sizes of a matterport checkpoint.

    Raises:
        CheckpointError: listing missing weights, weights that fit no parameter, and wrong shapes.
    """
    weights = read_matterport(source)
    missing_sig = [k for k in SIGNATURE_KEYS if k not in weights]
    if missing_sig:
        raise CheckpointError(
            f"this is not a matterport Mask R-CNN checkpoint; {format_list('missing weights', missing_sig)}; {_EXPECTED}"
        )
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in weights:
            raise CheckpointError(f"matterport checkpoint is incomplete: missing weight {name!r}; {_EXPECTED}")
        used.add(name)
        return weights[name]

    out: dict[str, Tensor] = {}

    def conv_bn(conv: str, bn: str, dst_conv: str, dst_bn: str) -> None:
        """conv (+ bias) followed by batch norm -> bias-free conv + frozen BN (bias moved into the mean)."""
        out[dst_conv + ".weight"] = _conv(take(conv + "/kernel"))
        bias = take(conv + "/bias") if conv + "/bias" in weights else 0.0
        gamma, beta, mean, var = (take(f"{bn}/{p}") for p in _BN_PARTS)
        out[dst_bn + ".weight"] = _tensor(gamma)
        out[dst_bn + ".bias"] = _tensor(beta)
        out[dst_bn + ".running_mean"] = _tensor(mean.astype(np.float64) - bias)
        out[dst_bn + ".running_var"] = _tensor(var)

    def conv_bias(conv: str, dst: str) -> None:
        out[dst + ".weight"] = _conv(take(conv + "/kernel"))
        out[dst + ".bias"] = _tensor(take(conv + "/bias"))

    def dense_bn(kernel: np.ndarray, bias: np.ndarray, bn: str, dst: str) -> None:
        """Dense [out, in] + bias, then batch norm -> one Linear (folded in float64)."""
        gamma, beta, mean, var = (take(f"{bn}/{p}").astype(np.float64) for p in _BN_PARTS)
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
        widths.append(int(weights[f"res{stage}a_branch2a/kernel"].shape[3]))
        outs.append(int(weights[f"res{stage}a_branch2c/kernel"].shape[3]))
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
    cls_w, cls_b = _conv(take("rpn_class_raw/kernel")).double(), torch.from_numpy(take("rpn_class_raw/bias")).double()
    if cls_w.shape[0] % 2:
        raise CheckpointError(f"rpn_class_raw has {cls_w.shape[0]} outputs; matterport has 2 (bg, fg) per anchor")
    num_anchors = cls_w.shape[0] // 2
    out["rpn.head.cls_logits.weight"] = (cls_w[1::2] - cls_w[0::2]).float()
    out["rpn.head.cls_logits.bias"] = (cls_b[1::2] - cls_b[0::2]).float()
    reg_w, reg_b = _conv(take("rpn_bbox_pred/kernel")), torch.from_numpy(take("rpn_bbox_pred/bias"))
    out["rpn.head.bbox_pred.weight"], out["rpn.head.bbox_pred.bias"] = _deltas_to_xywh(reg_w, reg_b)

    # box head: 7x7 valid conv + BN, 1x1 conv + BN -> fc6, fc7
    k1 = take("mrcnn_class_conv1/kernel")  # [P, P, C, R]
    pool = int(k1.shape[0])
    representation = int(k1.shape[3])
    dense_bn(k1.transpose(3, 2, 0, 1).reshape(representation, -1), take("mrcnn_class_conv1/bias"),
             "mrcnn_class_bn1", "roi_heads.box_head.fc6")
    k2 = take("mrcnn_class_conv2/kernel")
    dense_bn(k2.reshape(-1, k2.shape[3]).T, take("mrcnn_class_conv2/bias"), "mrcnn_class_bn2", "roi_heads.box_head.fc7")
    logits = take("mrcnn_class_logits/kernel")
    num_classes = int(logits.shape[1])
    out["roi_heads.box_predictor.cls_score.weight"] = _tensor(logits.T)
    out["roi_heads.box_predictor.cls_score.bias"] = _tensor(take("mrcnn_class_logits/bias"))
    bbox_w = torch.from_numpy(np.ascontiguousarray(take("mrcnn_bbox_fc/kernel").T))
    bbox_b = torch.from_numpy(take("mrcnn_bbox_fc/bias"))
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
    out["roi_heads.mask_predictor.conv5_mask.bias"] = _tensor(take("mrcnn_mask_deconv/bias"))
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
