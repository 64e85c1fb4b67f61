"""The small pretrained model that ships with the project, as a configuration and a predictor.

The file and its record live with the other checkpoint files (:mod:`weights.bundled`,
``weights/data/``); this adds what the engine needs to run it: torchvision's behaviour at the
sizes it was trained at (320 short side, 480 long side at most) and batch-norm eps 1e-5.

    from engine.bundled import shapes_predictor
    predictor = shapes_predictor()      # CUDA when present, else CPU (device="cpu" to force it)
    detections = predictor.run(images)  # labels: 1 circle, 2 square, 3 triangle
    predictor.class_names               # ('__background__', 'circle', 'square', 'triangle')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.config import TORCHVISION_MASKRCNN_R50_FPN, MaskRCNNConfig
from engine.predictor import Predictor
from weights.bundled import shapes_record


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


def shapes_model(*, verify: bool = True) -> BundledModel:
    """The bundled shapes model; with ``verify``, the checkpoint's sha256 is checked.

    Raises:
        weights.CheckpointError: the checkpoint or its record is missing, or the file's sha256
            differs from the recorded one (:func:`weights.bundled.shapes_record`).
    """
    record = shapes_record(verify=verify)
    config = TORCHVISION_MASKRCNN_R50_FPN.replace(
        name="shapes_r18_fpn", min_size=record.min_size, max_size=record.max_size, bn_eps=record.bn_eps
    )
    return BundledModel(
        checkpoint=record.checkpoint,
        sha256=record.sha256,
        class_names=record.class_names,
        config=config,
        training=record.training,
    )


def shapes_predictor(**kwargs) -> Predictor:
    """A :class:`engine.Predictor` running the bundled shapes model; keyword arguments go to it.

    Defaults as :class:`engine.Predictor`'s (``device=None``: CUDA when present, else CPU), with
    the model's own configuration and class names (``class_names`` indexed by label:
    '__background__', 'circle', 'square', 'triangle'; ``coco_category_ids`` None).
    """
    model = shapes_model()
    kwargs.setdefault("config", model.config)
    kwargs.setdefault("class_names", model.class_names[1:])  # the foreground names; the record's [0] is the background
    return Predictor(model.checkpoint, family="torchvision", **kwargs)
