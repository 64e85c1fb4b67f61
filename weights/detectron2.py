"""Detectron2 Mask R-CNN checkpoints (``GeneralizedRCNN`` with a ResNet/ResNeXt-FPN backbone).

Containers (reference notes B.11):

- ``.pkl``: the model zoo's files (``model_final_f10217.pkl`` ...), a pickle of
  ``{'model': {name: numpy.ndarray}, '__author__': ..., ...}`` read with ``encoding='latin1'``
  (the files may come from Python 2).
- ``.pth``: what ``DetectionCheckpointer`` saves, ``{'model': state_dict, 'optimizer': ...,
  'iteration': ...}``, read with ``torch.load(weights_only=True)``.
- in memory: that container, or the ``model`` state dict itself (tensors or numpy arrays).

**Pickle risk.** Unpickling runs whatever the file says: a crafted ``.pkl`` can call
``os.system`` or any other importable function while it loads, or ask a few bytes in for
gigabytes (``bytearray(2**34)``, an array of that shape). ``.pkl`` files are therefore read with
:class:`RestrictedUnpickler`, which resolves only what numpy arrays need (``_reconstruct``,
``scalar``, ``_frombuffer``, ``numpy.dtype``, ``_codecs.encode`` for latin1), ``OrderedDict``,
``set`` and ``frozenset``, checks each of them before it runs, and keeps every object it builds
within the file's size; any other global is refused before it is called. The result is then
checked to be a dict whose ``model`` entry maps names to numeric arrays (no object arrays),
whose data, entries sharing one array counted each time, fits in the file.

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

import codecs
import collections
import math
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from weights import layout
from weights.errors import CheckpointError, format_list, format_lists, key_name, require_zip_within_file
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


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for something a Detectron2 checkpoint never holds: a global outside the
    allowed few, an object of another kind, or more memory than the file's size accounts for."""


class ForbiddenGlobalError(UnsafePickleError):
    """The pickle names a global that :class:`RestrictedUnpickler` does not allow."""


class _NdarrayType:
    """What the pickle's ``numpy.ndarray`` resolves to: the first argument of ``_reconstruct``, which
    builds the array itself. Calling it (``ndarray(shape)``, an array of any size) is refused."""

    def __call__(self, *args, **kwargs):
        raise UnsafePickleError(
            "refused to call numpy.ndarray from a pickle: numpy pickles build arrays with _reconstruct "
            "and fill them from the file's own data"
        )


_NDARRAY = _NdarrayType()
#: numeric kinds an array may have: bool, signed and unsigned int, float, complex
_NUMERIC_KINDS = "biufc"
_LATIN1 = codecs.lookup("latin1").name


def _stream_size(file) -> int:
    """Bytes from the start of a binary file object to its end."""
    try:
        return os.fstat(file.fileno()).st_size
    except (AttributeError, OSError):  # io.BytesIO and other in-memory streams
        here = file.tell()
        end = file.seek(0, os.SEEK_END)
        file.seek(here)
        return end


class _BoundedReader:
    """A binary file that refuses reads past its end.

    The unpickler reads each length-prefixed string with one ``read(n)``, and a file object
    allocates ``n`` bytes before it reads; a length larger than the rest of the file is refused
    here, before anything is allocated.
    """

    def __init__(self, file, size: int):
        self._file = file
        self._remaining = size - file.tell()

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self._remaining
        if n > self._remaining:
            raise pickle.UnpicklingError(
                f"pickle data was truncated: it asks for {n} more bytes where the file has {self._remaining} left"
            )
        data = self._file.read(n)
        self._remaining -= len(data)
        return data

    def readinto(self, buffer) -> int:
        wanted = memoryview(buffer).nbytes
        if wanted > self._remaining:
            self.read(wanted)  # raises: truncated
        count = self._file.readinto(buffer)
        self._remaining -= count
        return count

    def readline(self) -> bytes:
        line = self._file.readline(self._remaining)
        self._remaining -= len(line)
        return line


class RestrictedUnpickler(pickle._Unpickler):
    """Unpickler for Detectron2 model-zoo ``.pkl`` files: numpy arrays, plain containers and
    strings, in memory bounded by the file's size.

    Model-zoo files are ``{'model': {name: ndarray}, '__author__': ..., 'matching_heuristics': ...}``
    pickled by Python 2 or 3 (protocol 2 mostly) and read with ``encoding='latin1'``. What may
    be named, and why nothing else:

    - numpy arrays: ``_reconstruct(ndarray, (0,), 'b')`` then the array's ``__setstate__``
      with (shape, dtype, raw bytes); ``numpy.dtype``; ``scalar`` (numpy scalars); protocol 5's
      ``_frombuffer``. Each is checked before it runs: numeric dtypes only (an object dtype
      unpickles a list of objects and sizes its storage from the shape alone), shapes whose
      bytes match the raw data given, and ``ndarray`` itself is not callable.
    - ``_codecs.encode(text, 'latin1')``, how Python 3 writes bytes at protocol < 3; no other codec.
    - ``collections.OrderedDict``, ``set``, ``frozenset``, and ``bytes()`` without arguments
      (Python 3's protocol 2 empty bytes).

    Any other global (``os.system``, ``builtins.eval``, ``bytearray``, any class) raises
    :class:`ForbiddenGlobalError` before it can be called; Python 2's ``__builtin__`` is read as
    ``builtins``. State may be set (``BUILD``) on arrays and dtypes only.

    Memory: a hostile pickle is only a few bytes asking for huge objects (``bytearray(2**34)``, an
    array of that shape, a string of that length). Every length the stream declares must fit in
    what is left of the file, and the arrays built (and the bytes ``_codecs.encode`` makes) may
    not add up to more than the file's size, since a real checkpoint's data is in the file; any
    more is refused with :class:`UnsafePickleError` before it is allocated. This is why the
    pure-Python unpickler is used: the C one allocates a declared length before reading it.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, *, encoding: str = "latin1", errors: str = "strict"):
        self._file_size = _stream_size(file)
        super().__init__(_BoundedReader(file, self._file_size), encoding=encoding, errors=errors)
        self._spent = {"array": 0, "bytes": 0}
        multiarray, numeric = _numpy_core()
        self._originals = multiarray, numeric
        self._allowed: dict[tuple[str, str], object] = {
            ("numpy", "ndarray"): _NDARRAY,
            ("numpy", "dtype"): self._dtype,
            ("_codecs", "encode"): self._encode,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("builtins", "set"): set,
            ("builtins", "frozenset"): frozenset,
            ("builtins", "bytes"): self._empty_bytes,
        }
        for core in ("numpy.core", "numpy._core"):
            self._allowed[(f"{core}.multiarray", "_reconstruct")] = self._reconstruct
            self._allowed[(f"{core}.multiarray", "scalar")] = self._scalar
            self._allowed[(f"{core}.numeric", "_frombuffer")] = self._frombuffer

    def find_class(self, module: str, name: str):
        if module == "__builtin__":
            module = "builtins"
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise ForbiddenGlobalError(
                f"refused to load the global {module}.{name}: a Detectron2 .pkl checkpoint holds only numpy arrays, "
                "numbers and strings, and anything else could run code or take unbounded memory while unpickling"
            ) from None

    # --- the allowed constructors, checked ---

    def _spend(self, kind: str, nbytes: int, what: str) -> None:
        """Count ``nbytes`` more of ``kind`` ("array" data or encoded "bytes") against the file's size."""
        self._spent[kind] += nbytes
        if self._spent[kind] > self._file_size:
            so_far = f" ({self._spent[kind]} bytes of {kind} data so far)" if self._spent[kind] > nbytes else ""
            raise UnsafePickleError(
                f"refused {what}: the pickle asks for {nbytes} bytes{so_far}, more than the {self._file_size} bytes "
                "of the file; a checkpoint's arrays are stored in the file, so it cannot need more"
            )

    @staticmethod
    def _checked_dtype(dtype) -> np.dtype:
        """``dtype`` if it is a plain numeric dtype (no objects, fields or sub-arrays)."""
        if not isinstance(dtype, np.dtype):
            raise UnsafePickleError(f"expected a numpy dtype in the pickle, got a {type(dtype).__name__}")
        plain = np.dtype(dtype.str)  # a fresh descriptor from the type string: what the flags should be
        if (
            dtype.kind not in _NUMERIC_KINDS
            or dtype.hasobject
            or dtype.names is not None
            or dtype.subdtype is not None
            or (dtype.flags, dtype.itemsize) != (plain.flags, plain.itemsize)
        ):
            raise UnsafePickleError(
                f"refused the numpy dtype {dtype} (kind {dtype.kind!r}, flags {dtype.flags}): checkpoint arrays "
                "hold plain numbers (bool, int, float), without objects, fields or sub-arrays"
            )
        return dtype

    def _array_bytes(self, shape, dtype: np.dtype, what: str) -> int:
        if not (isinstance(shape, tuple) and len(shape) <= 32 and all(type(n) is int and n >= 0 for n in shape)):
            raise UnsafePickleError(f"refused {what}: its shape {shape!r} is not a tuple of sizes")
        return math.prod(shape) * dtype.itemsize

    def _dtype(self, spec, align=False, copy=False) -> np.dtype:
        """``numpy.dtype('f4', False, True)``: always a fresh descriptor, so a later ``BUILD``
        cannot change numpy's shared ones."""
        if not (isinstance(spec, str) and len(spec) <= 8):
            raise UnsafePickleError(f"refused numpy.dtype({spec!r}): checkpoint arrays have plain numeric dtypes")
        return self._checked_dtype(np.dtype(spec, bool(align), True))

    def _reconstruct(self, subtype, shape, typecode):
        if subtype is not _NDARRAY:
            raise UnsafePickleError(f"refused _reconstruct of a {type(subtype).__name__}: only numpy.ndarray")
        if not (isinstance(typecode, (str, bytes)) and len(typecode) <= 8):
            raise UnsafePickleError(f"refused _reconstruct with the type code {typecode!r}")
        dtype = self._checked_dtype(np.dtype(typecode))
        self._spend("array", self._array_bytes(shape, dtype, "an array"), f"an array of shape {shape}")
        return self._originals[0]._reconstruct(np.ndarray, shape, dtype)

    def _scalar(self, dtype, data=None):
        dtype = self._checked_dtype(dtype)
        if not (isinstance(data, (bytes, str)) and len(data) == dtype.itemsize):
            raise UnsafePickleError(f"refused a numpy {dtype} scalar: expected {dtype.itemsize} bytes of data")
        self._spend("array", dtype.itemsize, "a numpy scalar")
        return self._originals[0].scalar(dtype, data)

    def _frombuffer(self, buffer, dtype, shape, order, axis_order=None):
        dtype = self._checked_dtype(dtype)
        nbytes = self._array_bytes(shape, dtype, "an array")
        if not (isinstance(buffer, (bytes, bytearray)) and len(buffer) == nbytes):
            raise UnsafePickleError(f"refused an array of shape {shape} {dtype}: its data is not {nbytes} bytes")
        self._spend("array", nbytes, f"an array of shape {shape}")
        return self._originals[1]._frombuffer(buffer, dtype, shape, order, axis_order)

    def _encode(self, text, encoding="utf-8", errors="strict") -> bytes:
        """``_codecs.encode(text, 'latin1')``: Python 3's bytes at protocol < 3, one byte per character."""
        if not (isinstance(text, str) and isinstance(encoding, str) and codecs.lookup(encoding).name == _LATIN1):
            raise UnsafePickleError(
                f"refused _codecs.encode(..., {encoding!r}): only latin1 text, the way Python 3 pickles bytes"
            )
        self._spend("bytes", len(text), "encoded bytes")
        return text.encode("latin1")

    @staticmethod
    def _empty_bytes(*args) -> bytes:
        if args:
            raise UnsafePickleError("refused bytes(...) with arguments: protocol 2 writes only bytes() (empty)")
        return b""

    # --- opcodes that allocate or set state ---

    def _load_build(self):
        """``BUILD``: set an array's (shape, dtype, data) or a dtype's state; nothing else has state here."""
        state, target = self.stack[-1], self.stack[-2]
        if isinstance(target, np.ndarray):
            self._check_array_state(state)
        elif not isinstance(target, np.dtype):
            raise UnsafePickleError(f"refused to set the state of a {type(target).__name__}: only arrays and dtypes")
        pickle._Unpickler.load_build(self)
        if isinstance(target, np.dtype):
            self._checked_dtype(target)

    dispatch[pickle.BUILD[0]] = _load_build

    def _check_array_state(self, state) -> None:
        """ndarray ``__setstate__``'s ``(version, shape, dtype, is_fortran, raw data)``: numeric and sized alike."""
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4):
            raise UnsafePickleError("refused an array state that is not (shape, dtype, is_fortran, data)")
        shape, dtype, _, data = state
        dtype = self._checked_dtype(dtype)
        nbytes = self._array_bytes(shape, dtype, "an array")
        if not (isinstance(data, (bytes, str)) and len(data) == nbytes):
            raise UnsafePickleError(
                f"refused an array of shape {shape} {dtype}: its data is not {nbytes} bytes of the file"
            )
        self._spend("array", nbytes, f"an array of shape {shape}")

    def _load_bytearray8(self):
        """``BYTEARRAY8``: read first (the bounded reader checks the length), then copy."""
        (size,) = struct.unpack("<Q", self.read(8))
        self.append(bytearray(self.read(size)))

    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8


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
    if is_zip:
        require_zip_within_file(path)
    try:
        if is_zip:
            return _load_torch(path)
        obj = _load_pickle(path)
        if isinstance(obj, int) and obj == _TORCH_LEGACY_MAGIC:  # legacy torch.save format
            what = "a PyTorch checkpoint"
            return _load_torch(path)
        return obj
    except UnsafePickleError as exc:
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
    top = [key_name(k) for k in obj]
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
    converted: dict[int, Tensor] = {}  # id(array) -> tensor: an array under several names is converted once
    for key, value in model.items():
        tensor = converted.get(id(value))
        if tensor is None and isinstance(key, str):
            tensor = converted[id(value)] = _to_tensor(value)
        if tensor is None or not isinstance(key, str):
            dtype = f" {value.dtype}" if isinstance(value, np.ndarray) else ""
            bad.append(f"{key_name(key)} ({type(value).__name__}{dtype})")
        else:
            state[key] = tensor
    if bad:
        raise CheckpointError(
            f"{where}: expected the model's parameters as numeric arrays or tensors; "
            + format_list("entries that are not", bad)
        )
    return state


def _check_fits_in_file(state: Mapping[str, Tensor], path: Path, where: str) -> None:
    """Refuse parameters holding more bytes than the file: a pickle can name one array under any
    number of keys, and every later step (conversion, the network built from the sizes read)
    would pay for each name."""
    total = sum(t.numel() * t.element_size() for t in state.values())
    size = path.stat().st_size
    if total > size:
        raise CheckpointError(
            f"{where}: its {len(state)} parameters hold {total} bytes, more than the {size} bytes of the file "
            "(entries sharing one array count once per name); a checkpoint stores each parameter's data once"
        )


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
    keys = [key_name(k) for k in model]
    if not looks_like_detectron2(keys):
        shown = f"its keys ({len(keys)}) include: {', '.join(sorted(keys)[:8])}" if keys else "it is empty"
        raise CheckpointError(f"{where}: {_describe_other_family(keys)}{_EXPECTED}; {shown}")
    state = _tensor_state(model, where)
    if not isinstance(source, Mapping):
        _check_fits_in_file(state, path, where)
    return state


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
