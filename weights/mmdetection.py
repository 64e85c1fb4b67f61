"""mmdetection 2.x / 3.x Mask R-CNN checkpoints (``MaskRCNN`` with a ResNet/ResNeXt-FPN backbone).

Container (reference notes C.10): a ``.pth`` written by ``torch.save``,
``{'meta': {...}, 'state_dict': OrderedDict}``; training checkpoints also carry ``optimizer``
(and, from mmengine, ``message_hub``, ``param_schedulers``), which are ignored. Files are read
with ``torch.load(weights_only=True)`` only. If the file holds Python objects that torch refuses
(mmengine's ``message_hub`` keeps ``HistoryBuffer`` objects; a meta may hold numpy values),
:class:`~weights.errors.CheckpointError` says so and names the refused global: the file is never
unpickled without restrictions. In memory, the container or the ``state_dict`` itself is accepted.
A ``module.`` prefix (a model saved from ``DataParallel``) is removed, as mmcv's
``load_checkpoint`` does by default.

Key names (reference notes E), mmdetection -> canonical (torchvision's current names),
``t`` = stage 1..4:

- ``backbone.conv1.weight`` / ``backbone.bn1.*`` -> ``backbone.body.conv1.weight`` / ``bn1.*``
- ``backbone.layer{t}.{b}.conv{k}`` / ``.bn{k}`` / ``.downsample.0|1`` -> ``backbone.body.layer{t}.{b}...``
  (mmdet's ResNeXt uses the same names; groups are read from the ``conv2`` shapes)
- ``neck.lateral_convs.{i}.conv`` / ``neck.fpn_convs.{i}.conv`` -> ``backbone.fpn.inner_blocks.{i}.0`` /
  ``layer_blocks.{i}.0`` (with ``norm_cfg`` BN: the conv has no bias and ``.bn.*`` -> ``.{i}.1.*``)
- ``rpn_head.rpn_conv`` -> ``rpn.head.conv.0.0`` (``num_convs`` n > 1: ``rpn_conv.{i}.conv`` -> ``conv.{i}.0``);
  ``rpn_head.rpn_cls`` -> ``rpn.head.cls_logits``; ``rpn_head.rpn_reg`` -> ``rpn.head.bbox_pred``
- ``roi_head.bbox_head.shared_fcs.0`` / ``.1`` -> ``roi_heads.box_head.fc6`` / ``fc7`` (``Shared2FCBBoxHead``);
  with n ``shared_convs`` and one fc (``Shared4Conv1FCBBoxHead`` with BN or no norm):
  ``shared_convs.{i}.conv`` (``.bn``) -> ``roi_heads.box_head.{i}.0`` (``.1``),
  ``shared_fcs.0`` -> ``roi_heads.box_head.{n+1}``
- ``roi_head.bbox_head.fc_cls`` / ``fc_reg`` -> ``roi_heads.box_predictor.cls_score`` / ``bbox_pred``
- ``roi_head.mask_head.convs.{i}.conv`` (``.bn``) -> ``roi_heads.mask_head.{i}.0`` (``.1``);
  ``upsample`` -> ``roi_heads.mask_predictor.conv5_mask``;
  ``conv_logits`` -> ``roi_heads.mask_predictor.mask_fcn_logits``

Classes keep mmdetection's layout (C.8, C.9): ``fc_cls`` has K + 1 rows with background **last**,
``fc_reg`` 4K rows and ``conv_logits`` K channels, both without background; the spec says so
(``num_classes = K + 1``, ``num_box_classes = num_mask_classes = K``) and the engine must run it
with ``background_index="last"``. Class-agnostic box regression / masks are refused, and so is a
softmax RPN (2A objectness channels; the engine runs the sigmoid RPN of the R50-FPN configs, A
channels, C.5).

Batch norm: mmdetection's BN (``norm_eval=True``) runs with eps 1e-5; ``num_batches_tracked`` is
dropped. GroupNorm variants (``gn``, ``gn-all``), deformable convs, deep stems, cascades and other
heads are refused with the offending keys named.

The meta (C.10) supplies what the tensors cannot: class names (2.x ``CLASSES``, 3.x
``dataset_meta['classes']``), versions, and from the config text (2.x ``config``, 3.x ``cfg``) the
ResNet ``style`` (``'caffe'``: stride in the 1x1 conv) and the pixel normalisation, read only
where the text states them unambiguously (:class:`MMDetectionNotes`).

2.x files are run with mmdetection 3.3's inference rules, which is what mmdetection 3.3 gives on
them (its key names for Mask R-CNN are 2.x's; ``tests/test_mmdetection_parity.py`` checks a 2.x
container against mmdetection 3.3, bit for bit). mmdetection 2.x's own inference, read from its
source and not run here (2.x needs mmcv 1.x), differed in two places that change float rounding,
not rules: its ``Normalize`` transform normalised the uint8 image in numpy on the host
(``mmcv/image/photometric.py imnormalize_``: ``cv2.subtract`` of the mean, then ``cv2.multiply``
by ``1 / std``) where 3.x divides by ``std`` in torch (``mmengine/model/base_model/
data_preprocessor.py``); and ``MaskTestMixin.simple_test_mask`` (``mmdet/models/roi_heads/
test_mixins.py``) pooled the masks of boxes already divided by ``scale_factor`` and multiplied
back (``det_bboxes * scale_factor``), where 3.x pools the unscaled boxes
(``StandardRoIHead.predict``, ``bbox_rescale = False`` with a mask head).
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from weights import layout
from weights.errors import CheckpointError, format_list, format_lists
from weights.spec import ArchitectureSpec

__all__ = [
    "BN_EPS",
    "MMDetectionNotes",
    "SIGNATURE_KEYS",
    "architecture",
    "convert",
    "looks_like_mmdetection",
    "mmdetection_name",
    "name_map",
    "read_file",
    "read_mmdetection",
    "read_mmdetection_container",
]

FAMILY = "mmdetection"

#: eps of mmdetection's BN (nn.BatchNorm2d / SyncBN in eval mode)
BN_EPS = 1e-5

#: ``data_preprocessor`` / ``img_norm_cfg`` of the ``style='pytorch'`` configs (RGB, 0..255; C.1)
PIXEL_MEAN_RGB = (123.675, 116.28, 103.53)
PIXEL_STD_RGB = (58.395, 57.12, 57.375)
#: ... and of the ``style='caffe'`` configs (BGR, 0..255, ``to_rgb=False``)
PIXEL_MEAN_CAFFE_BGR = (103.53, 116.28, 123.675)
PIXEL_STD_CAFFE = (1.0, 1.0, 1.0)

#: keys every mmdetection Mask R-CNN R-FPN checkpoint has
SIGNATURE_KEYS = (
    "backbone.conv1.weight",
    "backbone.layer1.0.conv1.weight",
    "backbone.layer1.0.conv2.weight",
    "neck.lateral_convs.0.conv.weight",
    "rpn_head.rpn_cls.weight",
    "rpn_head.rpn_reg.weight",
    "roi_head.bbox_head.fc_cls.weight",
    "roi_head.bbox_head.fc_reg.weight",
    "roi_head.mask_head.conv_logits.weight",
)

_MM_PREFIXES = ("neck.", "rpn_head.", "roi_head.", "bbox_head.", "mask_head.")
_MM_BACKBONE = re.compile(r"^backbone\.(conv1|bn1|layer\d+)\.")
_EXPECTED = (
    "expected an mmdetection 2.x / 3.x Mask R-CNN (ResNet/ResNeXt-FPN) checkpoint: a .pth "
    "{'meta': {...}, 'state_dict': {...}} with keys such as backbone.conv1.weight, "
    "neck.lateral_convs.0.conv.weight, rpn_head.rpn_cls.weight, roi_head.bbox_head.fc_cls.weight, "
    "roi_head.mask_head.conv_logits.weight"
)


@dataclass(frozen=True)
class MMDetectionNotes:
    """What :func:`convert` learned besides the tensors and sizes.

    Attributes:
        bn_eps: batch-norm eps (mmdetection's BN: 1e-5).
        style: ResNet ``style``, "pytorch" (stride in the 3x3 conv; the default) or "caffe".
        style_from_config: whether ``style`` was read from the meta's config text (else the default).
        stride_in_1x1: where the bottleneck stride sits (True for ``style='caffe'``).
        channel_order: "RGB" or "BGR": the order the network expects (``bgr_to_rgb`` / ``to_rgb``).
        pixel_mean, pixel_std: normalisation in ``channel_order``, 0..255 units.
        pixel_stats_from_config: whether mean and std were read from the config text; otherwise the
            defaults of the style (pytorch: RGB mean 123.675, 116.28, 103.53, std 58.395, 57.12,
            57.375; caffe: BGR mean 103.53, 116.28, 123.675, std 1).
        box_pool_size: box RoIAlign output size implied by ``shared_fcs.0``'s input width (7).
        class_names: the K foreground class names from the meta (2.x ``CLASSES``, 3.x
            ``dataset_meta['classes']``), in label order; None when absent or of the wrong length.
        mmdet_version, mmengine_version, mmcv_version: as recorded in the meta, if any.
        has_config: whether the meta holds the training config text.
        stripped_prefix: "module." if the keys carried it (and it was removed), else None.
        ignored_keys: entries dropped as non-parameters (``num_batches_tracked``).
        warnings: meta entries that could not be used (ambiguous config values, wrong class count).
    """

    bn_eps: float = BN_EPS
    style: str = "pytorch"
    style_from_config: bool = False
    stride_in_1x1: bool = False
    channel_order: str = "RGB"
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN_RGB
    pixel_std: tuple[float, float, float] = PIXEL_STD_RGB
    pixel_stats_from_config: bool = False
    box_pool_size: int = 7
    class_names: tuple[str, ...] | None = None
    mmdet_version: str | None = None
    mmengine_version: str | None = None
    mmcv_version: str | None = None
    has_config: bool = False
    stripped_prefix: str | None = None
    ignored_keys: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


# --- reading ---------------------------------------------------------------------------------

#: the first object of a legacy (non-zip) torch.save file
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _NoGlobals(pickle.Unpickler):
    """Reads a pickle's first object only if it needs no global at all (a number, a string)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"{module}.{name}")


def _is_legacy_torch_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return _NoGlobals(f).load() == _TORCH_LEGACY_MAGIC
    except Exception:
        return False


def _one_line(exc: Exception) -> str:
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(exc).splitlines()]
    lines = [ln for ln in lines if ln]
    return f"{type(exc).__name__}: {(lines[0] if lines else '')[:300]}"


def read_file(path: str | os.PathLike):
    """The object a ``torch.save`` file holds, read with ``torch.load(weights_only=True)`` only.

    Raises:
        CheckpointError: a plain pickle (Detectron2 .pkl) or other non-torch file; a truncated or
            corrupt file; Python objects that weights-only loading refuses (the refused global is named).
    """
    path = Path(path)
    where = repr(str(path))
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = head == b"PK\x03\x04" or zipfile.is_zipfile(path)  # a zip cut short has lost its directory
    if not (is_zip or (head[:1] == b"\x80" and _is_legacy_torch_file(path))):
        pickled = head[:1] == b"\x80"
        what = "a plain pickle (a Detectron2 model-zoo .pkl?)" if pickled else "not a file written by torch.save"
        raise CheckpointError(f"could not read {where} as a PyTorch checkpoint: it is {what}; {_EXPECTED}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        refused = re.search(r"GLOBAL ([\w.]+)", text)
        if "Weights only load failed" in text or refused:
            name = refused.group(1) if refused else "an object"
            raise CheckpointError(
                f"{where}: torch.load(weights_only=True) refused to unpickle {name}: besides tensors and plain "
                "containers the file holds Python objects (mmengine training checkpoints keep a 'message_hub' of "
                "HistoryBuffer objects; some metas hold numpy values or config objects). The file is not loaded "
                "with unrestricted unpickling, which can run arbitrary code. If you trust it, keep only its "
                "weights: torch.save({'meta': {}, 'state_dict': torch.load(path, weights_only=False)['state_dict']}, "
                "'weights.pth'), or strip it with mmdetection's tools/model_converters/publish_model.py "
                "(keeps 'meta' and 'state_dict')"
            ) from exc
        raise CheckpointError(
            f"could not read {where} as a PyTorch checkpoint, truncated or corrupt? ({_one_line(exc)}); {_EXPECTED}"
        ) from exc


def _other_family(keys: list[str], subject: str = "this is") -> str:
    if any(k.startswith(("backbone.body.", "rpn.head.", "roi_heads.box_predictor.")) for k in keys):
        return (
            f"{subject} a torchvision-layout state dict (backbone.body.*, rpn.head.*, roi_heads.*), "
            "not an mmdetection one; "
        )
    if any(k.startswith(("backbone.bottom_up.", "backbone.fpn_lateral", "proposal_generator.")) for k in keys):
        return (
            f"{subject} a Detectron2-layout state dict (backbone.bottom_up.*, proposal_generator.*), "
            "not an mmdetection one; "
        )
    return ""


def _strip_prefix(state: Mapping, where: str) -> tuple[dict, str | None]:
    """mmcv's ``load_checkpoint`` default ``revise_keys=[(r'^module\\.', '')]``."""
    if not any(isinstance(k, str) and k.startswith("module.") for k in state):
        return dict(state), None
    out: dict = {}
    clashes = []
    for key, value in state.items():
        new = key[len("module.") :] if isinstance(key, str) and key.startswith("module.") else key
        if new in out:
            clashes.append(str(new))
        out[new] = value
    if clashes:
        raise CheckpointError(
            f"{where}: keys appear both with and without the 'module.' prefix; " + format_list("duplicated", clashes)
        )
    return out, "module."


def _unpack(obj, where: str) -> tuple[dict[str, Tensor], dict, str | None]:
    """(state dict, meta, stripped prefix) of an mmdetection container or flat state dict."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a dict; {_EXPECTED}")
    meta: dict = {}
    if "state_dict" in obj:
        state = obj["state_dict"]
        if not isinstance(state, Mapping):
            raise CheckpointError(
                f"{where}: its 'state_dict' entry is a {type(state).__name__}, not a dict of tensors; {_EXPECTED}"
            )
        raw_meta = obj.get("meta")
        if isinstance(raw_meta, Mapping):
            meta = dict(raw_meta)
    elif "model" in obj:
        inner = obj["model"]
        keys = [str(k) for k in inner] if isinstance(inner, Mapping) else []
        other = _other_family(keys, "its 'model' entry is")
        raise CheckpointError(
            f"{where} is a {{'model': ...}} container ({format_list('top-level keys', map(str, obj))}), as "
            f"Detectron2 and torchvision's training scripts write; {other}mmdetection keeps the parameters under "
            f"'state_dict'; {_EXPECTED}"
        )
    elif "blobs" in obj:
        raise CheckpointError(f"{where} is a Caffe2 / Detectron1 blob file ('blobs'), not mmdetection's; {_EXPECTED}")
    else:
        state = obj
    keys = [str(k) for k in state]
    if not looks_like_mmdetection(keys):
        shown = f"its keys ({len(keys)}) include: {', '.join(sorted(keys)[:8])}" if keys else "it is empty"
        raise CheckpointError(f"{where}: {_other_family(keys)}{_EXPECTED}; {shown}")
    bad = [
        f"{k!s} ({type(v).__name__})" for k, v in state.items() if not (isinstance(k, str) and isinstance(v, Tensor))
    ]
    if bad:
        raise CheckpointError(
            f"{where}: expected the model's parameters as tensors; " + format_list("entries that are not", bad)
        )
    state, stripped = _strip_prefix(state, where)
    return state, meta, stripped


def _source(source) -> tuple[object, str]:
    if isinstance(source, Mapping):
        return source, "the given mapping"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
        return read_file(path), repr(str(path))
    raise TypeError(
        f"an mmdetection checkpoint must be a path to a .pth file or a mapping; got {type(source).__name__}"
    )


def read_mmdetection_container(source: str | os.PathLike | Mapping) -> tuple[dict[str, Tensor], dict, str | None]:
    """The parameters under mmdetection's names, the meta (``{}`` when absent), and the key prefix
    removed ("module." or None). Accepts what :func:`read_mmdetection` accepts."""
    obj, where = _source(source)
    return _unpack(obj, where)


def read_mmdetection(source: str | os.PathLike | Mapping) -> dict[str, Tensor]:
    """An mmdetection checkpoint's parameters, under mmdetection's names (``module.`` removed).

    Args:
        source: path to a ``.pth`` file, or an in-memory ``{'meta': ..., 'state_dict': ...}`` container
            or flat state dict of tensors. The caller's mapping is not modified (tensors are shared).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable or truncated file; objects that ``torch.load(weights_only=True)``
            refuses; another container (Detectron2's / torchvision's ``{'model': ...}``, a plain pickle);
            another family's keys; entries that are not tensors.
        TypeError: ``source`` is neither a path nor a mapping.
    """
    return read_mmdetection_container(source)[0]


def looks_like_mmdetection(keys: Iterable[str]) -> bool:
    """Whether state-dict keys are mmdetection's (``neck.*``, ``rpn_head.*``, ``roi_head.*``,
    ``backbone.conv1`` / ``bn1`` / ``layer{t}``, possibly under ``module.``). For a container, pass
    the keys of its ``state_dict`` entry."""
    for k in keys:
        if not isinstance(k, str):
            continue
        if k.startswith("module."):
            k = k[len("module.") :]
        if k.startswith(_MM_PREFIXES) or _MM_BACKBONE.match(k):
            return True
    return False


# --- names -----------------------------------------------------------------------------------

_BN = r"(weight|bias|running_mean|running_var)"
_FPN = {"inner": "neck.lateral_convs", "layer": "neck.fpn_convs"}
_BH = "roi_head.bbox_head"
_MH = "roi_head.mask_head"
_REVERSE = (
    (re.compile(r"^backbone\.body\.((conv1\.weight)|(bn1\..+)|(layer[1-4]\..+))$"), lambda m, n: f"backbone.{m[1]}"),
    (
        re.compile(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.0\.(weight|bias)$"),
        lambda m, n: f"{_FPN[m[1]]}.{m[2]}.conv.{m[3]}",
    ),
    (
        re.compile(rf"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.1\.{_BN}$"),
        lambda m, n: f"{_FPN[m[1]]}.{m[2]}.bn.{m[3]}",
    ),
    (
        re.compile(r"^rpn\.head\.conv\.(\d+)\.0\.(weight|bias)$"),
        lambda m, n: f"rpn_head.rpn_conv.{m[2]}" if n["rpn_convs"] == 1 else f"rpn_head.rpn_conv.{m[1]}.conv.{m[2]}",
    ),
    (re.compile(r"^rpn\.head\.cls_logits\.(weight|bias)$"), lambda m, n: f"rpn_head.rpn_cls.{m[1]}"),
    (re.compile(r"^rpn\.head\.bbox_pred\.(weight|bias)$"), lambda m, n: f"rpn_head.rpn_reg.{m[1]}"),
    (
        re.compile(r"^roi_heads\.box_head\.fc([67])\.(weight|bias)$"),
        lambda m, n: f"{_BH}.shared_fcs.{int(m[1]) - 6}.{m[2]}",
    ),
    (
        re.compile(r"^roi_heads\.box_head\.(\d+)\.0\.(weight|bias)$"),
        lambda m, n: f"{_BH}.shared_convs.{m[1]}.conv.{m[2]}",
    ),
    (re.compile(rf"^roi_heads\.box_head\.(\d+)\.1\.{_BN}$"), lambda m, n: f"{_BH}.shared_convs.{m[1]}.bn.{m[2]}"),
    (
        re.compile(r"^roi_heads\.box_head\.(\d+)\.(weight|bias)$"),  # the Linear after n convs and Flatten
        lambda m, n: f"{_BH}.shared_fcs.0.{m[2]}" if int(m[1]) == n["box_convs"] + 1 else None,
    ),
    (re.compile(r"^roi_heads\.box_predictor\.cls_score\.(weight|bias)$"), lambda m, n: f"{_BH}.fc_cls.{m[1]}"),
    (re.compile(r"^roi_heads\.box_predictor\.bbox_pred\.(weight|bias)$"), lambda m, n: f"{_BH}.fc_reg.{m[1]}"),
    (re.compile(r"^roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)$"), lambda m, n: f"{_MH}.convs.{m[1]}.conv.{m[2]}"),
    (re.compile(rf"^roi_heads\.mask_head\.(\d+)\.1\.{_BN}$"), lambda m, n: f"{_MH}.convs.{m[1]}.bn.{m[2]}"),
    (re.compile(r"^roi_heads\.mask_predictor\.conv5_mask\.(weight|bias)$"), lambda m, n: f"{_MH}.upsample.{m[1]}"),
    (
        re.compile(r"^roi_heads\.mask_predictor\.mask_fcn_logits\.(weight|bias)$"),
        lambda m, n: f"{_MH}.conv_logits.{m[1]}",
    ),
)


_LAYOUT = layout.FamilyLayout(
    family=FAMILY, rules=_REVERSE, expected=_EXPECTED, stage_prefix=lambda t: f"backbone.layer{t}"
)
_count, _require, _dim = _LAYOUT.count, _LAYOUT.require, _LAYOUT.dim


def mmdetection_name(canonical: str, *, box_head_convs: int = 0, rpn_conv_depth: int = 1) -> str:
    """mmdetection's name for an engine (canonical) parameter name.

    Raises:
        KeyError: the name has no mmdetection counterpart.
    """
    return _LAYOUT.name(canonical, box_head_convs=box_head_convs, rpn_conv_depth=rpn_conv_depth)


def name_map(spec: ArchitectureSpec, *, box_pool_size: int = 7, _shapes: Mapping | None = None) -> dict[str, str]:
    """mmdetection name -> canonical name of every tensor of a network with these sizes."""
    return _LAYOUT.name_map(spec, box_pool_size=box_pool_size, shapes=_shapes)


def _refuse_other_detectors(state: Mapping[str, Tensor]) -> None:
    """Clear errors for mmdetection models that are not a single-stage-RoI-head Mask R-CNN."""
    keys = list(state)
    if not any(k.startswith("roi_head.") for k in keys):
        two_stage = any(k.startswith("rpn_head.") for k in keys)
        if two_stage and any(k.startswith(("bbox_head.", "mask_head.")) for k in keys):
            raise CheckpointError(
                "mmdetection 1.x layout (bbox_head.* / mask_head.* without the roi_head. prefix, background "
                "first): convert it with mmdetection 2.x's tools/model_converters/upgrade_model_version.py first"
            )
        if any(k.startswith("bbox_head.") for k in keys):
            raise CheckpointError(
                "a single-stage mmdetection detector (bbox_head.* without rpn_head / roi_head): "
                "only two-stage Mask R-CNN checkpoints are supported"
            )
    stages = sorted({m[2] for k in keys if (m := re.match(r"^roi_head\.(bbox_head|mask_head)\.(\d+)\.", k))})
    if stages:
        raise CheckpointError(
            f"multi-stage RoI head (roi_head.bbox_head.{{{','.join(stages)}}}.*: Cascade Mask R-CNN / HTC); "
            "only Mask R-CNN's single box and mask head are supported"
        )
    if not any(k.startswith("roi_head.mask_head.") for k in keys):
        raise CheckpointError(
            "roi_head.mask_head.* is missing: the checkpoint has no mask head (a Faster R-CNN model?); "
            "only Mask R-CNN checkpoints are supported"
        )


def architecture(state: Mapping[str, Tensor]) -> tuple[ArchitectureSpec, int]:
    """Network sizes read from an mmdetection-named state dict, and the box RoIAlign size implied by
    ``shared_fcs.0``.

    Raises:
        CheckpointError: keys needed to tell the sizes are missing, or the network is of a kind the
            engine does not run (no mask head, softmax RPN, class-agnostic heads, other box heads).
    """
    _refuse_other_detectors(state)
    _require(state, SIGNATURE_KEYS)
    blocks, widths, outs, groups = _LAYOUT.bottleneck_stages(state)

    # RPN: sigmoid objectness, A channels (C.5); a softmax head has 2A
    if "rpn_head.rpn_conv.weight" in state:
        rpn_depth = 1
    else:
        rpn_convs = _count(state, r"^rpn_head\.rpn_conv\.(\d+)\.conv\.weight$")
        if not rpn_convs:
            _require(state, ["rpn_head.rpn_conv.weight"])
        rpn_depth = len(rpn_convs)
    reg_out = _dim(state, "rpn_head.rpn_reg.weight", 0)
    cls_out = _dim(state, "rpn_head.rpn_cls.weight", 0)
    if reg_out % 4:
        raise CheckpointError(f"rpn_head.rpn_reg has {reg_out} output channels, not 4 per anchor")
    anchors = reg_out // 4
    if cls_out == 2 * anchors and anchors:
        raise CheckpointError(
            f"rpn_head.rpn_cls has {cls_out} output channels for {anchors} anchors (rpn_reg: {reg_out}): a softmax "
            "RPN (rpn_head loss_cls use_sigmoid=False, 2 scores per anchor). The engine runs sigmoid objectness, "
            "one channel per anchor (use_sigmoid=True, as the Mask R-CNN R50-FPN configs)"
        )
    if cls_out != anchors:
        raise CheckpointError(
            f"rpn_head.rpn_cls has {cls_out} output channels but rpn_head.rpn_reg has {reg_out} = 4 x {anchors} "
            f"anchors; a sigmoid RPN has one objectness channel per anchor ({anchors})"
        )

    # box head: Shared2FCBBoxHead (2 fcs) or n shared convs + 1 fc
    convs = _count(state, rf"^{re.escape(_BH)}\.shared_convs\.(\d+)\.conv\.weight$")
    fcs = _count(state, rf"^{re.escape(_BH)}\.shared_fcs\.(\d+)\.weight$")
    if not (len(convs) == 0 and len(fcs) == 2) and not (len(convs) > 0 and len(fcs) == 1):
        raise CheckpointError(
            f"box head with {len(convs)} shared conv and {len(fcs)} shared fc layers ({_BH}.shared_convs.* / "
            "shared_fcs.*); the engine runs Shared2FCBBoxHead (shared_fcs.0, shared_fcs.1) or n shared convs "
            "followed by one fc (Shared4Conv1FCBBoxHead), without separate cls / reg branches"
        )
    _require(state, [f"{_BH}.shared_fcs.0.weight"] + ([f"{_BH}.shared_convs.0.conv.weight"] if convs else []))
    fpn_channels = _dim(state, "neck.lateral_convs.0.conv.weight", 0)
    box_in = _dim(state, f"{_BH}.shared_convs.0.conv.weight", 0) if convs else fpn_channels
    fc_in = _dim(state, f"{_BH}.shared_fcs.0.weight", 1)
    pool = int(round((fc_in / box_in) ** 0.5)) if box_in else 0
    if pool < 1 or pool * pool * box_in != fc_in:
        raise CheckpointError(
            f"{_BH}.shared_fcs.0.weight takes {fc_in} inputs, which is not {box_in} channels x P x P pooled "
            "features (with_avg_pool heads are not supported)"
        )

    # classes: fc_cls K + 1 (background last), fc_reg 4K, conv_logits K
    mask_convs = _count(state, rf"^{re.escape(_MH)}\.convs\.(\d+)\.conv\.weight$")
    if not mask_convs:
        _require(state, [f"{_MH}.convs.0.conv.weight"], " (FCNMaskHead with at least one conv)")
    num_classes = _dim(state, f"{_BH}.fc_cls.weight", 0)
    k = num_classes - 1
    reg_rows = _dim(state, f"{_BH}.fc_reg.weight", 0)
    num_mask_classes = _dim(state, f"{_MH}.conv_logits.weight", 0)
    if reg_rows == 4 and k > 1:
        raise CheckpointError(
            f"{_BH}.fc_reg has 4 outputs for {k} classes: class-agnostic box regression (reg_class_agnostic=True) "
            f"is not supported; the engine needs class-specific regression, 4 x {k} outputs"
        )
    if reg_rows != 4 * k:
        raise CheckpointError(
            f"{_BH}.fc_reg has {reg_rows} outputs for {k} classes ({_BH}.fc_cls has {num_classes} rows, "
            f"background last); expected class-specific regression without background, 4 x {k} = {4 * k}"
        )
    if num_mask_classes == 1 and k > 1:
        raise CheckpointError(
            f"{_MH}.conv_logits has 1 channel for {k} classes: class-agnostic masks (class_agnostic=True) "
            f"are not supported; the engine needs one mask channel per class ({k})"
        )
    if num_mask_classes != k:
        raise CheckpointError(
            f"{_MH}.conv_logits has {num_mask_classes} channels for {k} classes ({_BH}.fc_cls has "
            f"{num_classes} rows, background last); expected one per class without background"
        )

    spec = ArchitectureSpec(
        blocks_per_stage=blocks,  # type: ignore[arg-type]
        stage_widths=widths,  # type: ignore[arg-type]
        stage_out_channels=outs,  # type: ignore[arg-type]
        groups=groups,
        fpn_channels=fpn_channels,
        fpn_norm="neck.lateral_convs.0.bn.weight" in state,
        num_anchors=anchors,
        rpn_conv_depth=rpn_depth,
        box_head_convs=len(convs),
        box_head_conv_channels=box_in if convs else 256,
        box_head_norm=f"{_BH}.shared_convs.0.bn.weight" in state,
        representation_size=_dim(state, f"{_BH}.shared_fcs.0.weight", 0),
        num_classes=num_classes,
        num_box_classes=k,
        mask_convs=len(mask_convs),
        mask_channels=_dim(state, f"{_MH}.convs.0.conv.weight", 0),
        mask_norm=f"{_MH}.convs.0.bn.weight" in state,
        num_mask_classes=num_mask_classes,
    )
    return spec, pool


# --- meta ------------------------------------------------------------------------------------


def _version(meta: Mapping, key: str) -> str | None:
    value = meta.get(key)
    return value if isinstance(value, str) else None


def _config_values(text: str, name: str, value: str) -> set:
    """Every value assigned to ``name`` in a config text, as ``name=...`` or ``'name': ...``."""
    rx = re.compile(rf"""(?<![\w.])(?:{name}\s*=|['"]{name}['"]\s*:)\s*{value}""")
    return {m.group(1) for m in rx.finditer(text)}


def _triple(text: str) -> tuple[float, float, float] | None:
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        return None
    return values if len(values) == 3 else None  # type: ignore[return-value]


def _read_meta(meta: Mapping, k: int) -> dict:
    """Fields of :class:`MMDetectionNotes` that come from the meta."""
    out: dict = {
        "mmdet_version": _version(meta, "mmdet_version"),
        "mmengine_version": _version(meta, "mmengine_version"),
        "mmcv_version": _version(meta, "mmcv_version"),
    }
    warnings: list[str] = []

    names = meta.get("CLASSES")
    dataset_meta = meta.get("dataset_meta")
    if names is None and isinstance(dataset_meta, Mapping):
        names = dataset_meta.get("classes", dataset_meta.get("CLASSES"))
    if isinstance(names, str):
        names = (names,)
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        if len(names) == k:
            out["class_names"] = tuple(names)
        else:
            warnings.append(f"the meta lists {len(names)} class names but the heads have {k} classes; names ignored")
    elif names is not None:
        warnings.append(f"the meta's class names are a {type(names).__name__}, not a list of strings; ignored")

    text = next((meta[key] for key in ("cfg", "config") if isinstance(meta.get(key), str)), None)
    out["has_config"] = text is not None
    style = None
    if text is not None:
        styles = _config_values(text, "style", r"""['"](\w+)['"]""")
        if len(styles) == 1 and styles <= {"pytorch", "caffe"}:
            style = styles.pop()
        elif styles:
            warnings.append(f"the config sets style to {sorted(styles)}; assuming 'pytorch'")
    out["style"] = style or "pytorch"
    out["style_from_config"] = style is not None
    out["stride_in_1x1"] = out["style"] == "caffe"
    caffe = out["style"] == "caffe"
    out["channel_order"] = "BGR" if caffe else "RGB"
    out["pixel_mean"] = PIXEL_MEAN_CAFFE_BGR if caffe else PIXEL_MEAN_RGB
    out["pixel_std"] = PIXEL_STD_CAFFE if caffe else PIXEL_STD_RGB
    out["pixel_stats_from_config"] = False
    if text is not None:
        means = {_triple(v) for v in _config_values(text, "mean", r"[\[(]([^\])]*)[\])]")}
        stds = {_triple(v) for v in _config_values(text, "std", r"[\[(]([^\])]*)[\])]")}
        rgb = _config_values(text, "(?:bgr_)?to_rgb", r"(True|False)")
        if len(means) == 1 and len(stds) == 1 and None not in means | stds:
            out["pixel_mean"], out["pixel_std"] = means.pop(), stds.pop()
            out["pixel_stats_from_config"] = True
            if len(rgb) == 1:
                out["channel_order"] = "RGB" if rgb.pop() == "True" else "BGR"
            else:
                warnings.append(
                    f"the config's to_rgb / bgr_to_rgb is {sorted(rgb) or 'absent'}; "
                    f"assuming {out['channel_order']} for style {out['style']!r}"
                )
        elif means or stds:
            warnings.append("the config's pixel mean / std are ambiguous; using the defaults of the style")
    out["warnings"] = tuple(warnings)
    return out


# --- conversion ------------------------------------------------------------------------------

_IGNORED = re.compile(r"(^|\.)num_batches_tracked$")

#: unmapped keys that name a variant, and what it is
_HINTS = (
    (
        re.compile(r"(^|\.)gn\d*\."),
        "GroupNorm layers (norm_cfg=dict(type='GN'), the gn / gn-all configs) are not supported",
    ),
    (re.compile(r"conv_offset"), "deformable convolutions (dcn / dconv configs) are not supported"),
    (re.compile(r"^backbone\.stem\."), "deep-stem backbones (ResNetV1d, ResNeSt) are not supported"),
    (re.compile(r"^backbone\.layer\d+\.\d+\.downsample\.2\."), "avg_down shortcuts (ResNetV1d) are not supported"),
    (re.compile(r"^backbone\.(patch_embed|stages)\."), "only ResNet / ResNeXt backbones are supported"),
    (
        re.compile(r"^neck\.fpn_convs\.([4-9]|\d\d)\."),
        "FPN extra convs (add_extra_convs) are not supported; the engine's P6 is a max pool",
    ),
    (
        re.compile(r"^roi_head\.bbox_head\.(cls|reg)_(convs|fcs)\."),
        "box heads with separate cls / reg branches are not supported",
    ),
    (
        re.compile(r"^roi_head\.(mask_iou_head|semantic_head|point_head|glbctx_head)\."),
        "heads beyond Mask R-CNN's (MS R-CNN, HTC, PointRend, ...) are not supported",
    ),
    (re.compile(r"(^|\.)ema_"), "EMA copies of the parameters (ema_*) are not part of the model"),
)


def convert(state) -> tuple[dict[str, Tensor], ArchitectureSpec, MMDetectionNotes]:
    """Canonical state dict (float32, engine names), sizes, and notes (eps 1e-5, meta).

    ``state``: anything :func:`read_mmdetection` accepts: a path, a ``{'meta', 'state_dict'}``
    container (the meta is read for the notes) or a flat mmdetection-named state dict. Not modified.

    Raises:
        CheckpointError: listing, under mmdetection's names, keys that fit no Mask R-CNN R-FPN
            parameter, missing keys and wrongly shaped tensors; or naming what the engine does not run.
    """
    tensors, meta, stripped = read_mmdetection_container(state)
    ignored = sorted(k for k in tensors if _IGNORED.search(k))
    params = {k: v for k, v in tensors.items() if not _IGNORED.search(k)}

    spec, pool = architecture(params)
    shapes = layout.expected_shapes(spec, box_pool_size=pool)
    names = name_map(spec, box_pool_size=pool, _shapes=shapes)

    unmapped = [k for k in params if k not in names]
    missing = [mm for mm in names if mm not in params]
    misshaped = [
        f"{mm} {tuple(params[mm].shape)} (expected {shapes[c]})"
        for mm, c in names.items()
        if mm in params and tuple(params[mm].shape) != shapes[c]
    ]
    problems = format_lists(
        ("keys that fit no parameter of the network", unmapped), ("missing keys", missing), ("wrong shape", misshaped)
    )
    hints = [why for rx, why in _HINTS if any(rx.search(k) for k in unmapped)]
    problems.extend(dict.fromkeys(hints))
    if problems:
        raise CheckpointError(
            f"{FAMILY} checkpoint does not fit a Mask R-CNN R-FPN network with the sizes read from it: "
            + "; ".join(problems)
        )

    canonical = {names[k]: (v.float() if v.is_floating_point() else v) for k, v in params.items()}
    notes = MMDetectionNotes(
        bn_eps=BN_EPS,
        box_pool_size=pool,
        stripped_prefix=stripped,
        ignored_keys=tuple(ignored),
        **_read_meta(meta, spec.num_classes - 1),
    )
    return canonical, spec, notes
