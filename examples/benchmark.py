"""Benchmark against torchvision, measured in one run on one device.

    python examples/benchmark.py --device cuda --json bench.json --markdown bench.md
    python examples/benchmark.py --smoke            # tiny sizes on CPU: checks the script runs

Same weights for everyone: torchvision's ``maskrcnn_resnet50_fpn`` layout with random weights
and calibrated, perturbed batch-norm statistics (``tests/checkpoints.py``), and the same real
photographs from scikit-image. Reported:

- end to end, uint8 HxWx3 host arrays -> boolean masks on the device, for each batch size:
  torchvision fp32 eager, this engine fp32, this engine in the fast mode (bf16): median and spread
  (25th-75th percentile) of images/s, ratios against torchvision, peak device memory, and the fast
  mode's agreement with torchvision (detections matched with the same label and box IoU >= 0.95,
  mean mask IoU of the matches);
- the profile (``--sections profile``): the stages of ``Predictor.run`` (pre-processing,
  backbone+FPN, RPN, box head + detection, mask head, paste) for each family preset and precision,
  and the share of time after backbone+FPN;
- the peers (``--sections peers``): torchvision, and mmdetection where installed (one image per
  ``inference_detector`` call), each on its own checkpoint file, against the engine loaded from
  that same file (fp32; on the CPU fp32 without ``reuse_host_memory`` and fp32 channels-last; the
  fast mode), in alternating rounds;
- scaling (``--sections scaling``): the engine's time against the batch size, the image size, the
  torch threads (CPU), and a mixed batch run as one padded batch, one batch per padded size, or
  one image per call;
- kernels against their baselines: multi-level RoIAlign vs torchvision's MultiScaleRoIAlign, paste
  vs torchvision's paste_masks_in_image and vs a grid_sample paste (as Detectron2 pastes), NMS vs
  torchvision.ops.batched_nms;
- the ``maskrcnn-engine predict`` job (``--sections job``; the bundled shapes model over generated
  shape images written as PNG files): images/s in-process and on a local Ray cluster with 1 and 2
  predictor actors (Ray's start-up kept apart; each run's actor start reported separately),
  against a plain loop of ``Predictor.run`` over the same files (decode, run, nothing written),
  and the in-process job's time by step (decoding, waiting for it, predicting, encoding the RLEs
  and rows, writing);
- the server (``--sections serve``): ``maskrcnn-engine serve`` started on localhost and driven by
  a bounded asyncio client (each image posted once, 1, 4, 16 and 64 at a time), one-size and
  mixed-size images, with batching and with it off, against a plain ``Predictor.run`` loop at its
  best batch size: images/s, p50/p90/p99 latency, mean batch size, errors, peak server memory;
- one large image (``--sections large_image``, 8000x6000 by default): the growth of the process's
  peak resident memory (and the CUDA peak) over one ``run()`` of the bundled model, with full and
  with box masks, each in a fresh process (Linux: read from /proc).

    python examples/benchmark.py --sections job --device cpu --markdown job.md
    python examples/benchmark.py --sections peers scaling --device cpu --warmup 1 --repeats 3 --markdown cpu.md

Every timing warms up first (compilation and autotuning stay out of the figures) and synchronises
the device before reading the clock. torchvision and scikit-image are needed (the test extra).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from agreement import box_iou  # noqa: E402  (tests/, on the path above)
from engine import Predictor  # noqa: E402
from engine import host_memory  # noqa: E402
from engine.model import cpu_has_fast_kernels  # noqa: E402
from engine.predictor import STAGES, padded_size_groups  # noqa: E402
from kernels.nms import batched_nms  # noqa: E402
from kernels.paste_masks import paste_masks  # noqa: E402
from kernels.roi_align import LevelRule, multilevel_roi_align  # noqa: E402

SECTIONS = ("end_to_end", "profile", "peers", "scaling", "kernels", "job", "large_image", "serve")
PEER_NAMES = ("torchvision", "mmdetection")
PROFILE_PRESETS = (
    "torchvision_maskrcnn_resnet50_fpn",
    "detectron2_mask_rcnn_R_50_FPN",
    "mmdet_mask_rcnn_r50_fpn",
    "matterport_mask_rcnn_fpn",
)
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


# --- timing -------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, *, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call, after ``warmup`` untimed calls; the device is synchronised around each call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float], *, items: int = 1) -> dict:
    """Median and quartiles of per-call seconds, and the matching items per second."""
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {
        "median_s": statistics.median(times),
        "p25_s": q[0],
        "p75_s": q[2],
        "items_per_s": items / statistics.median(times),
        "items_per_s_p25": items / q[2],
        "items_per_s_p75": items / q[0],
        "repeats": len(times),
    }


def peak_memory(fn, device: torch.device) -> int | None:
    """Peak device memory (bytes) allocated while ``fn`` runs, or None off CUDA."""
    if device.type != "cuda":
        fn()
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


# --- the predict job -----------------------------------------------------------------------------


def shape_image_files(folder: Path, count: int) -> list[Path]:
    """``count`` generated shape images (mixed sizes) as PNG files in ``folder``."""
    import cv2

    from weights.shapes import HELD_OUT_SEED, generate

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"shape_{i:05d}.png"
        cv2.imwrite(str(path), np.ascontiguousarray(generate(HELD_OUT_SEED, i).image[:, :, ::-1]))
        paths.append(path)
    return paths


def _median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def bench_job(args, device) -> dict:
    """The predict job against a plain ``Predictor.run`` loop; see the module docstring."""
    import shutil
    import tempfile

    from engine.batch_job import JobOptions, collect_inputs, decode_image, run_job
    from engine.bundled import shapes_model, shapes_predictor

    names = list(shapes_model().class_names)
    work = Path(tempfile.mkdtemp(prefix="bench-job-"))
    try:
        files = shape_image_files(work / "images", args.job_images)
        inputs = collect_inputs([str(work / "images")])
        predictor = shapes_predictor(device=str(device))
        batch = args.job_batch

        def plain_loop():
            for start in range(0, len(files), batch):
                predictor.run([decode_image(f) for f in files[start : start + batch]])

        def job(out: Path) -> dict:
            shutil.rmtree(out, ignore_errors=True)
            options = JobOptions(batch_size=batch, window=args.job_window, progress=False)
            summary = run_job(predictor, inputs, out, options=options, class_names=names)
            return {"seconds": summary.seconds, "timings": summary.timings}

        plain = summary(measure(plain_loop, device=device, warmup=args.warmup_job, repeats=args.repeats_job), items=len(files))
        for _ in range(args.warmup_job):
            job(work / "out")
        runs = [job(work / "out") for _ in range(args.repeats_job)]
        in_process = summary([r["seconds"] for r in runs], items=len(files))
        median = _median_run(runs)
        in_process["share_of_wall"] = {k: v / median["seconds"] for k, v in median["timings"].items()}
        report = {
            "images": len(files),
            "batch": batch,
            "window": args.job_window,
            "torch_threads": torch.get_num_threads(),
            "plain_loop": plain,
            "in_process": in_process,
            "ray": bench_job_on_ray(args, device, inputs, work, names, plain["items_per_s"]),
        }
        in_process["ratio_vs_plain_loop"] = in_process["items_per_s"] / plain["items_per_s"]
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_job_on_ray(args, device, inputs, work: Path, names, plain_items_per_s: float) -> list[dict] | str:
    """``run_ray_job`` with each actor count: images/s of the whole run (the actors start in each
    run, a model load each), the fixed cost of a run (a run of one image: Ray's workers start,
    import the engine and build their model), and images/s past that fixed cost
    (``images / (run - fixed cost)``)."""
    import shutil

    if not args.job_ray_workers:
        return "skipped: no Ray actor counts given"
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        return "skipped: Ray Data is not installed (pip install -e '.[ray]')"
    from engine.ray_job import PredictorSpec, run_ray_job

    started_here = not ray.is_initialized()
    start = time.perf_counter()
    if started_here:
        ray.init(num_cpus=args.job_ray_cpus, log_to_driver=False, include_dashboard=False)
    ray_start = time.perf_counter() - start
    rows = []
    try:
        def ray_run(workers: int, files, out: Path) -> float:
            shutil.rmtree(out, ignore_errors=True)
            run = run_ray_job(
                PredictorSpec(device=str(device)), files, out, workers=workers, batch_size=args.job_batch,
                window=args.job_window, class_names=names,
            )
            return run.seconds

        for workers in args.job_ray_workers:
            for _ in range(args.warmup_job):
                ray_run(workers, inputs, work / "ray")
            times = [ray_run(workers, inputs, work / "ray") for _ in range(args.repeats_job)]
            fixed = statistics.median(ray_run(workers, inputs[:1], work / "ray-one") for _ in range(args.repeats_job))
            whole = summary(times, items=len(inputs))
            rows.append(
                {
                    "workers": workers,
                    **whole,
                    "fixed_cost_s": fixed,
                    "items_per_s_past_fixed_cost": len(inputs) / max(whole["median_s"] - fixed, 1e-9),
                    "ratio_vs_plain_loop": whole["items_per_s"] / plain_items_per_s,
                }
            )
    finally:
        if started_here:
            ray.shutdown()
    return {"ray_start_s": ray_start, "cpus": args.job_ray_cpus, "runs": rows}


# --- inputs -------------------------------------------------------------------------------------


def photographs(count: int, *, scale: float = 1.0) -> list[np.ndarray]:
    from checkpoints import photographs as load

    images = load(PHOTO_NAMES)
    if scale != 1.0:
        import cv2

        images = [cv2.resize(im, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) for im in images]
    return [images[i % len(images)] for i in range(count)]


def agreement(reference: list[dict], ours: list, *, box_iou_min: float = 0.95) -> dict:
    """Share of the reference's detections matched by ours (same label, box IoU >= 0.95), and mean mask IoU.

    ``reference``: per image a dict of ``boxes`` [N, 4], ``labels`` [N] and ``masks_bool`` [N, H, W]
    (a peer's detections in the image's frame)."""
    matched, total, mask_ious = 0, 0, []
    for ref, det in zip(reference, ours):
        total += len(ref["boxes"])
        if len(ref["boxes"]) == 0 or len(det) == 0:
            continue
        ious = box_iou(ref["boxes"].float().cpu(), det.boxes.float().cpu())
        ious[ref["labels"].cpu()[:, None] != det.labels.cpu()[None, :]] = -1
        used = set()
        ref_masks = ref["masks_bool"].cpu()
        det_masks = det.masks.cpu() if isinstance(det.masks, torch.Tensor) else det.masks.to_full().cpu()
        for i in range(len(ref["boxes"])):
            order = torch.argsort(ious[i], descending=True).tolist()
            j = next((j for j in order if j not in used), None)
            if j is None or ious[i, j] < box_iou_min:
                continue
            used.add(j)
            matched += 1
            union = (ref_masks[i] | det_masks[j]).sum().item()
            mask_ious.append(1.0 if union == 0 else (ref_masks[i] & det_masks[j]).sum().item() / union)
    return {
        "matched_fraction": matched / total if total else 1.0,
        "mean_mask_iou": float(np.mean(mask_ious)) if mask_ious else None,  # None: nothing matched
        "reference_detections": total,
    }


# --- benchmarks ---------------------------------------------------------------------------------


def torchvision_end_to_end(model, images, device):
    def run():
        with torch.inference_mode():
            tensors = [torch.from_numpy(im).to(device).permute(2, 0, 1).float() / 255 for im in images]
            out = model(tensors)
            return [dict(o, masks_bool=o["masks"][:, 0] > 0.5) for o in out]

    return run


def bench_end_to_end(args, tv_model, state, device) -> list[dict]:
    rows = []
    predictors = {
        "engine fp32": Predictor(state, device=device, config=args.config),
        f"engine {args.fast_precision}": Predictor(state, device=device, config=args.config, precision=args.fast_precision),
    }
    for batch in args.batch_sizes:
        images = photographs(batch, scale=args.image_scale)
        tv_run = torchvision_end_to_end(tv_model, images, device)
        reference = tv_run()
        entries = {"torchvision fp32": tv_run}
        entries.update({name: (lambda p=p: p.run(images)) for name, p in predictors.items()})
        results = {}
        for name, fn in entries.items():
            times = measure(fn, device=device, warmup=args.warmup, repeats=args.repeats)
            results[name] = summary(times, items=batch)
            results[name]["peak_memory_bytes"] = peak_memory(fn, device)
        base = results["torchvision fp32"]["items_per_s"]
        for name, res in results.items():
            res["ratio_vs_torchvision"] = res["items_per_s"] / base
            if name.startswith("engine"):
                res["agreement"] = agreement(reference, predictors[name].run(images))
            rows.append({"batch": batch, "system": name, **res})
    return rows


def bench_stages(args, state, device, *, precision: str | None = None, config=None) -> dict:
    """Median seconds per stage of ``Predictor.run`` on ``args.stage_batch`` photographs, in
    ``precision`` (default: the fast one) under ``config`` (default: the checkpoint's preset)."""
    precision = precision or args.fast_precision
    predictor = Predictor(state, device=device, config=config or args.config, precision=precision)
    images = photographs(args.stage_batch, scale=args.image_scale)
    timings = {name: [] for name in STAGES}

    def once(record: bool):
        _, seconds = predictor.profile_stages(images)
        if record:
            for name, value in seconds.items():
                timings[name].append(value)

    for _ in range(args.warmup):
        once(False)
    for _ in range(args.repeats):
        synchronize(device)
        once(True)
    medians = {name: statistics.median(t) for name, t in timings.items()}
    total = sum(medians.values())
    after_backbone = total - medians["preprocess"] - medians["backbone+fpn"]
    return {
        "precision": precision,
        "preset": predictor.config.name,
        "batch": args.stage_batch,
        "median_s": medians,
        "share": {k: v / total for k, v in medians.items()},
        "share_after_backbone": after_backbone / total,
    }


def bench_profile(args, state, device) -> list[dict]:
    """The stage profile for each family preset and precision, on the same torchvision-layout
    weights: each preset brings its family's pre- and post-processing (resize, RoIAlign rule,
    NMS order, paste), the network costs the same. bf16 on a CPU without oneDNN bf16 kernels
    (AVX512-BF16 or AMX) is reported as skipped."""
    from engine.config import get_preset

    rows = []
    for name in args.profile_presets:
        config = get_preset(name)
        if args.config is not None:  # --smoke: the small sizes
            config = config.replace(min_size=args.config.min_size, max_size=args.config.max_size)
        for precision in args.profile_precisions:
            if precision == "bf16" and device.type == "cpu" and not cpu_has_fast_kernels("bf16"):
                rows.append({"preset": name, "precision": precision, "skipped": "no oneDNN bf16 kernels on this CPU"})
                continue
            rows.append(bench_stages(args, state, device, precision=precision, config=config))
    return rows


def profile_markdown(rows: list[dict], threads: int | None = None) -> list[str]:
    """The rows of :func:`bench_profile` (or single :func:`bench_stages` results) as one table."""
    stages = next((list(r["median_s"]) for r in rows if "median_s" in r), [])
    on_threads = "" if threads is None else f", {threads} torch threads"
    lines = [
        f"Stages of `Predictor.run` by family preset (torchvision-layout weights{on_threads}), median ms:",
        "",
        "| preset | precision | batch | " + " | ".join(stages) + " | total ms | after backbone+FPN |",
        "|---|---|---|" + "---|" * (len(stages) + 2),
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['preset']} | {r['precision']} | | skipped: {r['skipped']} |")
            continue
        cells = " | ".join(f"{r['median_s'][k] * 1e3:.0f} ({r['share'][k]:.0%})" for k in stages)
        total = sum(r["median_s"].values())
        lines.append(f"| {r['preset']} | {r['precision']} | {r['batch']} | {cells} | {total * 1e3:.0f} | {r['share_after_backbone']:.0%} |")
    return lines


# --- peers side by side, and scaling --------------------------------------------------------------


def _interleaved(systems: dict, *, device, warmup: int, repeats: int) -> dict:
    """Seconds per call of each system, measured in alternating rounds (every system once per
    round, after ``warmup`` untimed rounds), so that a slow drift of the machine hits all alike."""
    for _ in range(warmup):
        for fn in systems.values():
            fn()
    times = {name: [] for name in systems}
    for _ in range(repeats):
        for name, fn in systems.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def _torchvision_peer(args, device, work: Path, images):
    """torchvision's ``maskrcnn_resnet50_fpn`` on its own saved state dict; the batch in one call."""
    from checkpoints import make_torchvision_maskrcnn

    size = {} if args.config is None else {"min_size": args.config.min_size, "max_size": args.config.max_size}
    model = make_torchvision_maskrcnn(**size).to(device).eval()
    path = work / "torchvision_maskrcnn_resnet50_fpn.pth"
    torch.save(model.state_dict(), path)
    return "torchvision 0.29 maskrcnn_resnet50_fpn, the batch in one call", path, torchvision_end_to_end(model, images, device)


def _mmdetection_peer(args, device, work: Path, images):
    """mmdetection 3.3's ``mask-rcnn_r50_fpn_1x_coco`` on its own checkpoint file, one image per
    ``inference_detector`` call (how its API runs a list of arrays)."""
    from mmdet.apis import inference_detector
    from mmdet_models import bgr, build_model, save_checkpoint

    cfg, model = build_model("mask-rcnn_r50_fpn_1x_coco")
    if args.config is not None:  # --smoke: the small sizes, for mmdetection's own pipeline too
        for step in model.cfg.test_dataloader.dataset.pipeline:
            if step.get("type") == "Resize":
                step["scale"] = (args.config.max_size, args.config.min_size)
    model = model.to(device)
    path = work / "mmdet_mask-rcnn_r50_fpn_1x_coco.pth"
    save_checkpoint(cfg, model, path)

    def run():
        with torch.no_grad():
            outs = [inference_detector(model, bgr(im)).pred_instances for im in images]
        return [{"boxes": o.bboxes, "labels": o.labels, "scores": o.scores, "masks_bool": o.masks} for o in outs]

    return "mmdetection 3.3 mask-rcnn_r50_fpn_1x_coco, one image per call", path, run


PEERS = {"torchvision": _torchvision_peer, "mmdetection": _mmdetection_peer}


def _engine_variants(path: Path, device, args) -> dict:
    """The engine on a peer's file: fp32 as loaded (the parity default), on the CPU fp32 with the
    process's malloc settings untouched (``reuse_host_memory=False``, where glibc) and the opt-in fp32
    speed modes (channels-last, and channels-last with the norms folded), and the fast mode where
    it has fast kernels."""
    loaded = Predictor(path, device=device)
    config = loaded.config
    if args.config is not None:
        config = config.replace(min_size=args.config.min_size, max_size=args.config.max_size)
    variants = {"engine fp32": Predictor(path, device=device, config=config)}
    if device.type == "cpu":
        if host_memory.available():  # what the allocator setting alone gives, in the same rounds
            variants["engine fp32, reuse_host_memory=False"] = Predictor(path, device=device, config=config, reuse_host_memory=False)
        fast_layout = config.replace(cpu_memory_format="channels_last")
        variants["engine fp32, channels_last"] = Predictor(path, device=device, config=fast_layout)
        variants["engine fp32, channels_last + folded"] = Predictor(path, device=device, config=fast_layout.replace(fold_batch_norms=True))
        if args.cpu_compile:
            variants["engine fp32, cpu_compile"] = Predictor(path, device=device, config=config, cpu_compile=True)
    if device.type == "cuda" or cpu_has_fast_kernels("bf16"):
        variants[f"engine {args.fast_precision}"] = Predictor(path, device=device, config=config, precision=args.fast_precision)
    return variants


def bench_peers(args, device) -> list[dict]:
    """Each installed peer framework against the engine loaded from that peer's own checkpoint
    file, on the same ``args.peer_batch`` photographs, timed in alternating rounds: median seconds
    per batch, the ratio of speeds (engine / peer), and the agreement with the peer's detections."""
    import importlib.util
    import tempfile

    rows = []
    images = photographs(args.peer_batch, scale=args.image_scale)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.peers:
            if name == "mmdetection" and importlib.util.find_spec("mmdet") is None:
                rows.append({"peer": name, "skipped": "mmdetection is not installed (see .ci/run for its wheels)"})
                continue
            described, path, peer_run = PEERS[name](args, device, Path(tmp), images)
            engines = _engine_variants(path, device, args)
            first_runs = {}  # the compiled variant's first run, compile included: kept out of the medians
            for system, predictor in engines.items():
                if predictor.cpu_compile:
                    start = time.perf_counter()
                    predictor.run(images)
                    first_runs[system] = time.perf_counter() - start
            systems = {f"{name} fp32": peer_run, **{k: (lambda p=p: p.run(images)) for k, p in engines.items()}}
            times = _interleaved(systems, device=device, warmup=args.warmup, repeats=args.repeats)
            reference = peer_run()
            base = statistics.median(times[f"{name} fp32"])
            for system, seconds in times.items():
                row = {"peer": name, "peer_setup": described, "system": system, "batch": len(images), **summary(seconds, items=len(images))}
                row["speed_vs_peer"] = base / row["median_s"]
                if system in engines:
                    row["agreement"] = agreement(reference, engines[system].run(images))
                if system in first_runs:
                    row["first_run_s"] = first_runs[system]
                rows.append(row)
    return rows


def _agreement_cells(agree: dict | None) -> tuple[str, str]:
    """The "matched" and "mask IoU" cells of a row's :func:`agreement` ("-" where there is none)."""
    if not agree:
        return "-", "-"
    mask_iou = agree["mean_mask_iou"]
    return f"{agree['matched_fraction']:.3f}", "-" if mask_iou is None else f"{mask_iou:.3f}"


def peers_markdown(rows: list[dict]) -> list[str]:
    lines = [
        "Peers side by side, each on its own checkpoint (engine loaded from the same file), the same photographs, alternating rounds:",
        "",
        "| peer | system | batch | s per batch (median) | p25-p75 | speed vs peer | matched | mask IoU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['peer']} | skipped: {r['skipped']} | | | | | | |")
            continue
        matched, mask_iou = _agreement_cells(r.get("agreement"))
        lines.append(
            f"| {r['peer']} | {r['system']} | {r['batch']} | {r['median_s']:.2f} | {r['p25_s']:.2f}-{r['p75_s']:.2f} "
            f"| {r['speed_vs_peer']:.2f}x | {matched} | {mask_iou} |"
        )
    for r in rows:
        if "first_run_s" in r:
            lines.append(f"\n{r['peer']}, {r['system']}: the first run, compile included (apart from the medians), took {r['first_run_s']:.1f} s.")
    return lines


def _padded_fraction(predictor, images) -> float:
    """Share of the padded batch's pixels that no image covers."""
    batch = predictor.preprocess(images)
    h, w = batch.tensor.shape[-2:]
    return 1.0 - sum(ih * iw for ih, iw in batch.image_sizes) / (len(images) * h * w)


def bench_scaling(args, state, device) -> dict:
    """How the engine's time grows with the batch size, with the image size (the preset's
    min_size / max_size scaled together), with the torch threads on the CPU, and what a mixed
    batch pays for padding every image to the largest (one padded batch, against one batch per
    padded size, against one image per call). torchvision-layout weights, median seconds."""
    from engine.config import TORCHVISION_MASKRCNN_R50_FPN

    base = args.config or TORCHVISION_MASKRCNN_R50_FPN
    precisions = ["fp32"] + ([args.fast_precision] if device.type == "cuda" or cpu_has_fast_kernels("bf16") else [])
    out = {"batch": [], "size": [], "threads": [], "padding": []}

    def timed(fn):
        return summary(measure(fn, device=device, warmup=args.warmup, repeats=args.repeats))

    for precision in precisions:
        predictor = Predictor(state, device=device, config=base, precision=precision)
        for batch in args.scaling_batches:
            images = photographs(batch, scale=args.image_scale)
            res = timed(lambda: predictor.run(images))
            out["batch"].append({"precision": precision, "batch": batch, "median_s": res["median_s"], "images_per_s": batch / res["median_s"]})
        images = photographs(args.peer_batch, scale=args.image_scale)
        for min_size in args.scaling_sizes:
            config = base.replace(min_size=min_size, max_size=round(min_size * base.max_size / base.min_size))
            sized = Predictor(state, device=device, config=config, precision=precision)
            res = timed(lambda: sized.run(images))
            out["size"].append({"precision": precision, "min_size": config.min_size, "max_size": config.max_size,
                                "batch": len(images), "median_s": res["median_s"], "images_per_s": len(images) / res["median_s"]})
        buckets = padded_size_groups(images, predictor.config)
        ways = {
            "one padded batch": lambda: predictor.run(images),
            f"one batch per padded size ({len(buckets)})": lambda: [predictor.run([images[i] for i in b]) for b in buckets],
            "one image per call": lambda: [predictor.run([im]) for im in images],
        }
        for way, fn in ways.items():
            res = timed(fn)
            out["padding"].append({"precision": precision, "way": way, "batch": len(images), "median_s": res["median_s"],
                                   "padded_fraction": _padded_fraction(predictor, images) if way == "one padded batch" else None})
    if device.type == "cpu":
        available = torch.get_num_threads()
        predictor = Predictor(state, device=device, config=base)
        images = photographs(args.peer_batch, scale=args.image_scale)
        try:
            for threads in sorted({1, available}):
                torch.set_num_threads(threads)
                res = timed(lambda: predictor.run(images))
                out["threads"].append({"precision": "fp32", "threads": threads, "batch": len(images), "median_s": res["median_s"]})
        finally:
            torch.set_num_threads(available)
    return out


def scaling_markdown(res: dict) -> list[str]:
    lines = ["Scaling of the engine (torchvision-layout weights), median seconds:", "",
             "| precision | batch | s per batch | images/s |", "|---|---|---|---|"]
    lines += [f"| {r['precision']} | {r['batch']} | {r['median_s']:.2f} | {r['images_per_s']:.2f} |" for r in res["batch"]]
    lines += ["", "| precision | min_size / max_size | batch | s per batch | images/s |", "|---|---|---|---|---|"]
    lines += [f"| {r['precision']} | {r['min_size']} / {r['max_size']} | {r['batch']} | {r['median_s']:.2f} | {r['images_per_s']:.2f} |" for r in res["size"]]
    lines += ["", "| precision | a mixed batch run as | images | s | padded pixels |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['precision']} | {r['way']} | {r['batch']} | {r['median_s']:.2f} | {'-' if r['padded_fraction'] is None else format(r['padded_fraction'], '.0%')} |"
        for r in res["padding"]
    ]
    if res["threads"]:
        lines += ["", "| precision | torch threads | batch | s per batch |", "|---|---|---|---|"]
        lines += [f"| {r['precision']} | {r['threads']} | {r['batch']} | {r['median_s']:.2f} |" for r in res["threads"]]
    return lines


def random_rois(num_images: int, per_image: int, height: int, width: int, generator) -> torch.Tensor:
    xy = torch.rand(num_images * per_image, 2, generator=generator) * torch.tensor([width * 0.9, height * 0.9])
    wh = torch.exp(torch.rand(num_images * per_image, 2, generator=generator) * 5.5) + 2  # 3 .. ~250 px
    boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([width - 1.0, height - 1.0]))], 1)
    index = torch.arange(num_images).repeat_interleave(per_image)[:, None].float()
    return torch.cat([index, boxes], 1)


def grid_sample_paste(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Paste as Detectron2 does: grid_sample every mask over the whole image at pixel centres, >= 0.5."""
    n = masks.shape[0]
    ys = torch.arange(height, device=masks.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=masks.device, dtype=torch.float32) + 0.5
    x0, y0, x1, y1 = boxes[:, 0:1], boxes[:, 1:2], boxes[:, 2:3], boxes[:, 3:4]
    gy = (ys[None, :] - y0) / (y1 - y0) * 2 - 1
    gx = (xs[None, :] - x0) / (x1 - x0) * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(n, height, width), gy[:, :, None].expand(n, height, width)], dim=3)
    return F.grid_sample(masks[:, None], grid, align_corners=False)[:, 0] >= 0.5


def bench_kernels(args, device) -> list[dict]:
    from torchvision.models.detection.roi_heads import paste_masks_in_image
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops import batched_nms as tv_batched_nms

    g = torch.Generator().manual_seed(0)
    rows = []
    b, (h, w) = args.kernel_batch, args.kernel_image
    channels = args.kernel_channels
    feats = [torch.randn(b, channels, h // 2**k, w // 2**k, generator=g).to(device) for k in range(2, 6)]
    rois = random_rois(b, args.rois_per_image, h, w, g).to(device)
    names = ["0", "1", "2", "3"]
    rule = LevelRule()
    for out in (7, 14):
        tv_pool = MultiScaleRoIAlign(names, out, 2)
        per_image = [rois[rois[:, 0] == i, 1:] for i in range(b)]
        fmap = dict(zip(names, feats))

        def baseline():
            return tv_pool(fmap, per_image, [(h, w)] * b)

        def ours():
            return multilevel_roi_align(
                feats, rois, output_size=out, spatial_scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32],
                sampling_ratio=2, aligned=False, level_rule=rule,
            )

        rows.append(kernel_row(f"RoIAlign {out}x{out}", ours, {"MultiScaleRoIAlign": baseline}, args, device))

    n, (ph, pw) = args.paste_detections, args.paste_image
    masks = torch.rand(n, 28, 28, generator=g).to(device)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([pw * 0.8, ph * 0.8])
    wh = torch.rand(n, 2, generator=g) * torch.tensor([pw * 0.5, ph * 0.5]) + 8
    boxes = torch.cat([xy, xy + wh], 1).to(device)
    rows.append(
        kernel_row(
            f"paste {n} masks into {ph}x{pw}",
            lambda: paste_masks(masks, boxes, [n], [(ph, pw)], threshold=0.5),
            {
                "torchvision paste_masks_in_image": lambda: paste_masks_in_image(masks[:, None], boxes, (ph, pw))[:, 0] > 0.5,
                "grid_sample paste": lambda: grid_sample_paste(masks, boxes, ph, pw),
            },
            args,
            device,
        )
    )

    count = args.nms_boxes
    xy = torch.rand(count, 2, generator=g) * 1000
    boxes = torch.cat([xy, xy + torch.rand(count, 2, generator=g) * 200 + 1], 1).to(device)
    scores = torch.rand(count, generator=g).to(device)
    groups = torch.randint(0, 80, (count,), generator=g).to(device)
    rows.append(
        kernel_row(
            f"NMS {count} boxes, 80 classes",
            lambda: batched_nms(boxes, scores, groups, 0.5),
            {"torchvision batched_nms": lambda: tv_batched_nms(boxes, scores, groups, 0.5)},
            args,
            device,
        )
    )
    return rows


def kernel_row(name, ours, baselines: dict, args, device) -> dict:
    row = {"kernel": name, "engine": summary(measure(ours, device=device, warmup=args.warmup, repeats=args.repeats))}
    row["engine"]["peak_memory_bytes"] = peak_memory(ours, device)
    for base_name, fn in baselines.items():
        res = summary(measure(fn, device=device, warmup=args.warmup, repeats=args.repeats))
        res["peak_memory_bytes"] = peak_memory(fn, device)
        res["speedup_of_engine"] = res["median_s"] / row["engine"]["median_s"]
        row[base_name] = res
    return row


# --- report -------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    import triton
    import torchvision

    return {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16_kernels": cpu_has_fast_kernels("bf16") if device.type == "cpu" else None,
    }


def _mib(v):
    return "-" if v is None else f"{v / 2**20:.0f}"


def job_markdown(job: dict) -> list[str]:
    plain, local = job["plain_loop"], job["in_process"]
    lines = [
        f"`maskrcnn-engine predict`, bundled shapes model, {job['images']} PNG shape images, batch {job['batch']}, "
        f"windows of {job['window']} images, torch threads {job['torch_threads']} in-process (the fixed cost of a Ray run "
        "is a run of one image):",
        "",
        "| run | images/s (median) | p25-p75 | vs plain loop | fixed cost s | images/s past it |",
        "|---|---|---|---|---|---|",
        f"| plain loop of Predictor.run (decode + run) | {plain['items_per_s']:.2f} | {plain['items_per_s_p25']:.2f}-{plain['items_per_s_p75']:.2f} | 1.00x | | |",
        f"| predict, in-process | {local['items_per_s']:.2f} | {local['items_per_s_p25']:.2f}-{local['items_per_s_p75']:.2f} "
        f"| {local['ratio_vs_plain_loop']:.2f}x | | |",
    ]
    ray = job["ray"]
    if isinstance(ray, str):
        lines.append(f"| predict --ray | {ray} | | | | |")
    else:
        for r in ray["runs"]:
            lines.append(
                f"| predict --ray, {r['workers']} CPU actor(s) of 1 thread | {r['items_per_s']:.2f} | "
                f"{r['items_per_s_p25']:.2f}-{r['items_per_s_p75']:.2f} | {r['ratio_vs_plain_loop']:.2f}x | {r['fixed_cost_s']:.1f} "
                f"| {r['items_per_s_past_fixed_cost']:.2f} |"
            )
        lines += ["", f"Ray start-up (kept out of the runs): {ray['ray_start_s']:.1f} s, {ray['cpus']} CPUs."]
    lines += ["", "In-process job, share of wall time by step (decoding runs in threads beside the rest):", "", "| step | share |", "|---|---|"]
    for step, share in local["share_of_wall"].items():
        lines.append(f"| {step} | {share:.1%} |")
    return lines


LARGE_IMAGE_FORMATS = ("full", "box")


def large_image_child(height: int, width: int, mask_format: str, device: str) -> dict:
    """In a fresh process (see :func:`bench_large_image`): one ``run()`` of the bundled model on a
    ``height x width`` photograph, and how far it raised the process's peak memory."""
    import cv2

    from engine.bundled import shapes_predictor

    def status_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    dev = torch.device(device)
    predictor = shapes_predictor(device=dev, mask_format=mask_format)
    image = cv2.resize(photographs(1)[0], (width, height), interpolation=cv2.INTER_LINEAR)
    predictor.run([image[: height // 8, : width // 8].copy()])  # kernels and weights loaded first
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    start_kib = status_kib("VmRSS")
    start = time.perf_counter()
    (result,) = predictor.run([image])
    synchronize(dev)
    seconds = time.perf_counter() - start
    masks = result.masks
    mask_bytes = masks.data.numel() if mask_format == "box" else masks.numel()
    return {
        "mask_format": mask_format,
        "image": [height, width],
        "input_bytes": int(image.nbytes),
        "detections": int(result.scores.numel()),
        "mask_bytes": int(mask_bytes),
        "rss_growth_bytes": (status_kib("VmHWM") - start_kib) * 1024,
        "cuda_peak_bytes": int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None,
        "seconds": seconds,
    }


def bench_large_image(args, device) -> list[dict] | str:
    """Peak memory of one large image, each mask format in its own fresh process (a long-lived
    process keeps freed heap memory, which would hide the growth). Linux only: the peak is read
    from /proc (VmHWM, reset through clear_refs)."""
    import os
    import subprocess

    if not os.access("/proc/self/clear_refs", os.W_OK):
        return "skipped: needs Linux's /proc/self/clear_refs"
    height, width = args.large_image
    rows = []
    for mask_format in LARGE_IMAGE_FORMATS:
        cmd = [sys.executable, __file__, "--large-image-child", mask_format, "--large-image", str(height), str(width), "--device", str(device)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def large_image_markdown(rows: list[dict] | str) -> list[str]:
    if isinstance(rows, str):
        return [f"Large image: {rows}"]
    height, width = rows[0]["image"]
    lines = [
        f"One `run()` of the bundled model on a {width}x{height} (width x height) photograph ({_mib(rows[0]['input_bytes'])} MiB as uint8), "
        "growth of the process's peak resident memory, each mask format in a fresh process:",
        "",
        "| mask_format | detections | masks returned MiB | peak RSS growth MiB | CUDA peak MiB | s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cuda = "-" if r["cuda_peak_bytes"] is None else _mib(r["cuda_peak_bytes"])
        lines.append(
            f"| {r['mask_format']} | {r['detections']} | {_mib(r['mask_bytes'])} | {_mib(r['rss_growth_bytes'])} | {cuda} | {r['seconds']:.2f} |"
        )
    return lines


# --- serve ---------------------------------------------------------------------------------------

SERVE_WORKLOADS = ("one_size", "mixed")


def serve_images(workload: str, count: int) -> list[bytes]:
    """PNG files of the bundled model's shape images: all of one size (a camera stream), or of
    mixed sizes (every other one resized, as photographs of several aspect ratios)."""
    import cv2

    from weights.shapes import generate

    files = []
    for i in range(count):
        rgb = generate(31, i).image
        if workload == "mixed" and i % 2:
            rgb = cv2.resize(rgb, (rgb.shape[1] + 48 * (i % 4), rgb.shape[0] + 32 * (i % 3)))
        files.append(cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))[1].tobytes())
    return files


def _serve_process(port: int, device: str, max_batch_size: int):
    import subprocess

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "engine.cli", "serve", "--device", device, "--port", str(port), "--max-batch-size", str(max_batch_size), "--max-queue", "256"]
    return subprocess.Popen(command, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_ready(url: str, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server at {url} did not get ready in {timeout:.0f} s")


def _drive(url: str, files: list[bytes], concurrency: int, timeout: float) -> dict:
    """A bounded load: each file posted once to /predict, ``concurrency`` at a time (asyncio and
    httpx); per request latency and status."""
    import asyncio

    import httpx

    async def run() -> tuple[list[float], list[int], float]:
        latencies, statuses = [], []
        queue = list(enumerate(files))
        async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=concurrency)) as client:

            async def worker():
                while queue:
                    _, body = queue.pop()
                    start = time.perf_counter()
                    try:
                        response = await client.post(f"{url}/predict", content=body)
                        statuses.append(response.status_code)
                    except httpx.HTTPError:
                        statuses.append(0)
                    latencies.append(time.perf_counter() - start)

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return latencies, statuses, time.perf_counter() - start

    latencies, statuses, seconds = asyncio.run(run())
    ok = [l for l, s in zip(latencies, statuses) if s == 200]
    quantile = lambda q: float(np.quantile(ok, q)) if ok else float("nan")  # noqa: E731
    return {
        "images_per_s": len(ok) / seconds,
        "p50_s": quantile(0.5), "p90_s": quantile(0.9), "p99_s": quantile(0.99),
        "errors": len(statuses) - len(ok),
    }


def _metric_sum_count(url: str, name: str) -> tuple[float, float]:
    import httpx

    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"{name}_sum ") or line.startswith(f"{name}_count "):
            key, value = line.split()
            values[key.rsplit("_", 1)[1]] = float(value)
    return values.get("sum", 0.0), values.get("count", 0.0)


def _peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line.split()[1] for line in status if line.startswith("VmHWM:"))) / 1024


def bench_serve(args, device) -> dict:
    """``maskrcnn-engine serve`` under a bounded load on localhost against a plain loop of
    ``Predictor.run`` at its best batch size (the ceiling) and the server with batching off."""
    import socket

    from engine.bundled import shapes_predictor
    from engine.image_files import decode_image_bytes

    predictor = shapes_predictor(device=str(device), mask_format="box")
    report = {"requests": args.serve_requests, "concurrency": args.serve_concurrency, "workloads": {}}
    for workload in SERVE_WORKLOADS:
        files = serve_images(workload, args.serve_requests)
        images = [decode_image_bytes(f) for f in files]
        best = None
        for batch in args.serve_loop_batches:
            def loop():
                for start in range(0, len(images), batch):
                    predictor.run(images[start : start + batch])
            result = summary(measure(loop, device=device, warmup=1, repeats=args.repeats_job), items=len(images))
            if best is None or result["items_per_s"] > best["items_per_s"]:
                best = {**result, "batch": batch}
        rows = []
        for label, max_batch in (("batching", args.serve_max_batch), ("batching off", 1)):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            proc = _serve_process(port, str(device), max_batch)
            url = f"http://127.0.0.1:{port}"
            try:
                _wait_ready(url)
                _drive(url, files[: max(4, len(files) // 4)], 4, args.serve_timeout)  # warm-up
                for concurrency in args.serve_concurrency:
                    before = _metric_sum_count(url, "maskrcnn_batch_size")
                    run = _drive(url, files, concurrency, args.serve_timeout)
                    after = _metric_sum_count(url, "maskrcnn_batch_size")
                    batches = after[1] - before[1]
                    run.update({
                        "server": label, "concurrency": concurrency,
                        "mean_batch": (after[0] - before[0]) / batches if batches else 0.0,
                        "vs_plain_loop": run["images_per_s"] / best["items_per_s"],
                        "peak_server_mib": _peak_rss_mib(proc.pid),
                    })
                    rows.append(run)
            finally:
                proc.terminate()
                proc.wait(timeout=120)
        report["workloads"][workload] = {"plain_loop": best, "runs": rows}
    return report


def serve_markdown(report: dict) -> list[str]:
    lines = [
        f"`maskrcnn-engine serve`, bundled shapes model, {report['requests']} requests per run to `POST /predict` "
        "(an asyncio httpx client on localhost), against a plain loop of `Predictor.run` at its best batch size:",
    ]
    for workload, res in report["workloads"].items():
        plain = res["plain_loop"]
        lines += [
            "",
            f"{workload.replace('_', ' ')}: plain loop {plain['items_per_s']:.2f} images/s at batch {plain['batch']}.",
            "",
            "| server | concurrency | images/s | vs plain loop | p50 ms | p90 ms | p99 ms | mean batch | errors | peak server MiB |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for r in res["runs"]:
            lines.append(
                f"| {r['server']} | {r['concurrency']} | {r['images_per_s']:.2f} | {r['vs_plain_loop']:.2f}x | {r['p50_s'] * 1e3:.0f} "
                f"| {r['p90_s'] * 1e3:.0f} | {r['p99_s'] * 1e3:.0f} | {r['mean_batch']:.2f} | {r['errors']} | {r['peak_server_mib']:.0f} |"
            )
    return lines


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"Device: {env['device']}; {env['date']}; torch {env['torch']}, torchvision {env['torchvision']}, "
        f"triton {env['triton']}; images scaled by {report['settings']['image_scale']}.",
        "",
    ]
    if "job" in report:
        lines += job_markdown(report["job"]) + [""]
    if "end_to_end" in report:
        lines += end_to_end_markdown(report["end_to_end"])
    if "profile" in report:
        lines += [""] + profile_markdown(report["profile"], report["environment"]["torch_threads"])
    if "peers" in report:
        lines += [""] + peers_markdown(report["peers"])
    if "scaling" in report:
        lines += [""] + scaling_markdown(report["scaling"])
    if "large_image" in report:
        lines += [""] + large_image_markdown(report["large_image"])
    if "serve" in report:
        lines += [""] + serve_markdown(report["serve"])
    if "kernels" in report:
        lines += ["", "| kernel | engine ms | baseline | baseline ms | engine speed-up | engine / baseline peak MiB |", "|---|---|---|---|---|---|"]
        for row in report["kernels"]:
            for key, res in row.items():
                if key in ("kernel", "engine"):
                    continue
                lines.append(
                    f"| {row['kernel']} | {row['engine']['median_s'] * 1e3:.3f} | {key} | {res['median_s'] * 1e3:.3f} "
                    f"| {res['speedup_of_engine']:.2f}x | {_mib(row['engine']['peak_memory_bytes'])} / {_mib(res['peak_memory_bytes'])} |"
                )
    return "\n".join(lines) + "\n"


def end_to_end_markdown(rows: list[dict]) -> list[str]:
    lines = [
        "| batch | system | images/s (median) | p25-p75 | vs torchvision | peak MiB | matched | mask IoU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        matched, mask_iou = _agreement_cells(r.get("agreement"))
        lines.append(
            f"| {r['batch']} | {r['system']} | {r['items_per_s']:.2f} | {r['items_per_s_p25']:.2f}-{r['items_per_s_p75']:.2f} "
            f"| {r['ratio_vs_torchvision']:.2f}x | {_mib(r['peak_memory_bytes'])} | {matched} | {mask_iou} |"
        )
    return lines


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--fast-precision", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", help="write the full report here")
    ap.add_argument("--markdown", help="write the tables here")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and one repeat: checks the script on CPU")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="what to measure (default: all)")
    ap.add_argument("--profile-presets", nargs="+", default=list(PROFILE_PRESETS), help="profile section: family presets")
    ap.add_argument("--profile-precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"], help="profile section: precisions")
    ap.add_argument("--stage-batch", type=int, default=None, help="profile section: photographs per batch (default 8, 2 with --smoke)")
    ap.add_argument("--peers", nargs="+", default=list(PEER_NAMES), choices=PEER_NAMES, help="peers section: frameworks (mmdetection is skipped where not installed)")
    ap.add_argument("--cpu-compile", action="store_true", help="peers section on the CPU: add the engine with cpu_compile=True (its first run, compile included, is reported apart)")
    ap.add_argument("--peer-batch", type=int, default=None, help="peers and scaling sections: photographs per batch (default 4, 1 with --smoke)")
    ap.add_argument("--scaling-batches", type=int, nargs="+", default=None, help="scaling section: batch sizes (default 1 2 4 8; 1 2 with --smoke)")
    ap.add_argument("--scaling-sizes", type=int, nargs="+", default=None, help="scaling section: min_size values, max_size scaled with them (default 480 640 800 1024; 96 128 with --smoke)")
    ap.add_argument("--job-images", type=int, default=48, help="job section: shape images")
    ap.add_argument("--job-batch", type=int, default=4, help="job section: batch size")
    ap.add_argument("--job-window", type=int, default=8, help="job section: images per window (the unit of work of a Ray actor)")
    ap.add_argument("--job-ray-workers", type=int, nargs="+", default=None, help="job section: Ray actor counts (default: 1 2 on CPU, 1 on CUDA)")
    ap.add_argument("--large-image", type=int, nargs=2, default=None, metavar=("H", "W"), help="large_image section: the image size (default 6000 8000; 600 800 with --smoke)")
    ap.add_argument("--large-image-child", choices=LARGE_IMAGE_FORMATS, help=argparse.SUPPRESS)  # the section's fresh process
    ap.add_argument("--job-ray-cpus", type=int, default=None, help="job section: CPUs of the local Ray cluster (default: all)")
    ap.add_argument("--serve-requests", type=int, default=48, help="serve section: requests per run (each image once)")
    ap.add_argument("--serve-concurrency", type=int, nargs="+", default=None, help="serve section: concurrent clients (default 1 4 16 64; 1 4 with --smoke)")
    ap.add_argument("--serve-max-batch", type=int, default=8, help="serve section: the server's --max-batch-size")
    ap.add_argument("--serve-loop-batches", type=int, nargs="+", default=None, help="serve section: batch sizes of the plain loop, the best one the ceiling (default 1 4 8; 1 2 with --smoke)")
    ap.add_argument("--serve-timeout", type=float, default=300.0, help="serve section: seconds a request may take")
    args = ap.parse_args(argv)

    args.warmup_job, args.repeats_job = 1, 3
    args.job_ray_cpus = args.job_ray_cpus or os.cpu_count()
    if args.job_ray_workers is None:
        args.job_ray_workers = [1] if args.device.startswith("cuda") else [1, 2]
    stage_batch, peer_batch = args.stage_batch, args.peer_batch
    scaling_batches, scaling_sizes = args.scaling_batches, args.scaling_sizes
    large_image = args.large_image
    args.large_image = large_image or [6000, 8000]
    args.image_scale, args.stage_batch, args.config = 1.0, stage_batch or 8, None
    args.peer_batch, args.scaling_batches, args.scaling_sizes = peer_batch or 4, scaling_batches or [1, 2, 4, 8], scaling_sizes or [480, 640, 800, 1024]
    args.kernel_batch, args.kernel_image, args.kernel_channels = 8, (800, 1216), 256
    args.rois_per_image, args.paste_detections, args.paste_image, args.nms_boxes = 1000, 100, (800, 1200), 5000
    if args.smoke:
        from engine.config import TORCHVISION_MASKRCNN_R50_FPN

        args.batch_sizes, args.warmup, args.repeats, args.stage_batch = [1, 2], 0, 2, stage_batch or 2
        args.peer_batch, args.scaling_batches, args.scaling_sizes = peer_batch or 1, scaling_batches or [1, 2], scaling_sizes or [96, 128]
        args.image_scale = 0.25
        args.config = TORCHVISION_MASKRCNN_R50_FPN.replace(min_size=128, max_size=200)
        args.kernel_batch, args.kernel_image, args.kernel_channels = 2, (64, 96), 8
        args.rois_per_image, args.paste_detections, args.paste_image, args.nms_boxes = 6, 4, (40, 60), 60
        args.job_images, args.warmup_job, args.repeats_job = min(args.job_images, 6), 0, 1
        args.large_image = large_image or [600, 800]
        args.serve_requests = min(args.serve_requests, 8)
    args.serve_concurrency = args.serve_concurrency or ([1, 4] if args.smoke else [1, 4, 16, 64])
    args.serve_loop_batches = args.serve_loop_batches or ([1, 2] if args.smoke else [1, 4, 8])
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.large_image_child is not None:  # the large_image section's fresh process
        print(json.dumps(large_image_child(*args.large_image, args.large_image_child, args.device)))
        return {}
    device = torch.device(args.device)
    bf16_rows = "end_to_end" in args.sections
    if bf16_rows and device.type == "cpu" and args.fast_precision == "bf16" and not cpu_has_fast_kernels("bf16"):
        print(
            "warning: this CPU has no oneDNN bf16 kernels (no AVX512-BF16 / AMX): the engine bf16 rows run "
            "bf16 convolutions on a reference path and take far longer than fp32",
            file=sys.stderr,
        )
    report = {"environment": environment(device), "settings": {k: v for k, v in vars(args).items() if k != "config"}}
    if any(section in args.sections for section in ("end_to_end", "profile", "scaling")):
        from checkpoints import make_torchvision_maskrcnn

        size = {} if args.config is None else {"min_size": args.config.min_size, "max_size": args.config.max_size}
        tv_model = make_torchvision_maskrcnn(**size).to(device).eval()
        state = {k: v.cpu() for k, v in tv_model.state_dict().items()}
        if "end_to_end" in args.sections:
            report["end_to_end"] = bench_end_to_end(args, tv_model, state, device)
        if "profile" in args.sections:
            report["profile"] = bench_profile(args, state, device)
        if "scaling" in args.sections:
            report["scaling"] = bench_scaling(args, state, device)
    if "peers" in args.sections:
        report["peers"] = bench_peers(args, device)
    if "kernels" in args.sections:
        report["kernels"] = bench_kernels(args, device)
    if "job" in args.sections:
        report["job"] = bench_job(args, device)
    if "large_image" in args.sections:
        report["large_image"] = bench_large_image(args, device)
    if "serve" in args.sections:
        report["serve"] = bench_serve(args, device)
    table = markdown(report)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    if args.markdown:
        Path(args.markdown).write_text(table)
    return report


if __name__ == "__main__":
    main()
