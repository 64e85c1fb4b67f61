"""COCO class names for the standard class layouts, names for fine-tuned checkpoints, and the
labels' COCO category ids.

Names are always indexed by label, so that ``names[label]`` names a detection:

- torchvision: 91 slots, index = COCO category id, 0 is background, "N/A" where COCO has no class.
- Detectron2 / mmdetection: 80 contiguous classes 0..79 (background, if any, is index 80, never a
  label, and has no entry).
- matterport: background first: "__background__" at 0, the 80 COCO classes at 1..80.

:func:`coco_category_ids` gives the COCO category id of each label where the labels are not
already COCO ids (the 80-class layouts), for :meth:`engine.results.Detections.to_coco`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

_COCO_91_TEXT = (
    "__background__ person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant N/A "
    "stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe N/A backpack umbrella "
    "N/A N/A handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard "
    "surfboard tennis_racket bottle N/A wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli "
    "carrot hot_dog pizza donut cake chair couch potted_plant bed N/A dining_table N/A N/A toilet N/A tv laptop "
    "mouse remote keyboard cell_phone microwave oven toaster sink refrigerator N/A book clock vase scissors "
    "teddy_bear hair_drier toothbrush"
)

#: torchvision's 91 slots: COCO_91[category_id] is the name
COCO_91: tuple[str, ...] = tuple(n if n.startswith("__") else n.replace("_", " ") for n in _COCO_91_TEXT.split())
#: the 80 real COCO classes in category-id order (Detectron2 / mmdetection contiguous ids 0..79)
COCO_80: tuple[str, ...] = tuple(n for n in COCO_91[1:] if n != "N/A")
#: COCO category id of each contiguous class 0..79
COCO_80_CATEGORY_IDS: tuple[int, ...] = tuple(i for i, n in enumerate(COCO_91) if i > 0 and n != "N/A")


def default_class_names(num_classes: int, *, background: str = "first", family: str | None = None) -> list[str]:
    """Names indexed by the checkpoint's label.

    Args:
        num_classes: classifier outputs, background included.
        background: "first" (torchvision, matterport) or "last" (Detectron2, mmdetection).
        family: the checkpoint family, where the layout depends on it: matterport's COCO file has
            81 outputs with background first (labels 1..80 are the COCO classes in order), which
            for torchvision would be a fine-tuned model of 80 classes of its own.

    COCO names for the 91-slot torchvision layout, the 81-output background-last layout
    (Detectron2, mmdetection) and, with ``family="matterport"``, the 81-output background-first
    one; "class i" otherwise (for background first, ``"class 0"`` is the background's entry).
    A background-first list has an entry per output, a background-last one only the
    ``num_classes - 1`` foreground classes.
    """
    if background == "first" and num_classes == len(COCO_91):
        return list(COCO_91)
    if background == "first" and family == "matterport" and num_classes == len(COCO_80) + 1:
        return [COCO_91[0], *COCO_80]
    if background == "last" and num_classes == len(COCO_80) + 1:
        return list(COCO_80)
    count = num_classes if background == "first" else num_classes - 1
    return [f"class {i}" for i in range(count)]


def load_class_names(source: str | os.PathLike | Sequence[str], *, num_classes: int, background: str = "first") -> list[str]:
    """User-given names for a fine-tuned checkpoint, checked against its class count.

    Args:
        source: a text file with one name per line (a path, str or ``os.PathLike``), a
            comma-separated string, or a sequence of names, listing the foreground classes in
            label order (without background), as Detectron2's ``thing_classes`` and
            mmdetection's ``classes`` do.
        num_classes: classifier outputs of the checkpoint, background included.
        background: "first" or "last", the checkpoint's layout.

    Returns:
        Names indexed by label ("__background__" at 0 for background-first layouts).

    Raises:
        ValueError: the number of names does not match the checkpoint's foreground classes.
        FileNotFoundError: an ``os.PathLike`` source that is not a file.
        TypeError: ``source`` holds something other than strings.
    """
    if isinstance(source, os.PathLike):
        names = Path(source).read_text().splitlines()
    elif isinstance(source, str):
        path = Path(source)
        names = path.read_text().splitlines() if path.is_file() else source.split(",")
    else:
        names = list(source)
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise TypeError(f"class names must be strings; got {bad[0]!r}")
    names = [n.strip() for n in names if n.strip()]
    foreground = num_classes - 1
    if len(names) != foreground:
        hint = " (leave out the background's name)" if len(names) == num_classes else ""
        raise ValueError(
            f"{len(names)} class names given, but the checkpoint has {foreground} foreground classes "
            f"({num_classes} outputs including background); give one name per foreground class, in label order{hint}"
        )
    return ["__background__", *names] if background == "first" else names


def _same_name(a: str, b: str) -> bool:
    """Names equal up to case and ``_`` / space (``traffic_light`` is ``Traffic light``)."""
    return a.replace("_", " ").strip().lower() == b.replace("_", " ").strip().lower()


def coco_category_ids(class_names: Sequence[str], *, background: str = "first") -> tuple[int, ...] | None:
    """The COCO category id of each label, where the labels are not already COCO category ids.

    Args:
        class_names: names indexed by label, as :func:`default_class_names` and
            :func:`load_class_names` give them (background-first lists with the background's
            entry at 0).
        background: "first" or "last", the checkpoint's layout.

    Returns:
        - ``None`` for torchvision's 91-slot COCO layout, whose labels are the COCO category ids;
        - for the 80-class COCO layouts, a tuple indexed by label: background last (Detectron2,
          mmdetection; labels 0..79) :data:`COCO_80_CATEGORY_IDS`; background first (matterport;
          labels 1..80) ``(0, *COCO_80_CATEGORY_IDS)``, whose slot 0, the background, is never a
          label. E.g. 'person' -> 1, 'bicycle' -> 2, 'toothbrush' -> 90. This is the inverse of
          Detectron2's ``thing_dataset_id_to_contiguous_id`` and mmdetection's ``cat_ids``;
        - ``None`` for any other names (a fine-tuned model's own classes: the label is the id).

    The foreground names decide: they must be the 80 COCO classes in COCO's order (compared up
    to case and ``_`` / space, so mmdetection's and Detectron2's spellings match).
    """
    foreground = list(class_names[1:]) if background == "first" else list(class_names)
    if len(foreground) == len(COCO_91) - 1 and all(_same_name(a, b) for a, b in zip(foreground, COCO_91[1:])):
        return None
    if len(foreground) == len(COCO_80) and all(_same_name(a, b) for a, b in zip(foreground, COCO_80)):
        return (0, *COCO_80_CATEGORY_IDS) if background == "first" else COCO_80_CATEGORY_IDS
    return None
