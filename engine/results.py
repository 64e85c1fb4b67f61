"""The result of one image, a small typed structure (like Detectron2's ``Instances``).

:class:`Detections` holds one image's boxes, scores, labels and masks. Masks come in one of
two forms:

- a torch.bool tensor [N, H, W] at the image's size (``mask_format="full"``, the default);
- a :class:`BoxMasks` (``mask_format="box"``): per detection only the crop of its full mask
  inside its paste region. For large images or many detections this is far smaller:
  100 full masks of an 8000 x 6000 image take 4.8 GB, their box-local crops only the area of
  the (expanded, clipped) boxes.

Export: :meth:`Detections.to_coco` (COCO results format, masks as compressed RLE),
:meth:`Detections.to_numpy` (numpy arrays) and :meth:`Detections.to_dict` (plain Python,
JSON-serialisable). RLE encoding needs the optional dependency pycocotools, imported only
when used.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["BoxMasks", "Detections"]


def _mask_utils():
    """pycocotools.mask, imported on first use (it is an optional dependency)."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError as exc:
        raise ImportError(
            "RLE encoding of masks (to_coco, to_dict, BoxMasks.to_rle) needs pycocotools: pip install pycocotools"
        ) from exc
    return mask_utils


def _rle_str(rle: dict) -> dict:
    """A pycocotools RLE with ``counts`` decoded to str and ``size`` as a list of ints."""
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _encode_full(mask: Tensor) -> dict:
    """COCO compressed RLE of one bool [H, W] mask (pycocotools.mask.encode, Fortran order)."""
    arr = mask.detach().to("cpu", torch.uint8).numpy()
    return _rle_str(_mask_utils().encode(np.asfortranarray(arr[:, :, None]))[0])


def _crop_rle_counts(crop: np.ndarray, y0: int, x0: int, height: int, width: int) -> list[int]:
    """Uncompressed COCO RLE counts of an [H, W] mask that is False outside ``crop``.

    ``crop``: bool [h, w], the mask's rows [y0, y0 + h) and columns [x0, x0 + w).
    COCO runs go down the columns (Fortran order) and start with a run of zeros (possibly
    empty). Works in O(h * w) on the crop alone: the column-major crop gets one False spacer
    after each column but the last, standing for the ``H - h`` outside pixels between two of
    its columns (none when ``h == H``); each run's start is mapped back to its position in the
    full image.
    """
    total = height * width
    h, w = crop.shape
    if h == 0 or w == 0 or not crop.any():
        return [total]
    gap = 1 if h < height else 0
    if gap:
        padded = np.zeros((w, h + 1), dtype=bool)
        padded[:, :h] = crop.T
        seq = padded.reshape(-1)[:-1]
    else:
        seq = np.ascontiguousarray(crop.T).reshape(-1)
    starts = np.concatenate(([0], np.flatnonzero(seq[1:] != seq[:-1]) + 1))
    col, row = np.divmod(starts, h + gap)
    pos = (x0 + col) * height + y0 + row
    values = seq[starts]
    if not values[0]:
        pos[0] = 0  # the first zeros merge with the outside pixels before the region
    elif pos[0] > 0:
        pos = np.concatenate(([0], pos))
        values = np.concatenate(([False], values))
    end = (x0 + w - 1) * height + y0 + h  # just after the crop's last pixel
    if values[-1] and end < total:
        pos = np.append(pos, end)
        values = np.append(values, False)
    counts = np.diff(np.append(pos, total)).tolist()
    return [0] + counts if values[0] else counts


def _as_index_list(indices, n: int) -> list[int]:
    """Detection indices (None: all) as a list of ints in [0, n)."""
    if indices is None:
        return list(range(n))
    if isinstance(indices, Tensor):
        if indices.dtype == torch.bool or indices.dim() > 1:
            raise TypeError(f"indices must be ints (a sequence or a 1-D integer tensor); got {indices.dtype} {tuple(indices.shape)}")
        indices = indices.reshape(-1).tolist()
    elif isinstance(indices, np.ndarray):
        indices = indices.reshape(-1).tolist()
    elif not isinstance(indices, Sequence) or isinstance(indices, (str, bytes)):
        indices = [indices]
    out = []
    for i in indices:
        if isinstance(i, (bool, np.bool_)):
            raise TypeError(f"indices must be ints; got {i!r}")
        i = operator.index(i)
        if not -n <= i < n:
            raise IndexError(f"detection index {i} out of range for {n} masks")
        out.append(i % n if n else i)
    return out


def _selection(item, n: int) -> slice | Tensor:
    """Which of ``n`` detections ``item`` selects, as Detectron2's ``Instances.__getitem__``
    (detectron2/structures/instances.py) takes it: a slice, or an int64 1-D CPU tensor of
    positions in [0, n), in the order given (repeats allowed).

    - ``int`` (a Python, numpy or 0-d torch integer; negative counts from the end): that one
      detection, kept as a length-1 selection (Detectron2 turns it into ``slice(i, None, n)``);
    - ``slice``: a ``slice`` with a positive step (tensors give views); a negative step gives
      positions;
    - a boolean mask (torch tensor, numpy array or list of bools) of shape [n];
    - integers as a 1-D torch tensor, numpy array, list or tuple (negative counts from the end).

    Raises:
        IndexError: an integer outside [-n, n), or a boolean mask whose shape is not [n].
        TypeError: a bool scalar, floats, a tensor of more than one dimension, or another type.
    """
    if isinstance(item, slice):
        positions = range(n)[item]
        if positions.step > 0:
            return slice(positions.start, positions.stop, positions.step)
        return torch.tensor(list(positions), dtype=torch.int64)
    if isinstance(item, (bool, np.bool_)) or (isinstance(item, Tensor) and item.dtype == torch.bool and item.dim() == 0):
        raise TypeError(f"a bool scalar does not select detections; use a boolean mask of shape [{n}]")
    if isinstance(item, (int, np.integer)) or (isinstance(item, Tensor) and item.dim() == 0 and not item.is_floating_point()):
        i = operator.index(item.item() if isinstance(item, Tensor) else item)
        if not -n <= i < n:
            raise IndexError(f"detection index {i} out of range for {n} detections")
        i %= n
        return slice(i, i + 1, 1)
    if isinstance(item, Tensor):
        index = item.detach()
    elif isinstance(item, np.ndarray):
        if item.dtype.kind not in "biu":
            raise TypeError(f"detections are selected by integers or a boolean mask; got a numpy array of {item.dtype}")
        index = torch.from_numpy(np.ascontiguousarray(item))
    elif isinstance(item, (list, tuple)):
        if any(isinstance(v, (bool, np.bool_)) for v in item) and not all(isinstance(v, (bool, np.bool_)) for v in item):
            raise TypeError("a list that selects detections holds either bools (a mask) or ints, not both")
        try:
            index = torch.tensor([operator.index(v) for v in item] if item else [], dtype=torch.int64)
        except TypeError:
            raise TypeError(f"detections are selected by integers or a boolean mask; got {item!r}") from None
        if item and isinstance(item[0], (bool, np.bool_)):
            index = index.bool()
    else:
        raise TypeError(
            "Detections are selected by an int, a slice, a boolean mask or integer indices "
            f"(torch tensor, numpy array or list); got {type(item).__name__}"
        )
    if index.dtype == torch.bool:
        if tuple(index.shape) != (n,):
            raise IndexError(f"a boolean mask of shape {tuple(index.shape)} does not fit {n} detections (needs [{n}])")
        return index.cpu().nonzero().reshape(-1)
    if index.is_floating_point() or index.is_complex():
        if index.numel():
            raise TypeError(f"detections are selected by integers or a boolean mask; got a tensor of {index.dtype}")
        index = index.to(torch.int64)
    if index.dim() != 1:
        raise TypeError(f"integer indices that select detections must be 1-D; got shape {tuple(index.shape)}")
    index = index.cpu().to(torch.int64)
    bad = (index < -n) | (index >= n)
    if bool(bad.any()):
        raise IndexError(f"detection index {int(index[bad][0])} out of range for {n} detections")
    return index % n if n else index


class BoxMasks:
    """Box-local instance masks of one image: per detection, the crop of its full-size mask
    inside its paste region.

    The paste region of a detection is its expanded integer box (torchvision's
    ``expand_boxes`` by ``(M + 2) / M`` in float32, truncated to int64) clipped to the image;
    the paste writes nothing outside it, so there the full-size mask is all False. Expanding
    the crops (:meth:`to_full`) gives exactly the full-size masks.

    Storage (decided for compactness and one-allocation transfers):

    - ``data``: torch.bool, 1-D, on any device: every detection's crop, row-major, back to back;
    - ``table``: torch.int64 [N, 5] on the CPU, rows ``(offset, y0, x0, h, w)``: crop ``i`` is
      ``data[offset : offset + h * w].view(h, w)`` and covers image rows ``[y0, y0 + h)`` and
      columns ``[x0, x0 + w)`` (input-image pixels, x right, y down). An empty region
      (box outside the image) has ``h = w = 0``.
    - ``image_size``: (H, W) of the image.

    Memory is ``sum(h * w)`` bytes plus 40 bytes per detection. The table is exactly what
    :func:`kernels.paste_masks.paste_masks` returns per image with ``crop=True``.
    """

    __slots__ = ("_data", "_table", "_image_size")

    def __init__(self, data: Tensor, table: Tensor, image_size: tuple[int, int]) -> None:
        if not isinstance(data, Tensor) or data.dtype != torch.bool or data.dim() != 1:
            got = f"{data.dtype} {tuple(data.shape)}" if isinstance(data, Tensor) else type(data).__name__
            raise TypeError(f"data must be a 1-D torch.bool tensor; got {got}")
        if not isinstance(table, Tensor) or table.dtype != torch.int64 or table.dim() != 2 or table.shape[1] != 5:
            raise TypeError("table must be an int64 tensor [N, 5] of (offset, y0, x0, h, w)")
        if len(image_size) != 2:
            raise ValueError(f"image_size must be (H, W); got {image_size!r}")
        height, width = (operator.index(v) for v in image_size)
        if height < 1 or width < 1:
            raise ValueError(f"image_size must be positive; got {image_size!r}")
        table = table.cpu()
        if table.shape[0]:
            off, y0, x0, h, w = table.unbind(1)
            bad = (
                (h < 0) | (w < 0) | (y0 < 0) | (x0 < 0) | (y0 + h > height) | (x0 + w > width)
                | (off < 0) | (off + h * w > data.shape[0])
            )
            if bad.any():
                i = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"table row {i} {table[i].tolist()} does not fit the image {(height, width)} "
                    f"or a data buffer of {data.shape[0]} elements"
                )
        self._data = data
        self._table = table
        self._image_size = (height, width)

    # -- basic properties --------------------------------------------------------------

    @property
    def data(self) -> Tensor:
        """torch.bool 1-D: all crops, row-major, back to back."""
        return self._data

    @property
    def table(self) -> Tensor:
        """torch.int64 [N, 5] on the CPU: (offset, y0, x0, h, w) per detection."""
        return self._table

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the image."""
        return self._image_size

    @property
    def regions(self) -> Tensor:
        """torch.int64 [N, 4] on the CPU: (y0, x0, h, w) of each crop in image pixels."""
        return self._table[:, 1:]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(N, H, W): the shape of the equivalent full-size masks."""
        return (len(self), *self._image_size)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bool

    @property
    def device(self) -> torch.device:
        return self._data.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the crops (the table adds 40 per detection)."""
        return int(self._data.numel())

    def __len__(self) -> int:
        return int(self._table.shape[0])

    def __repr__(self) -> str:
        return (
            f"BoxMasks(n={len(self)}, image_size={self._image_size}, crop_pixels={self.nbytes}, "
            f"device={self.device})"
        )

    # -- access ------------------------------------------------------------------------

    def crop(self, i: int) -> Tensor:
        """torch.bool [h, w]: detection ``i``'s mask on rows [y0, y0 + h), columns [x0, x0 + w)
        (a view of :attr:`data`; see :attr:`regions` for the origin)."""
        (i,) = _as_index_list([i], len(self))
        off, _, _, h, w = self._table[i].tolist()
        return self._data[off : off + h * w].view(h, w)

    def to_full(self, indices=None) -> Tensor:
        """torch.bool [n, H, W] full-size masks of the detections ``indices`` (None: all), on
        :attr:`device`; expanded on demand, equal to the paste's full-size output."""
        idx = _as_index_list(indices, len(self))
        out = torch.zeros((len(idx), *self._image_size), dtype=torch.bool, device=self.device)
        rows = self._table.tolist()
        for k, i in enumerate(idx):
            off, y0, x0, h, w = rows[i]
            if h and w:
                out[k, y0 : y0 + h, x0 : x0 + w] = self._data[off : off + h * w].view(h, w)
        return out

    def area(self) -> Tensor:
        """torch.int64 [N]: True pixels per mask (equal to ``to_full().sum((1, 2))``), on :attr:`device`."""
        if len(self) == 0:
            return torch.zeros((0,), dtype=torch.int64, device=self.device)
        zero = torch.zeros((), dtype=torch.int64, device=self.device)
        sums = [
            self._data[off : off + h * w].sum() if h * w else zero for off, _, _, h, w in self._table.tolist()
        ]
        return torch.stack(sums)

    def select(self, item) -> "BoxMasks":
        """The masks of the detections ``item`` selects, as a new :class:`BoxMasks` of the same
        image: ``item`` is an int, a slice, a boolean mask of shape [N] or integer indices (the
        forms of Detectron2's ``Instances.__getitem__``; see :meth:`Detections.__getitem__`).

        The selected crops are copied, back to back, into a new :attr:`data` on :attr:`device`
        (so :attr:`nbytes` counts only them); the table rows keep each crop's region. An empty
        selection gives an empty BoxMasks.

        Raises:
            IndexError: an index outside [-N, N), or a boolean mask whose shape is not [N].
            TypeError: an index of another kind (floats, a bool scalar, 2-D indices).
        """
        n = len(self)
        chosen = _selection(item, n)
        rows = self._table[chosen] if isinstance(chosen, slice) else self._table.index_select(0, chosen)
        sizes = rows[:, 3] * rows[:, 4]
        pieces = [self._data[off : off + size] for off, size in zip(rows[:, 0].tolist(), sizes.tolist())]
        data = torch.cat(pieces) if pieces else self._data.new_zeros((0,))
        table = torch.cat(((torch.cumsum(sizes, 0) - sizes)[:, None], rows[:, 1:]), 1)
        return BoxMasks(data, table, self._image_size)

    def to(self, device: torch.device | str) -> "BoxMasks":
        """A copy with :attr:`data` on ``device`` (the table stays on the CPU)."""
        return BoxMasks(self._data.to(device), self._table, self._image_size)

    def cpu(self) -> "BoxMasks":
        return self.to("cpu")

    # -- RLE -------------------------------------------------------------------------------

    def rle(self, i: int) -> dict:
        """COCO compressed RLE ``{"size": [H, W], "counts": str}`` of detection ``i``'s full mask,
        identical to ``pycocotools.mask.encode`` of the full mask, computed from the crop alone."""
        mask_utils = _mask_utils()
        (i,) = _as_index_list([i], len(self))
        _, y0, x0, _, _ = self._table[i].tolist()
        crop = self.crop(i).cpu().numpy()
        height, width = self._image_size
        counts = _crop_rle_counts(crop, y0, x0, height, width)
        return _rle_str(mask_utils.frPyObjects({"counts": counts, "size": [height, width]}, height, width))

    def iter_rle(self) -> Iterator[dict]:
        """COCO RLE of each detection in turn (one crop in host memory at a time)."""
        for i in range(len(self)):
            yield self.rle(i)

    def to_rle(self) -> list[dict]:
        """COCO RLE (see :meth:`rle`) of every detection; no full-size mask is materialised."""
        return list(self.iter_rle())

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_full(cls, masks: Tensor) -> "BoxMasks":
        """Box-local form of bool [N, H, W] masks, cropped to each mask's tight bounding box
        (``h = w = 0`` for an empty mask). ``from_full(m).to_full()`` equals ``m``."""
        if not isinstance(masks, Tensor) or masks.dtype != torch.bool or masks.dim() != 3:
            raise TypeError("masks must be a torch.bool tensor [N, H, W]")
        n, height, width = masks.shape
        rows_any = masks.any(2)  # [N, H]
        cols_any = masks.any(1)  # [N, W]
        nonempty = rows_any.any(1)
        ar_h = torch.arange(height, device=masks.device)
        ar_w = torch.arange(width, device=masks.device)
        y0 = torch.where(rows_any, ar_h, height).amin(1)
        y1 = torch.where(rows_any, ar_h + 1, 0).amax(1)
        x0 = torch.where(cols_any, ar_w, width).amin(1)
        x1 = torch.where(cols_any, ar_w + 1, 0).amax(1)
        reg = torch.stack((y0, x0, y1 - y0, x1 - x0), 1).cpu().to(torch.int64)
        reg[~nonempty.cpu()] = 0
        area = reg[:, 2] * reg[:, 3]
        offsets = torch.cumsum(area, 0) - area
        table = torch.cat((offsets[:, None], reg), 1)
        crops = [masks[i, y : y + h, x : x + w].reshape(-1) for i, (y, x, h, w) in enumerate(reg.tolist())]
        data = torch.cat(crops) if crops else torch.zeros((0,), dtype=torch.bool, device=masks.device)
        return cls(data, table, (height, width))


@dataclass(frozen=True)
class Detections:
    """Instances found in one image, in that image's own pixel frame.

    Attributes:
        boxes: float32 [N, 4], x1 y1 x2 y2 in input-image pixels (not re-clipped after scaling, as torchvision).
        scores: float32 [N], descending.
        labels: int64 [N], the checkpoint's own class indices (torchvision: COCO category ids 1..90).
        masks: bool [N, H, W] at the input image's size, or a :class:`BoxMasks` (box-local
            crops, same masks; ``mask_format="box"``).
        image_size: (H, W) of the input image.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    masks: Tensor | BoxMasks
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def __getitem__(self, item) -> "Detections":
        """The detections ``item`` selects, as a new :class:`Detections` of the same image, like
        Detectron2's ``Instances.__getitem__`` (detectron2/structures/instances.py)::

            d[d.scores > 0.5]            # boolean mask, torch.bool [N] (numpy or a list of bools too)
            d[d.labels == 1]
            d[3], d[-1]                  # one detection, as a Detections of length 1 (as Detectron2)
            d[1:4], d[::-1]              # slices (out-of-range bounds clip, as for lists)
            d[torch.tensor([0, 2])]      # integer indices: torch int tensor, numpy array, list

        Every field is indexed alike: ``boxes`` [n, 4], ``scores`` [n], ``labels`` [n] and the
        masks, bool [n, H, W] or a :class:`BoxMasks` (:meth:`BoxMasks.select`); ``image_size``
        is kept. Slices with a positive step and ints give views of the tensors (as torch
        slicing, and as Detectron2, whose int becomes ``slice(i, None, N)``); boolean masks and
        index lists give copies. A selection of nothing gives an empty Detections.

        Raises:
            IndexError: an int or index outside [-N, N), or a boolean mask whose shape is not [N].
            TypeError: floats, a bool scalar, indices of more than one dimension, another type.
        """
        chosen = _selection(item, len(self))

        def pick(t: Tensor) -> Tensor:
            return t[chosen] if isinstance(chosen, slice) else t.index_select(0, chosen.to(t.device))

        masks = self.masks.select(chosen) if isinstance(self.masks, BoxMasks) else pick(self.masks)
        return Detections(
            boxes=pick(self.boxes), scores=pick(self.scores), labels=pick(self.labels), masks=masks, image_size=self.image_size
        )

    def __iter__(self):
        """Not iterable, as Detectron2's ``Instances``: index it (``d[i]``, ``d[mask]``) or use its tensors."""
        raise TypeError("Detections is not iterable; select with d[i], d[a:b] or d[d.scores > t], or use d.boxes, d.scores, ...")

    def to(self, device: torch.device | str) -> "Detections":
        """A copy with every tensor on ``device`` (a :class:`BoxMasks` table stays on the CPU)."""
        return Detections(
            boxes=self.boxes.to(device),
            scores=self.scores.to(device),
            labels=self.labels.to(device),
            masks=self.masks.to(device),
            image_size=self.image_size,
        )

    def full_masks(self) -> Tensor:
        """torch.bool [N, H, W] full-size masks, whichever form :attr:`masks` has (a
        :class:`BoxMasks` is expanded: N * H * W bytes)."""
        return self.masks.to_full() if isinstance(self.masks, BoxMasks) else self.masks

    def _rles(self) -> Iterator[dict]:
        """COCO RLE per detection, one detection at a time."""
        if isinstance(self.masks, BoxMasks):
            yield from self.masks.iter_rle()
        else:
            for i in range(self.masks.shape[0]):
                yield _encode_full(self.masks[i])

    def to_coco(self, image_id, *, category_ids: Mapping | Sequence | None = None) -> list[dict]:
        """Detections in the COCO results format (as for ``COCO.loadRes`` / COCOeval).

        Args:
            image_id: the dataset's id of this image (ints of numpy or torch become Python ints).
            category_ids: maps the checkpoint's label to the dataset's category id: a mapping
                ``{label: category_id}`` or a sequence indexed by label; None: the label itself
                (right for torchvision's COCO checkpoints, whose labels are COCO category ids).
                For COCO, ``predictor.coco_category_ids`` (:class:`engine.Predictor`) is the right
                value for every family: None for torchvision's layout, the 80-to-91 table for
                Detectron2's, mmdetection's and matterport's 80 COCO classes.

        Returns:
            One dict per detection, in order: ``image_id``, ``category_id`` (int), ``bbox``
            ``[x, y, w, h]`` floats in input-image pixels (``w = x2 - x1``, ``h = y2 - y1``),
            ``score`` (float) and ``segmentation``, the full-size mask as a compressed RLE
            ``{"size": [H, W], "counts": str}`` (``pycocotools.mask.encode`` of the Fortran
            uint8 [H, W, n] masks, encoded one detection at a time; box-local masks never expand).

        Raises:
            ImportError: pycocotools is not installed (``pip install pycocotools``).
            ValueError: a label has no entry in ``category_ids``.
        """
        _mask_utils()  # fail early, before any work
        if isinstance(image_id, Tensor):
            image_id = image_id.item()
        elif isinstance(image_id, np.generic):
            image_id = image_id.item()
        labels = self.labels.tolist()
        cats = [self._category_id(label, category_ids) for label in labels]
        boxes = self.boxes.detach().cpu()
        xywh = torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), 1).tolist()
        scores = self.scores.tolist()
        return [
            {"image_id": image_id, "category_id": cat, "bbox": bbox, "score": score, "segmentation": rle}
            for cat, bbox, score, rle in zip(cats, xywh, scores, self._rles())
        ]

    @staticmethod
    def _category_id(label: int, category_ids) -> int:
        if category_ids is None:
            return int(label)
        try:
            value = category_ids[label]
        except (KeyError, IndexError):
            raise ValueError(f"label {label} has no entry in category_ids") from None
        return int(value.item() if isinstance(value, (Tensor, np.generic)) else value)

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Arrays on the host: ``boxes`` float32 [N, 4] (x1 y1 x2 y2, input-image pixels),
        ``scores`` float32 [N], ``labels`` int64 [N], ``masks`` bool [N, H, W] (box-local masks
        are expanded to full size: N * H * W bytes)."""
        return {
            "boxes": self.boxes.detach().cpu().numpy(),
            "scores": self.scores.detach().cpu().numpy(),
            "labels": self.labels.detach().cpu().numpy(),
            "masks": self.full_masks().detach().cpu().numpy(),
        }

    def to_dict(self) -> dict:
        """Plain, JSON-serialisable Python: ``boxes`` list of [x1, y1, x2, y2] floats
        (input-image pixels), ``scores`` list of floats, ``labels`` list of ints, ``masks`` list
        of COCO compressed RLE dicts ``{"size": [H, W], "counts": str}`` (as in :meth:`to_coco`;
        needs pycocotools), ``image_size`` [H, W]."""
        _mask_utils()
        return {
            "boxes": self.boxes.detach().cpu().tolist(),
            "scores": self.scores.tolist(),
            "labels": [int(v) for v in self.labels.tolist()],
            "masks": list(self._rles()),
            "image_size": [int(self.image_size[0]), int(self.image_size[1])],
        }
