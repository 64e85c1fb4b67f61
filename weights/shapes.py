"""Synthetic "shapes" data: circles, squares and triangles on a textured background, with exact masks.

In the spirit of the shapes example of matterport's Mask_RCNN, this is the data the bundled
small model (``weights/bundled/``) was trained and is evaluated on. Everything is deterministic:
image ``index`` of a data set with ``seed`` is drawn from ``numpy.random.default_rng([seed, index])``,
so any image can be regenerated on its own, on any machine.

Each image is ``height x width`` (each drawn from ``size_range``), uint8 RGB. Shapes are drawn
one after another, each on top of the earlier ones; an instance's mask is the set of its pixels
still visible in the final image, so masks never overlap and are exactly what the image shows.
A new shape that would hide too much of an earlier one is placed elsewhere (or left out), so
every instance keeps at least ``min_visible`` of its area. Pixel noise is added after drawing,
over shapes and background alike.

Classes (COCO category ids, background is 0 in the model): 1 circle, 2 square, 3 triangle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

CLASS_NAMES: tuple[str, ...] = ("__background__", "circle", "square", "triangle")

#: seeds of the data sets used to build the bundled model; evaluation uses a seed not used in training
TRAIN_SEED = 1
HELD_OUT_SEED = 1001


@dataclass(frozen=True)
class ShapesSpec:
    """How images are drawn.

    Attributes:
        size_range: inclusive range of image height and width, pixels.
        shapes_range: inclusive range of shapes attempted per image.
        radius_range: inclusive range of a shape's circumradius, pixels.
        min_visible: least fraction of a shape's own area that must stay visible.
        noise_std: standard deviation of the per-pixel Gaussian noise, grey levels.
    """

    size_range: tuple[int, int] = (224, 320)
    shapes_range: tuple[int, int] = (2, 6)
    radius_range: tuple[int, int] = (14, 48)
    min_visible: float = 0.6
    noise_std: float = 8.0


DEFAULT_SPEC = ShapesSpec()


@dataclass(frozen=True)
class ShapesSample:
    """One generated image and its instances.

    Attributes:
        image: uint8 [H, W, 3], RGB.
        masks: bool [N, H, W], exact visible pixels of each instance; pairwise disjoint.
        labels: int64 [N], 1 circle, 2 square, 3 triangle.
        boxes: float32 [N, 4], x1 y1 x2 y2 in pixels, the tight box of each mask (x2, y2 exclusive).
    """

    image: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth colour field plus faint stripes: float32 [H, W, 3] in 0..255."""
    base = rng.uniform(40, 215, size=3)
    coarse = rng.normal(0.0, 28.0, size=(rng.integers(3, 7), rng.integers(3, 7), 3)).astype(np.float32)
    field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, 24)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period))
    stripes = stripes[..., None] * rng.uniform(0, 12, size=3).astype(np.float32)
    return np.clip(base.astype(np.float32) + field + stripes, 0, 255)


def _shape_polygon(kind: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray | None:
    """Vertices (int32 [K, 2], x y) of a square (2) or equilateral triangle (3); None for a circle (1)."""
    if kind == 1:
        return None
    corners = 4 if kind == 2 else 3
    t = angle + np.arange(corners) * (2 * np.pi / corners)
    return np.round(np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)).astype(np.int32)


def _rasterise(kind: int, cx: float, cy: float, radius: float, angle: float, height: int, width: int) -> np.ndarray:
    """bool [H, W]: the pixels the shape covers (the same rasterisation that paints it)."""
    canvas = np.zeros((height, width), dtype=np.uint8)
    polygon = _shape_polygon(kind, cx, cy, radius, angle)
    if polygon is None:
        cv2.circle(canvas, (int(round(cx)), int(round(cy))), int(round(radius)), 1, thickness=-1, lineType=cv2.LINE_8)
    else:
        cv2.fillPoly(canvas, [polygon], 1, lineType=cv2.LINE_8)
    return canvas.astype(bool)


def _shape_colour(rng: np.random.Generator, background_mean: np.ndarray) -> np.ndarray:
    """A colour at least 90 grey levels (Euclidean, RGB) away from the background's mean."""
    for _ in range(100):
        colour = rng.uniform(0, 255, size=3)
        if np.linalg.norm(colour - background_mean) >= 90:
            return colour
    return 255.0 - background_mean


def generate(seed: int, index: int, spec: ShapesSpec = DEFAULT_SPEC) -> ShapesSample:
    """Image ``index`` of the data set with ``seed``; the same arguments always give the same sample."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([seed, index])
    height = int(rng.integers(spec.size_range[0], spec.size_range[1] + 1))
    width = int(rng.integers(spec.size_range[0], spec.size_range[1] + 1))
    image = _background(rng, height, width)
    background_mean = image.reshape(-1, 3).mean(axis=0)
    own_areas: list[int] = []
    visible: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(spec.shapes_range[0], spec.shapes_range[1] + 1))):
        kind = int(rng.integers(1, 4))
        colour = _shape_colour(rng, background_mean)
        for _attempt in range(20):
            radius = float(rng.uniform(spec.radius_range[0], spec.radius_range[1]))
            margin = radius * 0.5  # shapes may run off the edge a little
            cx = float(rng.uniform(margin, width - margin))
            cy = float(rng.uniform(margin, height - margin))
            angle = float(rng.uniform(0, 2 * np.pi))
            mask = _rasterise(kind, cx, cy, radius, angle, height, width)
            area = int(mask.sum())
            if area < 0.6 * np.pi * spec.radius_range[0] ** 2 * 0.4:  # mostly off the image
                continue
            if all((v & ~mask).sum() >= spec.min_visible * a for v, a in zip(visible, own_areas)):
                break
        else:
            continue
        visible = [v & ~mask for v in visible]
        visible.append(mask)
        own_areas.append(area)
        labels.append(kind)
        image[mask] = colour
    image = image + rng.normal(0.0, spec.noise_std, size=image.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    masks = np.stack(visible) if visible else np.zeros((0, height, width), dtype=bool)
    return ShapesSample(
        image=image,
        masks=masks,
        labels=np.asarray(labels, dtype=np.int64),
        boxes=np.asarray([mask_box(m) for m in masks], dtype=np.float32).reshape(-1, 4),
    )


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box of a bool [H, W] mask: x1 y1 x2 y2 with x2, y2 exclusive (COCO's x y w h is x1 y1 x2-x1 y2-y1)."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(ys) == 0:
        return (0, 0, 0, 0)
    return (int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1)


def samples(seed: int, count: int, spec: ShapesSpec = DEFAULT_SPEC) -> Iterator[ShapesSample]:
    """Images 0..count-1 of the data set with ``seed``."""
    for index in range(count):
        yield generate(seed, index, spec)


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of a bool [H, W] mask: run lengths in column-major order, starting with zeros."""
    flat = np.asarray(mask, dtype=np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def coco_dataset(seed: int, count: int, spec: ShapesSpec = DEFAULT_SPEC) -> dict:
    """COCO ground truth (``images``, ``annotations``, ``categories``) of images 0..count-1; image ids are 1-based."""
    return coco_annotations(list(samples(seed, count, spec)), [f"shapes_{seed}_{i:05d}.png" for i in range(count)])


def coco_annotations(items: list[ShapesSample], file_names: list[str]) -> dict:
    """COCO ground truth of ``items``: image ``k`` gets id ``k + 1`` and ``file_names[k]``; masks as uncompressed RLE."""
    if len(items) != len(file_names):
        raise ValueError(f"{len(items)} samples but {len(file_names)} file names")
    images, annotations = [], []
    for index, (sample, name) in enumerate(zip(items, file_names)):
        height, width = sample.image.shape[:2]
        images.append({"id": index + 1, "file_name": name, "height": height, "width": width})
        for mask, label, box in zip(sample.masks, sample.labels, sample.boxes):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": int(label),
                    "segmentation": uncompressed_rle(mask),
                    "area": float(mask.sum()),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASS_NAMES) if i > 0]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_dataset(folder: str | os.PathLike, *, seed: int, count: int, spec: ShapesSpec = DEFAULT_SPEC) -> Path:
    """Write images ``shapes_SEED_INDEX.png`` and ``annotations.json`` (COCO) to ``folder``; returns the JSON path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    items = list(samples(seed, count, spec))
    names = [f"shapes_{seed}_{index:05d}.png" for index in range(count)]
    for sample, name in zip(items, names):
        if not cv2.imwrite(str(folder / name), cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {folder / name}")
    path = folder / "annotations.json"
    path.write_text(json.dumps(coco_annotations(items, names)))
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a shapes data set: PNG images and COCO annotations.")
    parser.add_argument("folder")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    print(write_dataset(args.folder, seed=args.seed, count=args.count))
