"""``maskrcnn-engine to-coco``: a ``predict`` run's output folder as a COCO results file.

The COCO results format is what ``COCO.loadRes`` and COCOeval read (and what Detectron2's
``COCOEvaluator`` writes as ``coco_instances_results.json``): a JSON list with one entry per
detection, ``image_id`` (int), ``category_id`` (int), ``bbox`` ``[x, y, w, h]``, ``score`` and
``segmentation`` (compressed RLE).

- **Image ids.** With the data set's annotation file, each image gets the id of the entry whose
  ``file_name`` is its ``image_id`` (the path relative to the input root), or, failing that, its
  base name when only one entry has it. Without one, images are numbered 1..N in ``image_id``
  order, and ``<results>.images.json`` lists ``id``, ``file_name``, ``height`` and ``width``
  (COCO's ``images`` entries) so that the ids can be traced back.
- **Category ids.** An explicit ``{label: category_id}`` map wins. Otherwise, with an annotation
  file, the ``category_name`` written by the run is looked up among its categories' names
  (case and ``_``/space insensitive; COCO's own names are what :mod:`engine.class_names` gives the
  COCO checkpoints). Without either, the checkpoint's label is the category id (right for
  torchvision's COCO checkpoints).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from engine.job_outputs import iter_predictions, write_atomically

__all__ = ["to_coco"]


def _name_key(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def _image_ids_from_annotations(rows: list[dict], images: list[dict]) -> list[int]:
    by_name = {str(im["file_name"]): int(im["id"]) for im in images}
    by_base: dict[str, list[int]] = {}
    for im in images:
        by_base.setdefault(PurePosixPath(str(im["file_name"])).name, []).append(int(im["id"]))
    ids, missing = [], []
    for row in rows:
        found = by_name.get(row["image_id"])
        if found is None:
            candidates = by_base.get(PurePosixPath(row["image_id"]).name, [])
            found = candidates[0] if len(candidates) == 1 else None
        if found is None:
            missing.append(row["image_id"])
        ids.append(found)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{len(missing)} predicted images have no entry in the annotation file (matched by file_name): {shown}")
    return ids


def _category_lookup(rows: list[dict], categories: list[dict] | None, category_map: Mapping | None):
    """A function detection -> category id."""
    if category_map is not None:
        table = {int(k): int(v) for k, v in category_map.items()}

        def mapped(d):
            try:
                return table[int(d["category_id"])]
            except KeyError:
                raise ValueError(f"label {d['category_id']} ({d['category_name']!r}) has no entry in the category map") from None

        return mapped
    if categories is not None:
        by_name = {_name_key(c["name"]): int(c["id"]) for c in categories}
        names = {d["category_name"] for r in rows for d in r["detections"]}
        unknown = sorted(n for n in names if _name_key(n) not in by_name)
        if unknown:
            raise ValueError(
                f"predicted categories {unknown} are not among the annotation file's categories "
                f"{sorted(c['name'] for c in categories)}; give the label -> category id mapping (--category-map)"
            )
        return lambda d: by_name[_name_key(d["category_name"])]
    return lambda d: int(d["category_id"])


def to_coco(
    run_dir: str | Path,
    destination: str | Path,
    *,
    annotations: str | Path | None = None,
    category_map: Mapping | None = None,
) -> dict:
    """Writes the COCO results file of a ``predict`` run (see the module docstring).

    Args:
        run_dir: the ``--output`` folder of ``maskrcnn-engine predict`` (JSON lines or Parquet).
        destination: the results file to write (by rename: whole or absent).
        annotations: the data set's COCO annotation file, for its image and category ids.
        category_map: ``{label: category_id}``, overriding the lookup by name.

    Returns:
        ``{"images": n, "detections": m, "results": path, "images_index": path or None}``.

    Raises:
        FileNotFoundError: ``run_dir`` holds no predictions.
        ValueError: an image or a category that cannot be given an id.
    """
    rows = sorted(iter_predictions(Path(run_dir)), key=lambda r: r["image_id"])
    destination = Path(destination)
    index_path = None
    if annotations is not None:
        dataset = json.loads(Path(annotations).read_text())
        image_ids = _image_ids_from_annotations(rows, dataset.get("images", []))
        category_of = _category_lookup(rows, dataset.get("categories", []), category_map)
    else:
        image_ids = list(range(1, len(rows) + 1))
        category_of = _category_lookup(rows, None, category_map)
    results = [
        {
            "image_id": image_id,
            "category_id": category_of(d),
            "bbox": d["bbox"],
            "score": d["score"],
            "segmentation": d["segmentation"],
        }
        for row, image_id in zip(rows, image_ids)
        for d in row["detections"]
    ]
    destination.parent.mkdir(parents=True, exist_ok=True)
    if annotations is None:
        index_path = destination.with_name(destination.stem + ".images.json")
        images = [
            {"id": i, "file_name": r["image_id"], "height": r["height"], "width": r["width"]} for r, i in zip(rows, image_ids)
        ]
        write_atomically(index_path, json.dumps({"images": images}))
    write_atomically(destination, json.dumps(results))
    return {"images": len(rows), "detections": len(results), "results": str(destination), "images_index": index_path and str(index_path)}
