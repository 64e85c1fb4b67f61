"""Detectron2 Mask R-CNN checkpoints (``GeneralizedRCNN`` with a ResNet/ResNeXt-FPN backbone).

Containers (reference notes B.11):

- ``.pkl``: the model zoo's files (``model_final_f10217.pkl`` ...), a pickle of
  ``{'model': {name: numpy.ndarray}, '__author__': ..., ...}`` read with ``encoding='latin1'``
  (the files may come from Python 2).
- ``.pth``: what ``DetectionCheckpointer`` saves, ``{'model': state_dict, 'optimizer': ...,
  'iteration': ...}``, read with ``torch.load(weights_only=True)``.
- in memory: that container, or the ``model`` state dict itself (tensors or numpy arrays).

**Pickle risk.** Unpickling runs whatever the file says: a crafted ``.pkl`` can call
``os.system`` or any other importable function while it loads. ``.pkl`` files are therefore
read with :class:`RestrictedUnpickler`, which resolves only what numpy arrays need
(``numpy.core.multiarray._reconstruct``/``scalar``, ``numpy._core.numeric._frombuffer``,
``numpy.ndarray``, ``numpy.dtype``, ``_codecs.encode``), ``collections.OrderedDict`` and a few
inert builtins (``set``, ``frozenset``, ``complex``, ``bytearray``); any other global is refused
before it is called. The result is then checked to be a dict whose ``model`` entry maps
names to numeric arrays (no object arrays). Still, only load checkpoints you trust.

Key names (reference notes E), Detectron2 -> canonical (torchvision's current names),
``s`` = stage 2..5:

- ``backbone.bottom_up.stem.conv1.weight`` / ``.norm.*``  -> ``backbone.body.conv1.weight`` / ``bn1.*``
- ``backbone.bottom_up.res{s}.{b}.conv{k}.weight`` / ``.norm.*`` -> ``backbone.body.layer{s-1}.{b}.conv{k}.weight`` / ``bn{k}.*``
- ``backbone.bottom_up.res{s}.{b}.shortcut.weight`` / ``.norm.*`` -> ``...downsample.0.weight`` / ``downsample.1.*``
- ``backbone.fpn_lateral{s}`` / ``backbone.fpn_output{s}`` -> ``backbone.fpn.inner_blocks.{s-2}.0`` / ``layer_blocks.{s-2}.0``
  (with ``FPN.NORM``: the conv has no bias and ``.norm.*`` -> ``.{s-2}.1.*``)
- ``proposal_generator.rpn_head.conv`` -> ``rpn.head.conv.0.0`` (``conv.conv{k}`` -> ``conv.{k}.0`` with several convs);
  ``objectness_logits`` -> ``rpn.head.cls_logits``; ``anchor_deltas`` -> ``rpn.head.bbox_pred``
- ``roi_heads.box_head.fc1``/``fc2`` -> ``roi_heads.box_head.fc6``/``fc7``; with ``NUM_CONV`` n > 0 and
  ``NUM_FC`` 1: ``conv{i}`` (``.norm``) -> ``roi_heads.box_head.{i-1}.0`` (``.1``) and ``fc1`` -> ``roi_heads.box_head.{n+1}``
- ``roi_heads.box_predictor.cls_score`` / ``bbox_pred``: same names
- ``roi_heads.mask_head.mask_fcn{i}`` (``.norm``) -> ``roi_heads.mask_head.{i-1}.0`` (``.1``);
  ``deconv`` -> ``roi_heads.mask_predictor.conv5_mask``; ``predictor`` -> ``roi_heads.mask_predictor.mask_fcn_logits``

Classes keep Detectron2's layout: ``cls_score`` has K + 1 rows with background **last**,
``bbox_pred`` 4K rows and the mask predictor K channels, both without background; the spec
says so (``num_classes = K + 1``, ``num_box_classes = num_mask_classes = K``) and the engine must
run it with ``background_index="last"``. Class-agnostic box or mask heads are refused.

Batch norm (B.3): Detectron2's ``FrozenBatchNorm2d`` runs with eps 1e-5 (so do BN and SyncBN).
Backbone norms saved without ``running_mean``/``running_var`` (Caffe2-converted weights, as
Detectron2's ``_load_from_state_dict`` allows) get 0 and 1, as Detectron2 gives them.
FPN and head norms must carry running statistics: without them they are GroupNorm, which the
engine does not implement. ``num_batches_tracked``, ``anchor_generator.cell_anchors.*`` and
``pixel_mean``/``pixel_std`` buffers (older versions saved them) are not parameters: they are
dropped, the pixel statistics reported in :class:`Detectron2Notes`.
"""

from __future__ import annotations

import collections
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from weights import layout
from weights.errors import CheckpointError, format_list, format_lists
from weights.spec import ArchitectureSpec

__all__ = [
    "BN_EPS",
    "Detectron2Notes",
    "RestrictedUnpickler",
    "SIGNATURE_KEYS",
    "architecture",
    "convert",
    "detectron2_name",
    "looks_like_detectron2",
    "name_map",
    "read_detectron2",
]

FAMILY = "Detectron2"

#: eps of Detectron2's FrozenBatchNorm2d (and of BN / SyncBN)
BN_EPS = 1e-5

#: Detectron2 ``MODEL.PIXEL_MEAN`` default (BGR, 0..255)
PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
#: ``PIXEL_STD`` of MSRA-initialised models (R50/R101 zoo configs)
PIXEL_STD_MSRA = (1.0, 1.0, 1.0)
#: ``PIXEL_STD`` of FAIR/Caffe2-initialised ResNeXt models (``mask_rcnn_X_101_32x8d_FPN_3x.yaml``)
PIXEL_STD_FAIR_RESNEXT = (57.375, 57.120, 58.395)

#: keys every Detectron2 Mask R-CNN R-FPN checkpoint has
SIGNATURE_KEYS = (
    "backbone.bottom_up.stem.conv1.weight",
    "backbone.bottom_up.res2.0.conv1.weight",
    "backbone.bottom_up.res2.0.conv2.weight",
    "backbone.fpn_lateral2.weight",
    "proposal_generator.rpn_head.objectness_logits.weight",
    "roi_heads.box_predictor.cls_score.weight",
    "roi_heads.box_predictor.bbox_pred.weight",
)

_D2_PREFIXES = ("backbone.bottom_up.", "backbone.fpn_lateral", "backbone.fpn_output", "proposal_generator.")
_EXPECTED = (
    "expected a Detectron2 GeneralizedRCNN (Mask R-CNN, ResNet-FPN) checkpoint: "
    "a .pkl {'model': {name: ndarray}, '__author__': ...} or a .pth {'model': state_dict, ...}, "
    "with keys such as backbone.bottom_up.stem.conv1.weight, backbone.fpn_lateral2.weight, "
    "proposal_generator.rpn_head.objectness_logits.weight, roi_heads.mask_head.predictor.weight"
)


@dataclass(frozen=True)
class Detectron2Notes:
    """What :func:`convert` learned besides the tensors and sizes.

    Attributes:
        bn_eps: batch-norm eps (Detectron2's FrozenBN: 1e-5).
        stride_in_1x1: where the bottleneck stride sits. Not visible in the tensors: this is the
            model zoo's convention, True (MSRA R50/R101 weights, ``STRIDE_IN_1X1: True``) unless the
            backbone is a ResNeXt (groups > 1), whose zoo configs set ``STRIDE_IN_1X1: False``.
        pixel_mean, pixel_std: BGR, 0..255. The file's ``pixel_mean``/``pixel_std`` buffers if it has
            them; otherwise the zoo's values for this backbone (mean 103.53, 116.28, 123.675; std 1
            for ResNet, 57.375, 57.12, 58.395 for ResNeXt).
        pixel_stats_from_file: whether ``pixel_mean``/``pixel_std`` were read from the file.
        box_pool_size: box RoIAlign output size implied by ``box_head.fc1``'s input width (7).
        defaulted_bn_stats: Detectron2 norm prefixes whose running_mean / running_var were absent
            and set to 0 / 1.
        ignored_keys: entries dropped as non-parameters (num_batches_tracked, cell anchors, pixel stats).
    """

    bn_eps: float
    stride_in_1x1: bool
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    pixel_stats_from_file: bool
    box_pool_size: int
    defaulted_bn_stats: tuple[str, ...]
    ignored_keys: tuple[str, ...]


# --- reading ---------------------------------------------------------------------------------


def _numpy_core():
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    return multiarray, numeric


def _allowed_globals() -> dict[tuple[str, str], object]:
    multiarray, numeric = _numpy_core()
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): __import__("_codecs").encode,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): bytearray,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = numeric._frombuffer
    return allowed


class ForbiddenGlobalError(pickle.UnpicklingError):
    """The pickle names a global that :class:`RestrictedUnpickler` does not allow."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves numpy array reconstruction and a few inert builtins only.

    Every other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, any class)
    raises :class:`ForbiddenGlobalError` before it can be called. Python 2 module names
    (``__builtin__``) are mapped to Python 3's.
    """

    _ALLOWED: dict[tuple[str, str], object] | None = None

    def find_class(self, module: str, name: str):
        if module == "__builtin__":
            module = "builtins"
        if RestrictedUnpickler._ALLOWED is None:
            RestrictedUnpickler._ALLOWED = _allowed_globals()
        try:
            return RestrictedUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise ForbiddenGlobalError(
                f"refused to load the global {module}.{name}: a Detectron2 .pkl checkpoint holds only numpy arrays, "
                "numbers and strings, and anything else could run code while unpickling"
            ) from None


def _load_pickle(path: Path):
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, encoding="latin1").load()


def _load_torch(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


#: the first object of a legacy (non-zip) torch.save file
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _short(exc: Exception) -> str:
    """One line of an exception's message (torch's weights-only errors run to a page)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "GLOBAL " in ln), lines[0] if lines else "")  # what torch refused
    detail = re.sub(r"\x1b\[[0-9;]*m", "", detail)
    return f"{type(exc).__name__}: {detail[:300]}"


def _read_file(path: Path):
    """The object stored in ``path``: zip (torch.save) files with torch.load(weights_only=True),
    plain pickles (the model zoo's .pkl) with :class:`RestrictedUnpickler`."""
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # a zip cut short has lost its central directory
    what = "a PyTorch checkpoint" if is_zip else "a pickle"
    try:
        if is_zip:
            return _load_torch(path)
        obj = _load_pickle(path)
        if isinstance(obj, int) and obj == _TORCH_LEGACY_MAGIC:  # legacy torch.save format
            what = "a PyTorch checkpoint"
            return _load_torch(path)
        return obj
    except ForbiddenGlobalError as exc:
        raise CheckpointError(f"{str(path)!r}: {exc}") from exc
    except Exception as exc:  # truncated, not a checkpoint, pickled objects torch refuses
        raise CheckpointError(f"could not read {str(path)!r} as {what} ({_short(exc)}); {_EXPECTED}") from exc


def _describe_other_family(keys: list[str]) -> str:
    if any(k.startswith(("backbone.body.", "rpn.head.")) for k in keys):
        return "this is a torchvision-layout state dict (backbone.body.*, rpn.head.*), not a Detectron2 one; "
    if any(k.startswith(("neck.", "roi_head.", "rpn_head.")) for k in keys):
        return "this is an mmdetection-layout state dict (neck.*, rpn_head.*, roi_head.*), not a Detectron2 one; "
    if any(re.match(r"^(res\d|conv1_|fpn_|rpn_|bbox_pred|cls_score|mask_fcn|conv5_mask)", k) for k in keys):
        return "these look like Caffe2 / Detectron1 blob names, which must first be converted by Detectron2; "
    return ""


def _model_entry(obj, where: str) -> Mapping:
    """The ``model`` state dict of a Detectron2 container, or ``obj`` itself when it is a flat one."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a dict; {_EXPECTED}")
    if "model" in obj:
        model = obj["model"]
        if not isinstance(model, Mapping):
            raise CheckpointError(
                f"{where}: its 'model' entry is a {type(model).__name__}, not a dict of arrays; {_EXPECTED}"
            )
        return model
    top = [str(k) for k in obj]
    if "state_dict" in obj:
        raise CheckpointError(
            f"{where} is an mmdetection / mmengine container ({format_list('top-level keys', top)}), "
            f"not a Detectron2 one; {_EXPECTED}"
        )
    if "blobs" in obj:
        raise CheckpointError(
            f"{where} is a Caffe2 / Detectron1 blob file ('blobs'), which Detectron2 converts with "
            f"heuristic name matching; it is not supported here; {_EXPECTED}"
        )
    return obj


def _to_tensor(value):
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            return None
        array = value
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        if not (array.flags.c_contiguous and array.flags.writeable):
            array = np.ascontiguousarray(array).copy()
        return torch.from_numpy(array)
    if isinstance(value, (bool, int, float, np.number, np.bool_)):
        return torch.tensor(np.asarray(value))
    return None


def _tensor_state(model: Mapping, where: str) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    bad: list[str] = []
    for key, value in model.items():
        tensor = _to_tensor(value) if isinstance(key, str) else None
        if tensor is None:
            dtype = f" {value.dtype}" if isinstance(value, np.ndarray) else ""
            bad.append(f"{key!s} ({type(value).__name__}{dtype})")
        else:
            state[key] = tensor
    if bad:
        raise CheckpointError(
            f"{where}: expected the model's parameters as numeric arrays or tensors; "
            + format_list("entries that are not", bad)
        )
    return state


def read_detectron2(source: str | os.PathLike | Mapping) -> dict[str, Tensor]:
    """A Detectron2 checkpoint's parameters, under Detectron2's names, as tensors.

    Args:
        source: path to a ``.pkl`` (model zoo) or ``.pth`` (DetectionCheckpointer) file, or an
            in-memory container ``{'model': ...}`` or flat state dict (tensors or numpy arrays).
            The caller's mapping is not modified; arrays may be shared, never written.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable or truncated file, a refused pickle global, another
            container (mmdetection's ``{'meta', 'state_dict'}``, Caffe2 blobs), another family's
            keys (torchvision, mmdetection), or entries that are not numeric arrays.
        TypeError: ``source`` is neither a path nor a mapping.
    """
    if isinstance(source, Mapping):
        obj, where = source, "the given mapping"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
        obj, where = _read_file(path), repr(str(path))
    else:
        raise TypeError(
            "a Detectron2 checkpoint must be a path to a .pkl / .pth file or a mapping; "
            f"got {type(source).__name__}"
        )
    model = _model_entry(obj, where)
    keys = [str(k) for k in model]
    if not looks_like_detectron2(keys):
        shown = f"its keys ({len(keys)}) include: {', '.join(sorted(keys)[:8])}" if keys else "it is empty"
        raise CheckpointError(f"{where}: {_describe_other_family(keys)}{_EXPECTED}; {shown}")
    return _tensor_state(model, where)


def looks_like_detectron2(keys: Iterable[str]) -> bool:
    """Whether state-dict keys are Detectron2's (``backbone.bottom_up.*``, ``proposal_generator.*``,
    ``backbone.fpn_lateral*``). For a container, pass the keys of its ``model`` entry."""
    return any(isinstance(k, str) and k.startswith(_D2_PREFIXES) for k in keys)


# --- names -----------------------------------------------------------------------------------

_BN = r"(weight|bias|running_mean|running_var)"
_REVERSE = (
    (re.compile(r"^backbone\.body\.conv1\.weight$"), lambda m, n: "backbone.bottom_up.stem.conv1.weight"),
    (re.compile(rf"^backbone\.body\.bn1\.{_BN}$"), lambda m, n: f"backbone.bottom_up.stem.conv1.norm.{m[1]}"),
    (
        re.compile(r"^backbone\.body\.layer([1-4])\.(\d+)\.conv([1-3])\.weight$"),
        lambda m, n: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight",
    ),
    (
        re.compile(rf"^backbone\.body\.layer([1-4])\.(\d+)\.bn([1-3])\.{_BN}$"),
        lambda m, n: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}",
    ),
    (
        re.compile(r"^backbone\.body\.layer([1-4])\.(\d+)\.downsample\.0\.weight$"),
        lambda m, n: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.weight",
    ),
    (
        re.compile(rf"^backbone\.body\.layer([1-4])\.(\d+)\.downsample\.1\.{_BN}$"),
        lambda m, n: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}",
    ),
    (
        re.compile(r"^backbone\.fpn\.(inner|layer)_blocks\.([0-3])\.0\.(weight|bias)$"),
        lambda m, n: f"backbone.fpn_{'lateral' if m[1] == 'inner' else 'output'}{int(m[2]) + 2}.{m[3]}",
    ),
    (
        re.compile(rf"^backbone\.fpn\.(inner|layer)_blocks\.([0-3])\.1\.{_BN}$"),
        lambda m, n: f"backbone.fpn_{'lateral' if m[1] == 'inner' else 'output'}{int(m[2]) + 2}.norm.{m[3]}",
    ),
    (
        re.compile(r"^rpn\.head\.conv\.(\d+)\.0\.(weight|bias)$"),
        lambda m, n: (
            f"proposal_generator.rpn_head.conv.{m[2]}"
            if n["rpn_convs"] == 1
            else f"proposal_generator.rpn_head.conv.conv{m[1]}.{m[2]}"
        ),
    ),
    (
        re.compile(r"^rpn\.head\.cls_logits\.(weight|bias)$"),
        lambda m, n: f"proposal_generator.rpn_head.objectness_logits.{m[1]}",
    ),
    (
        re.compile(r"^rpn\.head\.bbox_pred\.(weight|bias)$"),
        lambda m, n: f"proposal_generator.rpn_head.anchor_deltas.{m[1]}",
    ),
    (
        re.compile(r"^roi_heads\.box_head\.fc([67])\.(weight|bias)$"),
        lambda m, n: f"roi_heads.box_head.fc{int(m[1]) - 5}.{m[2]}",
    ),
    (
        re.compile(r"^roi_heads\.box_head\.(\d+)\.0\.(weight|bias)$"),
        lambda m, n: f"roi_heads.box_head.conv{int(m[1]) + 1}.{m[2]}",
    ),
    (
        re.compile(rf"^roi_heads\.box_head\.(\d+)\.1\.{_BN}$"),
        lambda m, n: f"roi_heads.box_head.conv{int(m[1]) + 1}.norm.{m[2]}",
    ),
    (
        re.compile(r"^roi_heads\.box_head\.(\d+)\.(weight|bias)$"),  # the Linear after n convs and Flatten
        lambda m, n: f"roi_heads.box_head.fc1.{m[2]}" if int(m[1]) == n["box_convs"] + 1 else None,
    ),
    (re.compile(r"^roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)$"), lambda m, n: m[0]),
    (
        re.compile(r"^roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)$"),
        lambda m, n: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.{m[2]}",
    ),
    (
        re.compile(rf"^roi_heads\.mask_head\.(\d+)\.1\.{_BN}$"),
        lambda m, n: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.norm.{m[2]}",
    ),
    (
        re.compile(r"^roi_heads\.mask_predictor\.conv5_mask\.(weight|bias)$"),
        lambda m, n: f"roi_heads.mask_head.deconv.{m[1]}",
    ),
    (
        re.compile(r"^roi_heads\.mask_predictor\.mask_fcn_logits\.(weight|bias)$"),
        lambda m, n: f"roi_heads.mask_head.predictor.{m[1]}",
    ),
)


_LAYOUT = layout.FamilyLayout(
    family=FAMILY, rules=_REVERSE, expected=_EXPECTED, stage_prefix=lambda t: f"backbone.bottom_up.res{t + 1}"
)
_count, _require, _dim = _LAYOUT.count, _LAYOUT.require, _LAYOUT.dim


def detectron2_name(canonical: str, *, box_head_convs: int = 0, rpn_conv_depth: int = 1) -> str:
    """Detectron2's name for an engine (canonical) parameter name.

    Raises:
        KeyError: the name has no Detectron2 counterpart.
    """
    return _LAYOUT.name(canonical, box_head_convs=box_head_convs, rpn_conv_depth=rpn_conv_depth)


def name_map(spec: ArchitectureSpec, *, box_pool_size: int = 7, _shapes: Mapping | None = None) -> dict[str, str]:
    """Detectron2 name -> canonical name of every tensor of a network with these sizes."""
    return _LAYOUT.name_map(spec, box_pool_size=box_pool_size, shapes=_shapes)


def architecture(state: Mapping[str, Tensor]) -> tuple[ArchitectureSpec, int]:
    """Network sizes read from a Detectron2-named state dict, and the box RoIAlign size implied by fc1.

    Raises:
        CheckpointError: keys needed to tell the sizes are missing, or the network is of a kind
            the engine does not run (no mask head, class-agnostic heads, other box heads).
    """
    _require(state, SIGNATURE_KEYS)
    blocks, widths, outs, groups = _LAYOUT.bottleneck_stages(state)

    if "proposal_generator.rpn_head.conv.weight" in state:
        rpn_depth = 1
    else:
        rpn_convs = _count(state, r"^proposal_generator\.rpn_head\.conv\.conv(\d+)\.weight$")
        if not rpn_convs:
            _require(state, ["proposal_generator.rpn_head.conv.weight"])
        rpn_depth = len(rpn_convs)

    rh = "roi_heads"
    box_convs = _count(state, rf"^{rh}\.box_head\.conv(\d+)\.weight$")
    fcs = _count(state, rf"^{rh}\.box_head\.fc(\d+)\.weight$")
    if not (len(box_convs) == 0 and len(fcs) == 2) and not (len(box_convs) > 0 and len(fcs) == 1):
        raise CheckpointError(
            f"box head with {len(box_convs)} conv and {len(fcs)} fc layers "
            f"({rh}.box_head.conv*/fc*); the engine runs Detectron2's FastRCNNConvFCHead with "
            "NUM_CONV 0 and NUM_FC 2 (fc1, fc2), or NUM_CONV n > 0 and NUM_FC 1"
        )
    _require(state, [f"{rh}.box_head.fc1.weight"] + ([f"{rh}.box_head.conv1.weight"] if box_convs else []))
    fpn_channels = _dim(state, "backbone.fpn_lateral2.weight", 0)
    box_in = _dim(state, f"{rh}.box_head.conv1.weight", 0) if box_convs else fpn_channels
    fc_in = _dim(state, f"{rh}.box_head.fc1.weight", 1)
    pool = int(round((fc_in / box_in) ** 0.5)) if box_in else 0
    if pool < 1 or pool * pool * box_in != fc_in:
        raise CheckpointError(
            f"{rh}.box_head.fc1.weight takes {fc_in} inputs, which is not {box_in} channels x P x P pooled features"
        )

    mask_convs = _count(state, rf"^{rh}\.mask_head\.mask_fcn(\d+)\.weight$")
    if not mask_convs:
        raise CheckpointError(
            f"{rh}.mask_head.mask_fcn1.weight is missing: the checkpoint has no mask head "
            "(a Faster R-CNN model, MASK_ON False?); only Mask R-CNN checkpoints are supported"
        )
    _require(state, [f"{rh}.mask_head.predictor.weight"])
    num_classes = _dim(state, f"{rh}.box_predictor.cls_score.weight", 0)
    num_box_classes = _dim(state, f"{rh}.box_predictor.bbox_pred.weight", 0) // 4
    num_mask_classes = _dim(state, f"{rh}.mask_head.predictor.weight", 0)
    if num_box_classes != num_classes - 1:
        raise CheckpointError(
            f"{rh}.box_predictor.bbox_pred has {num_box_classes} x 4 outputs for {num_classes - 1} classes "
            f"(cls_score has {num_classes} rows, background last); only class-specific box regression "
            "without a background row is supported (CLS_AGNOSTIC_BBOX_REG False)"
        )
    if num_mask_classes != num_classes - 1:
        raise CheckpointError(
            f"{rh}.mask_head.predictor has {num_mask_classes} channels for {num_classes - 1} classes; "
            "only class-specific masks are supported (CLS_AGNOSTIC_MASK False)"
        )

    spec = ArchitectureSpec(
        blocks_per_stage=blocks,  # type: ignore[arg-type]
        stage_widths=widths,  # type: ignore[arg-type]
        stage_out_channels=outs,  # type: ignore[arg-type]
        groups=groups,
        fpn_channels=fpn_channels,
        fpn_norm="backbone.fpn_lateral2.norm.weight" in state,
        num_anchors=_dim(state, "proposal_generator.rpn_head.objectness_logits.weight", 0),
        rpn_conv_depth=rpn_depth,
        box_head_convs=len(box_convs),
        box_head_conv_channels=box_in if box_convs else 256,
        box_head_norm=f"{rh}.box_head.conv1.norm.weight" in state,
        representation_size=_dim(state, f"{rh}.box_head.fc1.weight", 0),
        num_classes=num_classes,
        num_box_classes=num_box_classes,
        mask_convs=len(mask_convs),
        mask_channels=_dim(state, f"{rh}.mask_head.mask_fcn1.weight", 0),
        mask_norm=f"{rh}.mask_head.mask_fcn1.norm.weight" in state,
        num_mask_classes=num_mask_classes,
    )
    return spec, pool


# --- conversion ------------------------------------------------------------------------------

_IGNORED = re.compile(r"(^|\.)num_batches_tracked$|^proposal_generator\.anchor_generator\.|^pixel_(mean|std)$")


def _pixel_stat(value: Tensor | None) -> tuple[float, float, float] | None:
    if value is None or value.numel() != 3:
        return None
    return tuple(float(x) for x in value.reshape(-1).tolist())  # type: ignore[return-value]


def convert(state: Mapping) -> tuple[dict[str, Tensor], ArchitectureSpec, Detectron2Notes]:
    """Canonical state dict (float32, engine names), sizes, and notes (eps 1e-5, stride, pixel stats).

    ``state``: Detectron2-named tensors (as :func:`read_detectron2` returns them), or anything
    :func:`read_detectron2` accepts in memory. Not modified.

    Raises:
        CheckpointError: listing, under Detectron2's names, keys that fit no Mask R-CNN R-FPN
            parameter, missing keys and wrongly shaped tensors; or naming what the engine does not run.
    """
    if "model" in state or not all(isinstance(v, Tensor) for v in state.values()):
        state = read_detectron2(state)
    elif not looks_like_detectron2(state.keys()):
        read_detectron2(state)  # raises, naming the family the keys look like
    ignored = sorted(k for k in state if _IGNORED.search(k))
    params = {k: v for k, v in state.items() if not _IGNORED.search(k)}

    spec, pool = architecture(params)
    shapes = layout.expected_shapes(spec, box_pool_size=pool)
    names = name_map(spec, box_pool_size=pool, _shapes=shapes)

    # FrozenBN saved without running statistics (Detectron2 fills them with 0 and 1)
    defaulted = []
    for key in list(params):
        if key.startswith("backbone.bottom_up.") and key.endswith(".norm.weight"):
            prefix = key[: -len("weight")]
            added = False
            for stat, fill in (("running_mean", torch.zeros), ("running_var", torch.ones)):
                if prefix + stat not in params:
                    params[prefix + stat] = fill(params[key].shape, dtype=torch.float32)
                    added = True
            if added:
                defaulted.append(prefix[:-1])

    unmapped = [k for k in params if k not in names]
    missing = [d2 for d2 in names if d2 not in params]
    misshaped = [
        f"{d2} {tuple(params[d2].shape)} (expected {shapes[c]})"
        for d2, c in names.items()
        if d2 in params and tuple(params[d2].shape) != shapes[c]
    ]
    problems = format_lists(
        ("keys that fit no parameter of the network", unmapped), ("missing keys", missing), ("wrong shape", misshaped)
    )
    if any(k.endswith((".norm.running_mean", ".norm.running_var")) for k in missing):
        problems.append(
            "norm layers outside the backbone without running statistics are GroupNorm "
            "(NORM: 'GN'), which the engine does not support"
        )
    if problems:
        raise CheckpointError(
            f"{FAMILY} checkpoint does not fit a Mask R-CNN R-FPN network with the sizes read from it: "
            + "; ".join(problems)
        )

    canonical = {names[k]: (v.float() if v.is_floating_point() else v) for k, v in params.items()}
    mean = _pixel_stat(state.get("pixel_mean"))
    std = _pixel_stat(state.get("pixel_std"))
    notes = Detectron2Notes(
        bn_eps=BN_EPS,
        stride_in_1x1=spec.groups == 1,
        pixel_mean=mean or PIXEL_MEAN_BGR,
        pixel_std=std or (PIXEL_STD_MSRA if spec.groups == 1 else PIXEL_STD_FAIR_RESNEXT),
        pixel_stats_from_file=mean is not None and std is not None,
        box_pool_size=pool,
        defaulted_bn_stats=tuple(defaulted),
        ignored_keys=tuple(ignored),
    )
    return canonical, spec, notes
