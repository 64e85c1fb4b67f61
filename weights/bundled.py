"""The files of the small pretrained model that ships with the project: ResNet-18-FPN Mask R-CNN on synthetic shapes.

No model weights can be downloaded where this project is built, and COCO checkpoints are far
too large to ship, so the project carries its own model (``weights/data/shapes_r18_fpn.pth``),
trained by ``examples/train_shapes.py`` on images from :mod:`weights.shapes`. It is an ordinary
torchvision state dict (stored in float16, upcast when loaded) and goes through the same loader
as any user checkpoint. Beside it, ``shapes_r18_fpn.json`` records what a state dict cannot carry:
the file's sha256, its class names, the resize sizes it was trained at and how it was trained.
:func:`shapes_record` reads that record and checks the sha256; :mod:`engine.bundled` turns it
into a configuration and a predictor:

    from engine.bundled import shapes_predictor
    predictor = shapes_predictor(device="cuda")
    detections = predictor.run(images)  # labels: 1 circle, 2 square, 3 triangle
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from weights.errors import CheckpointError

DATA_DIR = Path(__file__).resolve().parent / "data"
SHAPES_CHECKPOINT = DATA_DIR / "shapes_r18_fpn.pth"
SHAPES_RECORD = DATA_DIR / "shapes_r18_fpn.json"


@dataclass(frozen=True)
class BundledRecord:
    """A shipped checkpoint and what its record says beyond its tensors.

    Attributes:
        checkpoint: path of the torchvision-layout ``.pth`` file.
        sha256: the file's expected sha256 (hex).
        class_names: name per label, index 0 the background.
        min_size, max_size: the resize sizes the model was trained at (short side, long side at most).
        bn_eps: batch-norm eps it was trained with (``nn.BatchNorm2d``: 1e-5).
        training: how the file was made (command, device, time, iterations), as recorded then.
    """

    checkpoint: Path
    sha256: str
    class_names: tuple[str, ...]
    min_size: int
    max_size: int
    bn_eps: float = 1e-5
    training: dict = field(default_factory=dict)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def shapes_record(*, verify: bool = True) -> BundledRecord:
    """The bundled shapes model's record; with ``verify``, the checkpoint's sha256 is checked.

    Raises:
        CheckpointError: the checkpoint or its record is missing, or the file's sha256 differs
            from the recorded one (a damaged copy, or a Git LFS pointer instead of the file).
    """
    if not SHAPES_CHECKPOINT.is_file() or not SHAPES_RECORD.is_file():
        raise CheckpointError(
            f"the bundled model is missing: expected {SHAPES_CHECKPOINT} and {SHAPES_RECORD} "
            "(rebuild them with python examples/train_shapes.py --output weights/data)"
        )
    record = json.loads(SHAPES_RECORD.read_text())
    if verify:
        actual = file_sha256(SHAPES_CHECKPOINT)
        if actual != record["sha256"]:
            raise CheckpointError(
                f"{SHAPES_CHECKPOINT} has sha256 {actual}, but {SHAPES_RECORD.name} records {record['sha256']}: "
                "the file is damaged or not the one that was trained"
            )
    return BundledRecord(
        checkpoint=SHAPES_CHECKPOINT,
        sha256=record["sha256"],
        class_names=tuple(record["class_names"]),
        min_size=int(record["min_size"]),
        max_size=int(record["max_size"]),
        training=record.get("training", {}),
    )
