"""Issue 12's parity figures against real mmdetection 3.3, for every zoo config (a script, not a test).

For each config of ``mmdet_models.ZOO_CONFIGS`` (and a 2.x-format file of the R-50 model), with
realistic and with saturated RPN objectness, one image per call and one batch of all images:
detections matched (same label, box IoU >= 0.99), the largest score error of a match, the mean
mask IoU of the matches, and whether everything was bit-identical.

    python tests/mmdet_parity_report.py [--configs NAME ...] [--images astronaut coffee]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import conftest  # noqa: E402,F401  (the interpreter switch, as in the tests)
import torch  # noqa: E402
import torchvision  # noqa: E402

from checkpoints import photographs  # noqa: E402
from mmdet_models import ZOO_CONFIGS, bgr, build_model, mmdet_batch, save_checkpoint, save_checkpoint_2x  # noqa: E402

from engine import Predictor  # noqa: E402


def compare(ours, theirs) -> dict:
    """Match each mmdetection detection to ours (same label, best box IoU >= 0.99)."""
    n = len(theirs.bboxes)
    out = {"theirs": n, "ours": len(ours), "matched": 0, "max_score_error": 0.0, "mask_ious": [], "identical": False}
    out["identical"] = (
        len(ours) == n
        and torch.equal(ours.labels, theirs.labels)
        and torch.equal(ours.scores, theirs.scores)
        and torch.equal(ours.boxes, theirs.bboxes)
        and torch.equal(ours.masks, theirs.masks)
    )
    if n == 0 or len(ours) == 0:
        return out
    iou = torchvision.ops.box_iou(theirs.bboxes, ours.boxes)
    iou = torch.where(theirs.labels[:, None] == ours.labels[None, :], iou, torch.zeros_like(iou))
    best, j = iou.max(dim=1)
    for i in torch.nonzero(best >= 0.99).squeeze(1).tolist():
        out["matched"] += 1
        out["max_score_error"] = max(out["max_score_error"], float((theirs.scores[i] - ours.scores[j[i]]).abs()))
        a, b = theirs.masks[i], ours.masks[j[i]]
        union = float((a | b).sum())
        out["mask_ious"].append(float((a & b).sum()) / union if union else 1.0)  # two empty masks agree
    return out


def summarise(rows: list[dict]) -> dict:
    theirs = sum(r["theirs"] for r in rows)
    matched = sum(r["matched"] for r in rows)
    ious = [v for r in rows for v in r["mask_ious"]]
    return {
        "matched": f"{matched} / {theirs} ({100.0 * matched / max(theirs, 1):.1f} %)",
        "max_score_error": max((r["max_score_error"] for r in rows), default=0.0),
        "mean_mask_iou": sum(ious) / len(ious) if ious else float("nan"),
        "identical": all(r["identical"] for r in rows),
    }


def run_case(model, path, images) -> dict:
    predictor = Predictor(path, device="cpu")
    single = [compare(predictor.run([im])[0], mmdet_batch_predict(model, [im])[0]) for im in images]
    # one padded batch on both sides (the preset's default, batch_padding="by_size", pads each image alone)
    predictor = Predictor(path, device="cpu", config=predictor.config.replace(batch_padding="together"))
    batched = [compare(o, t) for o, t in zip(predictor.run(images), mmdet_batch_predict(model, images))]
    return {"one image per call": summarise(single), "one batch": summarise(batched)}


def mmdet_batch_predict(model, images):
    data = mmdet_batch(model, images)
    with torch.no_grad():
        return [s.pred_instances for s in model.predict(data["inputs"], data["data_samples"])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=list(ZOO_CONFIGS))
    parser.add_argument("--images", nargs="*", default=["astronaut", "coffee"])
    args = parser.parse_args(argv)
    images = photographs(tuple(args.images))
    print(f"| config | objectness | calls | matched (label, IoU >= 0.99) | max score error | mean mask IoU | bit-identical |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            for scale, kind in ((0.2, "realistic"), (1.0, "saturated")):
                start = time.perf_counter()
                cfg, model = build_model(name, rpn_scale=scale)
                files = [(name, os.path.join(tmp, f"{name}-{scale}.pth"))]
                save_checkpoint(cfg, model, files[0][1])
                if name == ZOO_CONFIGS[0]:
                    files.append((f"{name} (2.x file)", os.path.join(tmp, f"{name}-{scale}-2x.pth")))
                    save_checkpoint_2x(model, files[1][1], caffe=False)
                for label, path in files:
                    for calls, s in run_case(model, path, images).items():
                        print(
                            f"| {label} | {kind} | {calls} | {s['matched']} | {s['max_score_error']:.1e} | "
                            f"{s['mean_mask_iou']:.4f} | {'yes' if s['identical'] else 'no'} |",
                            flush=True,
                        )
                print(f"<!-- {name} {kind}: {time.perf_counter() - start:.0f} s -->", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
