"""COCO class names for the standard class layouts, and names for fine-tuned checkpoints.

- torchvision: 91 slots, index = COCO category id, 0 is background, "N/A" where COCO has no class.
- Detectron2 / mmdetection: 80 contiguous classes 0..79 (background, if any, is index 80).
"""

from __future__ import annotations

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


def default_class_names(num_classes: int, *, background: str = "first") -> list[str]:
    """Names indexed by the checkpoint's label.

    Args:
        num_classes: classifier outputs, background included.
        background: "first" (torchvision) or "last" (Detectron2, mmdetection).

    COCO names for the 91-slot torchvision layout and the 81-output (80 + background) layout;
    "class i" otherwise.
    """
    if background == "first" and num_classes == len(COCO_91):
        return list(COCO_91)
    if background == "last" and num_classes == len(COCO_80) + 1:
        return list(COCO_80)
    count = num_classes if background == "first" else num_classes - 1
    return [f"class {i}" for i in range(count)]


def load_class_names(source: str | Sequence[str], *, num_classes: int, background: str = "first") -> list[str]:
    """User-given names for a fine-tuned checkpoint, checked against its class count.

    Args:
        source: a text file with one name per line, a comma-separated string, or a sequence of names,
            listing the foreground classes in label order (without background).
        num_classes: classifier outputs of the checkpoint, background included.

    Returns:
        Names indexed by label ("__background__" at 0 for background-first layouts).

    Raises:
        ValueError: the number of names does not match the checkpoint's foreground classes.
    """
    if isinstance(source, str):
        path = Path(source)
        names = path.read_text().splitlines() if path.is_file() else source.split(",")
    else:
        names = list(source)
    names = [n.strip() for n in names if n.strip()]
    foreground = num_classes - 1
    if len(names) != foreground:
        raise ValueError(
            f"{len(names)} class names given, but the checkpoint has {foreground} foreground classes "
            f"({num_classes} outputs including background); give one name per foreground class, in label order"
        )
    return ["__background__", *names] if background == "first" else names
