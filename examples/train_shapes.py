"""Train the bundled shapes model with torchvision's Mask R-CNN (used only to produce the checkpoint).

    python examples/train_shapes.py --iterations 2800 --threads 2 --output weights/data

The project is predict-only; this script exists so that the bundled checkpoint can be rebuilt.
It needs torchvision, which the engine itself never imports, so it lives with the other scripts.
It trains torchvision's ``MaskRCNN`` on an endless stream of images from :mod:`weights.shapes`
(seed ``TRAIN_SEED``; image ``k`` of iteration ``i`` is index ``i * batch + k``), from random
initialisation (no pretrained weights can be downloaded where this project is built):

- backbone: ResNet-18 (BasicBlock) with trainable ``nn.BatchNorm2d``, FPN of 128 channels on C2..C5
  plus max-pooled P6;
- RPN: torchvision's, 3 anchors per location, sizes 32..512;
- box head: two FC layers of 512; mask head: four 3x3 convs of 128 and a 2x deconvolution;
- images resized so the short side is ``MIN_SIZE`` (long side at most ``MAX_SIZE``).

The result is saved as a plain torchvision state dict in float16 (``num_batches_tracked`` kept,
so loaders see trainable batch norm with eps 1e-5); loaders upcast to float32. Beside it, a JSON
file records the sha256, class names, the resize sizes and how training went.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from weights.shapes import CLASS_NAMES, DEFAULT_SPEC, TRAIN_SEED, generate  # noqa: E402

FPN_CHANNELS = 128
REPRESENTATION_SIZE = 512
MASK_CHANNELS = 128
MIN_SIZE = 320
MAX_SIZE = 480


def build_torchvision_model(*, num_classes: int = len(CLASS_NAMES), norm_layer=nn.BatchNorm2d) -> MaskRCNN:
    """torchvision ``MaskRCNN`` with the bundled model's architecture, randomly initialised.

    ``norm_layer`` is the backbone's batch norm (``nn.BatchNorm2d`` to train and to load the bundled file).
    """
    body = torchvision.models.resnet18(weights=None, norm_layer=norm_layer)
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[64, 128, 256, 512],
        out_channels=FPN_CHANNELS,
        extra_blocks=LastLevelMaxPool(),
    )
    pool = 7
    return MaskRCNN(
        backbone,
        num_classes=None,
        min_size=MIN_SIZE,
        max_size=MAX_SIZE,
        box_head=TwoMLPHead(FPN_CHANNELS * pool * pool, REPRESENTATION_SIZE),
        box_predictor=FastRCNNPredictor(REPRESENTATION_SIZE, num_classes),
        mask_head=MaskRCNNHeads(FPN_CHANNELS, [MASK_CHANNELS] * 4, 1),
        mask_predictor=MaskRCNNPredictor(MASK_CHANNELS, MASK_CHANNELS, num_classes),
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=500,
        rpn_batch_size_per_image=256,
        box_batch_size_per_image=128,
    )


def training_batch(iteration: int, batch: int) -> tuple[list[torch.Tensor], list[dict]]:
    images, targets = [], []
    for k in range(batch):
        sample = generate(TRAIN_SEED, iteration * batch + k, DEFAULT_SPEC)
        images.append(torch.from_numpy(sample.image).permute(2, 0, 1).float().div_(255))
        targets.append(
            {
                "boxes": torch.from_numpy(sample.boxes).reshape(-1, 4),
                "labels": torch.from_numpy(sample.labels),
                "masks": torch.from_numpy(sample.masks.astype("uint8")),
            }
        )
    return images, targets


def learning_rate(iteration: int, *, base: float, total: int, warmup: int) -> float:
    """Linear warm-up from base/50, then cosine decay to base/100."""
    if iteration < warmup:
        return base * (0.02 + 0.98 * iteration / warmup)
    t = (iteration - warmup) / max(total - warmup, 1)
    return base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))


def save_fp16(model: nn.Module, path: Path) -> str:
    """Write the state dict with floating tensors in float16; returns the file's sha256."""
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save(state, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=Path("weights/data"))
    parser.add_argument("--resume", type=Path, default=None, help="a training state written by this script")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.output.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    model = build_torchvision_model().to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, momentum=0.9
    )
    start = 0
    state_path = args.output / "training_state.pt"
    if args.resume:
        saved = torch.load(args.resume, map_location=device)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        start = saved["iteration"]
    log = []
    began = time.perf_counter()
    smoothed: dict[str, float] = {}
    for iteration in range(start, args.iterations):
        lr = learning_rate(iteration, base=args.lr, total=args.iterations, warmup=args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, targets = training_batch(iteration, args.batch)
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss is {total.item()} at iteration {iteration}: {losses}")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        for k, v in losses.items():
            value = float(v.detach())
            smoothed[k] = 0.95 * smoothed.get(k, value) + 0.05 * value
        if (iteration + 1) % 50 == 0 or iteration + 1 == args.iterations:
            elapsed = time.perf_counter() - began
            entry = {"iteration": iteration + 1, "lr": lr, "seconds": round(elapsed, 1)}
            entry.update({k: round(v, 4) for k, v in smoothed.items()})
            log.append(entry)
            print(json.dumps(entry), flush=True)
        if (iteration + 1) % 250 == 0:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration + 1}, state_path)
    seconds = time.perf_counter() - began
    checkpoint = args.output / "shapes_r18_fpn.pth"
    sha256 = save_fp16(model, checkpoint)
    record = {
        "file": checkpoint.name,
        "sha256": sha256,
        "class_names": list(CLASS_NAMES),
        "min_size": MIN_SIZE,
        "max_size": MAX_SIZE,
        "training": {
            "command": f"python examples/train_shapes.py --iterations {args.iterations} --batch {args.batch} --lr {args.lr}",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "iterations": args.iterations,
            "batch": args.batch,
            "images_seen": args.iterations * args.batch,
            "seed": TRAIN_SEED,
            "seconds": round(seconds, 1),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "final_losses": {k: round(v, 4) for k, v in smoothed.items()},
        },
    }
    (args.output / "shapes_r18_fpn.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.output / "training_log.json").write_text(json.dumps(log) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
