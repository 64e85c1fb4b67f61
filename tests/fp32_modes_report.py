"""How far the opt-in fp32 speed modes move the torchvision parity cases (a script, not a test).

For each checkpoint of ``tests/test_parity_torchvision.py`` (COCO-like R50 at 800, fine-tuned,
v2, ResNeXt-50, ResNet-101), torchvision's own output is the oracle, and the engine runs in five
fp32 modes: the default (NCHW, norms as torchvision computes them), ``cpu_memory_format=
"channels_last"``, ``fold_batch_norms=True``, both, and ``Predictor(cpu_compile=True)`` (its
compile happens in the untimed warm run). Per case and mode: whether the parity
test's contract holds (``assert_detections_match``: same label, box IoU >= 0.99, score within
1e-4, mask IoU >= 0.99, nothing extra), the largest score difference of a matched detection,
and the seconds of one warm ``Predictor.run`` of the three photographs.

    python tests/fp32_modes_report.py [--cases coco_like resnet101] [--modes cpu_compile] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import torch  # noqa: E402

from agreement import box_iou  # noqa: E402
from checkpoints import legacy_state_dict, make_torchvision_maskrcnn, photographs, to_torchvision_input  # noqa: E402
from engine import Predictor  # noqa: E402
from engine.loading import checkpoint_config  # noqa: E402
from test_parity_torchvision import assert_detections_match  # noqa: E402
from weights import load_checkpoint  # noqa: E402

#: the fixtures of tests/test_parity_torchvision.py, as keyword arguments of make_torchvision_maskrcnn
CASES = {
    "coco_like": dict(num_classes=91, frozen_bn=True, min_size=800, max_size=1333, legacy_keys=True),
    "fine_tuned": dict(num_classes=7, frozen_bn=False, min_size=480, max_size=800),
    "v2": dict(num_classes=91, frozen_bn=False, min_size=480, max_size=800, variant="v2"),
    "resnext": dict(num_classes=11, frozen_bn=True, min_size=320, max_size=533, backbone="resnext50_32x4d"),
    "resnet101": dict(num_classes=91, frozen_bn=True, min_size=320, max_size=533, backbone="resnet101"),
}
#: per mode: (configuration changes, Predictor keyword arguments)
MODES = {
    "default (NCHW)": ({}, {}),
    "channels_last": ({"cpu_memory_format": "channels_last"}, {}),
    "fold_batch_norms": ({"fold_batch_norms": True}, {}),
    "channels_last + fold_batch_norms": ({"cpu_memory_format": "channels_last", "fold_batch_norms": True}, {}),
    "cpu_compile": ({}, {"cpu_compile": True}),
}


def largest_score_difference(reference: dict, ours) -> float:
    """Over torchvision's detections with a same-label counterpart at box IoU >= 0.99."""
    if len(reference["boxes"]) == 0 or len(ours) == 0:
        return 0.0
    iou = box_iou(reference["boxes"], ours.boxes)
    iou = torch.where(reference["labels"][:, None] == ours.labels[None, :], iou, torch.full_like(iou, -1.0))
    best, j = iou.max(1)
    matched = best >= 0.99
    return float((reference["scores"][matched] - ours.scores[j[matched]]).abs().max()) if matched.any() else float("nan")


def report_case(name: str, spec: dict, images, folder: str, modes=tuple(MODES)) -> list[dict]:
    spec = dict(spec)
    legacy = spec.pop("legacy_keys", False)
    tv = make_torchvision_maskrcnn(**spec)
    state = tv.state_dict()
    path = os.path.join(folder, f"{name}.pth")
    torch.save(legacy_state_dict(state) if legacy else state, path)
    with torch.inference_mode():
        reference = tv([to_torchvision_input(im) for im in images])
    config = checkpoint_config(load_checkpoint(path)).replace(min_size=spec["min_size"], max_size=spec["max_size"])
    rows = []
    for mode in modes:
        changes, options = MODES[mode]
        predictor = Predictor(path, device="cpu", config=config.replace(**changes), **options)
        predictor.run(images)  # warm
        start = time.perf_counter()
        ours = predictor.run(images)
        seconds = time.perf_counter() - start
        failure = None
        for ref, det in zip(reference, ours):
            try:
                assert_detections_match(ref, det)
            except AssertionError as e:
                failure = (str(e).splitlines() or ["a score differs by 1e-4 or more"])[0]
                break
        rows.append({
            "case": name, "mode": mode, "seconds": seconds, "passes": failure is None, "failure": failure,
            "max_score_difference": max(largest_score_difference(r, d) for r, d in zip(reference, ours)),
        })
        print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| case | mode | parity contract | largest score difference | s per run |", "|---|---|---|---|---|"]
    for r in rows:
        verdict = "holds" if r["passes"] else f"fails: {r['failure']}"
        lines.append(f"| {r['case']} | {r['mode']} | {verdict} | {r['max_score_difference']:.2g} | {r['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--markdown", help="write the table here")
    args = ap.parse_args(argv)
    images = photographs()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.cases:
            rows += report_case(name, CASES[name], images, folder, args.modes)
    text = markdown(rows)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return rows


if __name__ == "__main__":
    main()
