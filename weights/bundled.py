"""The small pretrained model that ships with the project: ResNet-18-FPN Mask R-CNN on synthetic shapes.

No model weights can be downloaded where this project is built, and COCO checkpoints are far
too large to ship, so the project carries its own model (``weights/data/shapes_r18_fpn.pth``),
trained by :mod:`weights.train_shapes` on images from :mod:`weights.shapes`. It is an ordinary
torchvision state dict (stored in float16, upcast when loaded) and goes through the same loader
as any user checkpoint; :func:`shapes_model` adds what a state dict cannot carry: the resize
sizes it was trained at, its class names, and the file's sha256, checked before loading.

    from weights.bundled import shapes_predictor
    predictor = shapes_predictor(device="cuda")
    detections = predictor.run(images)  # labels: 1 circle, 2 square, 3 triangle
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import TORCHVISION_MASKRCNN_R50_FPN, MaskRCNNConfig
from weights.errors import CheckpointError

DATA_DIR = Path(__file__).resolve().parent / "data"
SHAPES_CHECKPOINT = DATA_DIR / "shapes_r18_fpn.pth"
SHAPES_RECORD = DATA_DIR / "shapes_r18_fpn.json"


@dataclass(frozen=True)
class BundledModel:
    """A shipped checkpoint and what it needs beyond its tensors.

    Attributes:
        checkpoint: path of the torchvision-layout ``.pth`` file.
        sha256: the file's expected sha256 (hex).
        class_names: name per label, index 0 the background.
        config: torchvision's behaviour at the sizes the model was trained at (batch-norm eps 1e-5).
        training: how the file was made (command, device, time, iterations), as recorded then.
    """

    checkpoint: Path
    sha256: str
    class_names: tuple[str, ...]
    config: MaskRCNNConfig
    training: dict = field(default_factory=dict)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def shapes_model(*, verify: bool = True) -> BundledModel:
    """The bundled shapes model's record; with ``verify``, the checkpoint's sha256 is checked.

    Raises:
        CheckpointError: the checkpoint or its record is missing, or the file's sha256 differs
            from the recorded one (a damaged copy, or a Git LFS pointer instead of the file).
    """
    if not SHAPES_CHECKPOINT.is_file() or not SHAPES_RECORD.is_file():
        raise CheckpointError(
            f"the bundled model is missing: expected {SHAPES_CHECKPOINT} and {SHAPES_RECORD} "
            "(rebuild them with python -m weights.train_shapes --output weights/data)"
        )
    record = json.loads(SHAPES_RECORD.read_text())
    if verify:
        actual = file_sha256(SHAPES_CHECKPOINT)
        if actual != record["sha256"]:
            raise CheckpointError(
                f"{SHAPES_CHECKPOINT} has sha256 {actual}, but {SHAPES_RECORD.name} records {record['sha256']}: "
                "the file is damaged or not the one that was trained"
            )
    config = TORCHVISION_MASKRCNN_R50_FPN.replace(
        name="shapes_r18_fpn",
        min_size=int(record["min_size"]),
        max_size=int(record["max_size"]),
        bn_eps=1e-5,  # trained with nn.BatchNorm2d
    )
    return BundledModel(
        checkpoint=SHAPES_CHECKPOINT,
        sha256=record["sha256"],
        class_names=tuple(record["class_names"]),
        config=config,
        training=record.get("training", {}),
    )


def shapes_predictor(**kwargs):
    """A :class:`engine.Predictor` running the bundled shapes model; keyword arguments go to it."""
    from engine.predictor import Predictor  # the predictor imports weights: import it late

    model = shapes_model()
    return Predictor(model.checkpoint, family="torchvision", config=kwargs.pop("config", model.config), **kwargs)
