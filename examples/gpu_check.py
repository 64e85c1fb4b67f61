"""One command for when a GPU is available: CUDA tests, benchmark and GPU sync count in about 8 minutes.

    PYTHONPATH=. python examples/gpu_check.py --output DIR       # on one H100/H200: within 8 minutes
    python examples/gpu_check.py --dry-run --output DIR          # CPU: every phase in a tiny form (~2 minutes)

Phases, in order, each in its own subprocess with its own time budget (a phase that fails or runs
out of time is recorded and the next one starts; time a phase leaves unused goes to the later ones):

- ``tests-kernels``: the compiled Triton kernels against their references (``tests/test_roi_align.py``,
  ``tests/test_roi_align_crop_and_resize.py``, ``tests/test_paste_masks.py``, ``tests/test_nms.py``,
  ``tests/test_pipeline_kernels.py``);
- ``tests-cuda-other``: the other CUDA-only cases (``tests/test_resize.py -m gpu``);
- ``tests-latency``: ``tests/test_latency_gpu.py`` (kernels and the fp32 engine against their baselines);
- ``tests-parity-gpu``: ``tests/test_parity_torchvision.py -k on_gpu``, the predictor on CUDA against
  torchvision on CUDA (its other cases run on the CPU and are covered by the ordinary suite);
- ``benchmark``: ``examples/benchmark.py``'s functions at batch 1, 8 and 16: torchvision fp32, the
  engine in fp32, bf16 and (where ``Predictor`` takes ``cuda_graph=``) CUDA-graph mode, the engine's
  stages, the kernels against their baselines, with few repeats, and the ``predict`` job on one GPU
  against a plain ``Predictor.run`` loop (on Ray too, where Ray Data is installed);
- ``sync``: ``Predictor.run`` of the bundled shapes model under ``torch.cuda.set_sync_debug_mode("warn")``,
  counting the synchronising calls and where in ``engine/`` or ``kernels/`` they come from, then under
  ``"error"``, reporting whether it raised. It measures and reports; a count is not a failure.

Written into DIR: ``results.json`` (everything), ``results.md`` (the same as tables), per test group
``junit_<group>.xml`` and ``pytest_<group>.log``, and ``benchmark.json/.log``, ``sync.json/.log``.
The exit status is nonzero when a phase failed or timed out. Only the installed packages are used
(no installs); tests whose optional packages are missing skip.

``--dry-run`` runs every phase on the CPU at tiny sizes (CUDA hidden from the subprocesses): a few
fast kernel tests and the GPU test files (which skip), the benchmark with ``--smoke``'s kernel sizes,
image scale and batches 1 and 2, one repeat, on a narrow torchvision model (ResNet-18 body, FPN and
heads 32 wide, 64-96 px inputs: bf16 on a CPU is slow), and the shapes predictor once (sync counting
is reported as skipped on CPU). Without ``--dry-run`` a machine without CUDA gets an error and exit
status 2.
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # the time limit counts from here

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH_PATH = ROOT / "examples" / "benchmark.py"
PROJECT_DIRS = tuple(str(ROOT / d) + os.sep for d in ("engine", "kernels"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: default total time limit (seconds, from the start of the script)
GPU_TIME_LIMIT = 470.0
DRY_TIME_LIMIT = 120.0

KERNEL_TEST_FILES = [
    "tests/test_roi_align.py",
    "tests/test_roi_align_crop_and_resize.py",
    "tests/test_paste_masks.py",
    "tests/test_nms.py",
    "tests/test_pipeline_kernels.py",
]

# name, kind, pytest selection on the GPU, pytest selection in the dry run, share of the time limit (GPU, dry run)
PHASES = [
    ("tests-kernels", "pytest", KERNEL_TEST_FILES,
     ["tests/test_roi_align_crop_and_resize.py", "-k", "test_oracle_is_exact_on_linear_maps or test_bad_mode"], 0.28, 0.11),
    ("tests-cuda-other", "pytest", ["tests/test_resize.py", "-m", "gpu"], ["tests/test_resize.py", "-m", "gpu"], 0.05, 0.11),
    ("tests-latency", "pytest", ["tests/test_latency_gpu.py"], ["tests/test_latency_gpu.py"], 0.17, 0.11),
    ("tests-parity-gpu", "pytest", ["tests/test_parity_torchvision.py", "-k", "on_gpu"],
     ["tests/test_parity_torchvision.py", "-k", "on_gpu"], 0.17, 0.11),
    ("benchmark", "child", None, None, 0.23, 0.36),
    ("sync", "child", None, None, 0.10, 0.20),
]
PHASE_NAMES = [p[0] for p in PHASES]

_PYTEST_LINE = re.compile(r"^(\S+::\S.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(\s|$)")


def elapsed() -> float:
    return time.monotonic() - T0


def log(message: str) -> None:
    print(f"[{elapsed():6.1f}s] {message}", flush=True)


def short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def child_env(dry_run: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is a CPU run, even on a GPU machine
    return env


# --- environment --------------------------------------------------------------------------------


def environment(dry_run: bool) -> dict:
    import torch

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "dry-run (CPU, tiny sizes)" if dry_run else "gpu",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "env_flags": {k: os.environ[k] for k in ("ENGINE_FORCE_REFERENCE", "ENGINE_FORCE_TRITON", "TRITON_INTERPRET",
                                                 "CUDA_VISIBLE_DEVICES") if k in os.environ},
    }
    from importlib import metadata

    for name, dist in (("triton", "triton"), ("torchvision", "torchvision"), ("numpy", "numpy"),
                       ("opencv", "opencv-python-headless"), ("scikit-image", "scikit-image"), ("pytest", "pytest"),
                       ("pycocotools", "pycocotools"), ("h5py", "h5py"), ("keras", "keras")):
        try:
            env[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # optional packages may be missing
            env[name] = "not installed"
    if env["opencv"] == "not installed":
        try:
            env["opencv"] = metadata.version("opencv-python")
        except metadata.PackageNotFoundError:
            pass
    try:
        env["cudnn"] = torch.backends.cudnn.version()
    except Exception:
        env["cudnn"] = None
    if torch.cuda.is_available() and not dry_run:
        props = torch.cuda.get_device_properties(0)
        env["device"] = torch.cuda.get_device_name(0)
        env["device_count"] = torch.cuda.device_count()
        env["capability"] = f"{props.major}.{props.minor}"
        env["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["multiprocessors"] = props.multi_processor_count
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=15)
            env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except Exception:
            env["driver"] = None
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()})"
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        env["git_commit"] = out.stdout.strip() if out.returncode == 0 else None
        if env["git_commit"]:
            dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
            env["git_dirty"] = bool(dirty.stdout.strip())
    except Exception:
        env["git_commit"] = None
    return env


# --- running a phase in a subprocess -------------------------------------------------------------


def run_subprocess(cmd, *, log_path: Path, timeout_s: float, grace_s: float, env: dict, on_line, heartbeat=None,
                   heartbeat_every: float = 20.0):
    """Runs ``cmd`` in its own process group, its output into ``log_path`` and through ``on_line``.

    At ``timeout_s - grace_s`` the group gets SIGINT (pytest then still writes its junit file and
    summary), at ``timeout_s`` SIGKILL. Returns (returncode, timed_out, seconds).
    """
    start = time.monotonic()
    timed_out = False
    with open(log_path, "w", encoding="utf-8", errors="replace") as logf:
        logf.write("$ " + shlex.join(str(c) for c in cmd) + "\n")
        logf.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, errors="replace", start_new_session=True)

        def pump():
            for line in proc.stdout:
                logf.write(line)
                logf.flush()
                try:
                    on_line(line.rstrip("\n"))
                except Exception:
                    pass

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        last_beat = start
        try:
            while True:
                try:
                    proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    pass
                now = time.monotonic()
                if heartbeat is not None and now - last_beat >= heartbeat_every:
                    last_beat = now
                    heartbeat(now - start, timeout_s - (now - start))
                if not timed_out and now - start >= timeout_s - grace_s:
                    timed_out = True
                    log(f"  time budget ({timeout_s:.0f} s) nearly spent: interrupting (SIGINT), {grace_s:.0f} s grace")
                    _signal_group(proc, signal.SIGINT)
                elif timed_out and now - start >= timeout_s:
                    log("  still running after the grace period: killing (SIGKILL)")
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
                    break
        except KeyboardInterrupt:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
            raise
        reader.join(timeout=10)
    return proc.returncode, timed_out, time.monotonic() - start


def _signal_group(proc: subprocess.Popen, sig) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group started for this child (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def parse_junit(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"error": f"unreadable junit xml: {exc}"}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = Counter()
    failed, skip_reasons = [], Counter()
    for suite in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] += int(suite.get(key, 0) or 0)
        for case in suite.iter("testcase"):
            test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
            for kind in ("failure", "error"):
                node = case.find(kind)
                if node is not None:
                    message = (node.get("message") or (node.text or "")).strip().splitlines()
                    failed.append({"test": test_id, "kind": kind, "message": (message[0] if message else "")[:300]})
            node = case.find("skipped")
            if node is not None:
                skip_reasons[(node.get("message") or "").strip()[:200]] += 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"counts": dict(counts), "failed_tests": failed, "skip_reasons": dict(skip_reasons.most_common(10))}


def run_pytest_phase(name: str, selection: list[str], *, out_dir: Path, timeout_s: float, dry_run: bool) -> dict:
    junit = out_dir / f"junit_{name}.xml"
    log_path = out_dir / f"pytest_{name}.log"
    if junit.exists():
        junit.unlink()
    cmd = [sys.executable, "-m", "pytest", *selection, "-v", "-rfEs", "--color=no", "-p", "no:cacheprovider",
           f"--junitxml={junit}", "--durations=10"]
    seen = Counter()

    def on_line(line: str):
        m = _PYTEST_LINE.match(line)
        if m:
            seen[m.group(2)] += 1
            if m.group(2) in ("FAILED", "ERROR"):
                log(f"  {m.group(2)}: {m.group(1)}")

    def heartbeat(spent, left):
        log(f"  {name}: {seen['PASSED']} passed, {seen['FAILED']} failed, {seen['ERROR']} errors, "
            f"{seen['SKIPPED']} skipped so far ({spent:.0f} s in, {left:.0f} s left)")

    grace = 5.0 if dry_run else 12.0
    rc, timed_out, seconds = run_subprocess(cmd, log_path=log_path, timeout_s=timeout_s, grace_s=grace,
                                            env=child_env(dry_run), on_line=on_line, heartbeat=heartbeat,
                                            heartbeat_every=10.0 if dry_run else 20.0)
    parsed = parse_junit(junit)
    result = {"command": shlex.join(["python", "-m", "pytest", *selection]), "returncode": rc,
              "log": log_path.name, "junit": junit.name if junit.exists() else None,
              "streamed_counts": {k.lower(): v for k, v in seen.items()}}
    if parsed:
        result.update(parsed)
    counts = (parsed or {}).get("counts") or {}
    if timed_out:
        status, note = "timeout", f"interrupted after {seconds:.0f} s (budget {timeout_s:.0f} s)"
    elif rc == 0:
        status, note = "passed", None
        if counts.get("tests") and counts.get("skipped") == counts.get("tests"):
            note = "every selected test skipped"
            if not dry_run:
                status, note = "failed", "every selected test skipped on a CUDA machine"
    elif rc == 5:
        status, note = "failed", "no tests were collected"
    else:
        status, note = "failed", f"pytest exit status {rc}"
    return {"status": status, "note": note, "seconds": seconds, "result": result}


def run_child_phase(name: str, *, out_dir: Path, timeout_s: float, dry_run: bool) -> dict:
    grace = 5.0 if dry_run else 10.0
    json_path = out_dir / f"{name}.json"
    if json_path.exists():
        json_path.unlink()
    work_s = max(1.0, timeout_s - grace - (3.0 if dry_run else 8.0))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--output", str(out_dir),
           "--phase-seconds", f"{work_s:.1f}"] + (["--dry-run"] if dry_run else [])

    def on_line(line: str):
        print(f"[{elapsed():6.1f}s]   {line}", flush=True)

    rc, timed_out, seconds = run_subprocess(cmd, log_path=out_dir / f"{name}.log", timeout_s=timeout_s, grace_s=grace,
                                            env=child_env(dry_run), on_line=on_line)
    result = None
    if json_path.is_file():
        try:
            result = json.loads(json_path.read_text())
        except ValueError as exc:
            result = {"error": f"unreadable {json_path.name}: {exc}"}
    if timed_out:
        status, note = "timeout", f"interrupted after {seconds:.0f} s (budget {timeout_s:.0f} s)"
    elif result is None:
        status, note = "failed", f"exit status {rc}, no {json_path.name} written (see {name}.log)"
    elif rc != 0 or result.get("status") != "passed":
        status, note = "failed", result.get("note") or f"exit status {rc}"
    else:
        status, note = "passed", result.get("note")
    return {"status": status, "note": note, "seconds": seconds,
            "result": dict(result or {}, returncode=rc, log=f"{name}.log")}


# --- the benchmark phase (in its own process) ----------------------------------------------------


def load_benchmark_module():
    spec = importlib.util.spec_from_file_location("benchmark", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_graph_supported() -> bool:
    from engine import Predictor

    return "cuda_graph" in inspect.signature(Predictor.__init__).parameters


def tiny_torchvision_model(config):
    """A small torchvision Mask R-CNN for the dry run: ResNet-18 body, FPN and heads 32 wide, 4 classes.

    Its limits (proposals, detections, sizes) are ``config``'s, so that the engine runs the same network.
    """
    import torch
    import torchvision
    from torchvision.models import resnet18
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    torch.manual_seed(0)
    width, classes = 32, 4
    body = resnet18(weights=None, norm_layer=torchvision.ops.FrozenBatchNorm2d)
    backbone = BackboneWithFPN(body, {f"layer{k}": str(k - 1) for k in range(1, 5)}, [64, 128, 256, 512], width,
                               extra_blocks=LastLevelMaxPool())
    model = MaskRCNN(
        backbone, num_classes=None, min_size=config.min_size, max_size=config.max_size,
        rpn_pre_nms_top_n_test=config.rpn_pre_nms_top_n, rpn_post_nms_top_n_test=config.rpn_post_nms_top_n,
        box_detections_per_img=config.detections_per_image,
        box_head=TwoMLPHead(width * 7 * 7, 2 * width), box_predictor=FastRCNNPredictor(2 * width, classes),
        mask_head=MaskRCNNHeads(width, [width] * 4, 1), mask_predictor=MaskRCNNPredictor(width, width, classes),
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torchvision.ops.FrozenBatchNorm2d):
                module.running_mean.normal_(0.0, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)
                module.eps = 0.0
        model.roi_heads.box_predictor.cls_score.bias.normal_(0.0, 1.0, generator=generator)
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(5.0)
    return model.eval()


class PhaseClock:
    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.end = self.start + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def stamp(self) -> str:
        return f"+{time.monotonic() - self.start:5.1f}s"


def phase_benchmark(out_dir: Path, *, dry_run: bool, seconds: float, warmup: int, repeats: int) -> dict:
    clock = PhaseClock(seconds)
    report = {"status": "running", "device": "cpu" if dry_run else "cuda", "end_to_end": [], "stages": None,
              "kernels": None, "errors": [], "skipped": []}
    path = out_dir / "benchmark.json"

    def save():
        write_json(path, report)

    def say(msg):
        print(f"[benchmark {clock.stamp()}] {msg}", flush=True)

    try:
        import torch

        bench = load_benchmark_module()
        from engine import Predictor

        device = torch.device(report["device"])
        if dry_run:
            args = bench.parse_args(["--smoke", "--device", "cpu"])
            args.warmup, args.repeats = 0, 1
            args.batch_sizes = [1, 2]
            args.config = args.config.replace(min_size=64, max_size=96, rpn_pre_nms_top_n=100, rpn_post_nms_top_n=50,
                                              detections_per_image=10, bn_eps=0.0)
            say("building a small torchvision model (ResNet-18 body, FPN and heads 32 wide) for the dry run")
            tv_model = tiny_torchvision_model(args.config)
        else:
            args = bench.parse_args(["--device", "cuda", "--warmup", str(warmup), "--repeats", str(repeats)])
            from checkpoints import make_torchvision_maskrcnn  # tests/ is on sys.path through the benchmark module

            say("building torchvision maskrcnn_resnet50_fpn with calibrated random weights")
            tv_model = make_torchvision_maskrcnn()
        tv_model = tv_model.to(device).eval()
        state = {k: v.cpu() for k, v in tv_model.state_dict().items()}
        fast = args.fast_precision
        graph_ok = cuda_graph_supported()
        systems = {"engine fp32": {}, f"engine {fast}": {"precision": fast}}
        if not graph_ok:
            report["cuda_graph"] = {"supported": False,
                                    "note": "not available in this checkout (Predictor has no cuda_graph argument)"}
        elif device.type != "cuda":
            report["cuda_graph"] = {"supported": True, "note": "skipped on CPU (CUDA graphs need a GPU)"}
        else:
            report["cuda_graph"] = {"supported": True, "note": "measured"}
            systems["engine fp32 cuda-graph"] = {"cuda_graph": True}
            systems[f"engine {fast} cuda-graph"] = {"precision": fast, "cuda_graph": True}
        report["settings"] = {"batch_sizes": list(args.batch_sizes), "warmup": args.warmup, "repeats": args.repeats,
                              "image_scale": args.image_scale, "stage_batch": args.stage_batch,
                              "fast_precision": fast, "systems": ["torchvision fp32", *systems],
                              "config": None if args.config is None else {
                                  k: getattr(args.config, k) for k in ("min_size", "max_size", "rpn_pre_nms_top_n",
                                                                       "rpn_post_nms_top_n", "detections_per_image")},
                              "torchvision_model": "ResNet-18 body, FPN and heads 32 wide, 4 classes (dry run)" if dry_run
                              else "maskrcnn_resnet50_fpn, 91 classes, calibrated random weights"}
        say(f"cuda graph: {report['cuda_graph']['note']}")
        save()

        predictors = {}
        for name, kwargs in systems.items():
            try:
                predictors[name] = Predictor(state, device=device, config=args.config, **kwargs)
            except Exception as exc:
                report["errors"].append({"section": f"end_to_end {name}", "error": short_error(exc)})
                say(f"{name}: could not build the predictor: {short_error(exc)}")

        for batch in args.batch_sizes:
            if clock.left() <= 0:
                report["skipped"].append(f"end_to_end batch {batch}: the phase's time budget is spent")
                continue
            images = bench.photographs(batch, scale=args.image_scale)
            tv_run = bench.torchvision_end_to_end(tv_model, images, device)
            reference = tv_run()
            entries = [("torchvision fp32", tv_run, None)]
            entries += [(n, (lambda p=p: p.run(images)), p) for n, p in predictors.items()]
            results = {}
            for name, fn, predictor in entries:
                if clock.left() <= 0:
                    report["skipped"].append(f"end_to_end batch {batch} {name}: the phase's time budget is spent")
                    continue
                try:
                    res = bench.summary(bench.measure(fn, device=device, warmup=args.warmup, repeats=args.repeats), items=batch)
                    res["peak_memory_bytes"] = bench.peak_memory(fn, device) if device.type == "cuda" else None
                    if predictor is not None:
                        res["agreement"] = bench.agreement(reference, predictor.run(images))
                except Exception as exc:
                    report["errors"].append({"section": f"end_to_end batch {batch} {name}", "error": short_error(exc)})
                    say(f"batch {batch} {name}: FAILED {short_error(exc)}")
                    continue
                results[name] = res
                say(f"batch {batch:>2} {name:<24} {res['items_per_s']:8.2f} images/s")
            base = results.get("torchvision fp32", {}).get("items_per_s")
            for name, res in results.items():
                res["ratio_vs_torchvision"] = res["items_per_s"] / base if base else None
                report["end_to_end"].append({"batch": batch, "system": name, **res})
            save()

        if clock.left() > 0:
            try:
                report["stages"] = bench.bench_stages(args, state, device)
                say("stages: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in report["stages"]["median_s"].items()))
            except Exception as exc:
                report["errors"].append({"section": "stages", "error": short_error(exc)})
                say(f"stages: FAILED {short_error(exc)}")
        else:
            report["skipped"].append("stages: the phase's time budget is spent")
        save()

        if clock.left() > 0:
            try:
                report["kernels"] = bench.bench_kernels(args, device)
                for row in report["kernels"]:
                    speedups = ", ".join(f"{k} {v['speedup_of_engine']:.2f}x" for k, v in row.items()
                                         if k not in ("kernel", "engine"))
                    say(f"kernel {row['kernel']}: {row['engine']['median_s'] * 1e3:.3f} ms; speed-up vs {speedups}")
            except Exception as exc:
                report["errors"].append({"section": "kernels", "error": short_error(exc)})
                say(f"kernels: FAILED {short_error(exc)}")
        else:
            report["skipped"].append("kernels: the phase's time budget is spent")
        save()

        if clock.left() > 0:
            try:
                job_args = bench.parse_args(["--sections", "job", "--device", report["device"], *(["--smoke"] if dry_run else [])])
                if dry_run:
                    job_args.job_ray_workers = []  # Ray's start-up is tens of seconds on the CPU
                report["job"] = bench.bench_job(job_args, device)
                say(f"predict job: {report['job']['in_process']['items_per_s']:.2f} images/s in-process, "
                    f"plain Predictor.run loop {report['job']['plain_loop']['items_per_s']:.2f}")
            except Exception as exc:
                report["errors"].append({"section": "job", "error": short_error(exc)})
                say(f"job: FAILED {short_error(exc)}")
        else:
            report["skipped"].append("job: the phase's time budget is spent")
    except KeyboardInterrupt:
        report["errors"].append({"section": "benchmark", "error": "interrupted (time budget)"})
    except Exception as exc:
        report["errors"].append({"section": "benchmark", "error": short_error(exc), "traceback": traceback.format_exc()})
        say(f"FAILED {short_error(exc)}")
    report["status"] = "failed" if report["errors"] else "passed"
    if report["errors"]:
        report["note"] = f"{len(report['errors'])} section(s) failed: " + "; ".join(e["section"] for e in report["errors"])
    elif report["skipped"]:
        report["note"] = f"{len(report['skipped'])} item(s) skipped for time"
    save()
    return report


# --- the sync-count phase (in its own process) ---------------------------------------------------


def _project_frames(frames) -> list:
    return [f for f in frames if f.filename.startswith(PROJECT_DIRS)]


def _frame_name(frame) -> str:
    return f"{os.path.relpath(frame.filename, ROOT)}:{frame.lineno} in {frame.name}"


def _where(frames) -> dict:
    project = _project_frames(frames)
    if not project:
        return {"where": "(outside engine/ and kernels/)", "code": frames[-1].line if frames else "", "callers": []}
    inner = project[-1]
    return {"where": _frame_name(inner), "code": (inner.line or "").strip(),
            "callers": [_frame_name(f) for f in reversed(project[-4:-1])]}


def count_syncs(predictor, images) -> dict:
    """Runs ``predictor`` once under sync debug mode "warn" and groups the warnings by their frame in engine/ or kernels/."""
    import torch

    syncs, others = [], []

    def hook(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if "synchroniz" in text.lower():
            syncs.append((text, _where(traceback.extract_stack()[:-1])))
        else:
            others.append(f"{category.__name__}: {text[:200]} ({os.path.relpath(filename, ROOT)}:{lineno})")

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook  # restored by catch_warnings
        start = time.perf_counter()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            detections = predictor.run(images)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    groups: dict[str, dict] = {}
    for _, where in syncs:
        entry = groups.setdefault(where["where"], dict(where, count=0))
        entry["count"] += 1
    return {
        "status": "measured",
        "batch": len(images),
        "syncs": len(syncs),
        "locations": sorted(groups.values(), key=lambda e: -e["count"]),
        "messages": sorted(Counter(t for t, _ in syncs)),
        "other_warnings": others[:20],
        "detections": [len(d) for d in detections],
        "seconds": seconds,
    }


def error_mode(predictor, images) -> dict:
    import torch

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        detections = predictor.run(images)
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        return {"status": "measured", "batch": len(images), "raised": False, "detections": [len(d) for d in detections]}
    except RuntimeError as exc:
        torch.cuda.set_sync_debug_mode("default")
        frames = traceback.extract_tb(exc.__traceback__)
        message = (str(exc).splitlines() or [""])[0][:300]
        return {"status": "measured", "batch": len(images), "raised": True, "message": message,
                "is_sync_error": "synchroniz" in message.lower(), **_where(frames)}
    finally:
        torch.cuda.set_sync_debug_mode("default")


def phase_sync(out_dir: Path, *, dry_run: bool, seconds: float) -> dict:
    clock = PhaseClock(seconds)
    path = out_dir / "sync.json"
    report = {"status": "running", "device": "cpu" if dry_run else "cuda", "errors": []}

    def say(msg):
        print(f"[sync {clock.stamp()}] {msg}", flush=True)

    try:
        import torch

        from engine.bundled import shapes_predictor
        from weights.shapes import generate

        device = torch.device(report["device"])
        predictor = shapes_predictor(device=device)
        images = [generate(11, i).image for i in range(2 if dry_run else 4)]
        report["model"] = "bundled shapes model (engine/bundled.py: shapes_predictor)"
        report["image_sizes"] = [list(im.shape[:2]) for im in images]
        start = time.perf_counter()
        detections = predictor.run(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        report["first_run"] = {"batch": len(images), "seconds": time.perf_counter() - start,
                               "detections": [len(d) for d in detections]}
        say(f"predictor ran on {device.type}: {report['first_run']['detections']} detections "
            f"in {report['first_run']['seconds']:.2f} s (includes compilation)")
        if device.type != "cuda":
            skipped = {"status": "skipped-on-CPU", "reason": "torch.cuda.set_sync_debug_mode applies to CUDA only"}
            report["warn"], report["error"] = [skipped], skipped
            say("sync counting skipped on CPU")
        else:
            report["warn"] = []
            for batch in (1, len(images)):
                if clock.left() <= 0:
                    report["warn"].append({"status": "skipped", "batch": batch, "reason": "the phase's time budget is spent"})
                    continue
                predictor.run(images[:batch])  # compiles and autotunes for these shapes outside the count
                torch.cuda.synchronize()
                res = count_syncs(predictor, images[:batch])
                report["warn"].append(res)
                say(f"batch {batch}: {res['syncs']} synchronising call(s)")
                for loc in res["locations"][:10]:
                    say(f"  {loc['count']:3d} x {loc['where']}: {loc['code']}")
            if clock.left() > 0:
                report["error"] = error_mode(predictor, images)
                err = report["error"]
                say("error mode: " + (f"raised at {err['where']}: {err['message']}" if err["raised"] else "did not raise"))
            else:
                report["error"] = {"status": "skipped", "reason": "the phase's time budget is spent"}
    except KeyboardInterrupt:
        report["errors"].append({"section": "sync", "error": "interrupted (time budget)"})
    except Exception as exc:
        report["errors"].append({"section": "sync", "error": short_error(exc), "traceback": traceback.format_exc()})
        say(f"FAILED {short_error(exc)}")
    report["status"] = "failed" if report["errors"] else "passed"
    if report["errors"]:
        report["note"] = report["errors"][0]["error"]
    elif report.get("error", {}).get("status") == "skipped-on-CPU":
        report["note"] = "sync counting skipped on CPU; the predictor ran once"
    write_json(path, report)
    return report


# --- report -------------------------------------------------------------------------------------


def _f(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# GPU check ({report['mode']})",
        "",
        f"{env.get('date')}; device {env.get('device')}; torch {env.get('torch')} (CUDA {env.get('cuda_version')}), "
        f"triton {env.get('triton')}, torchvision {env.get('torchvision')}, python {env.get('python')}"
        + (f"; driver {env['driver']}" if env.get("driver") else "")
        + (f"; commit {env['git_commit'][:12]}{' (dirty)' if env.get('git_dirty') else ''}" if env.get("git_commit") else "")
        + ".",
        "",
        f"Overall: **{report['status']}** in {report.get('wall_s', 0):.0f} s (limit {report['time_limit_s']:.0f} s).",
        "",
        "| phase | status | seconds | budget s | summary |",
        "|---|---|---|---|---|",
    ]
    for name, ph in report["phases"].items():
        lines.append(f"| {name} | {ph['status']} | {_f(ph.get('seconds'), '.0f')} | {_f(ph.get('timeout_s'), '.0f')} "
                     f"| {phase_summary(ph)} |")
    for name, ph in report["phases"].items():
        res = ph.get("result") or {}
        if ph.get("kind") == "pytest":
            failed = res.get("failed_tests") or []
            if failed:
                lines += ["", f"Failed in {name}:", ""]
                lines += [f"- `{f['test']}` ({f['kind']}): {f['message']}" for f in failed[:30]]
                if len(failed) > 30:
                    lines.append(f"- ... and {len(failed) - 30} more (see {res.get('junit')})")
    bench = (report["phases"].get("benchmark") or {}).get("result")
    if bench:
        lines += benchmark_markdown(bench)
    sync = (report["phases"].get("sync") or {}).get("result")
    if sync:
        lines += sync_markdown(sync)
    return "\n".join(lines) + "\n"


def phase_summary(ph: dict) -> str:
    res = ph.get("result") or {}
    parts = []
    if ph.get("kind") == "pytest":
        c = res.get("counts")
        if c:
            parts.append(f"{c.get('passed', 0)} passed, {c.get('failures', 0)} failed, {c.get('errors', 0)} errors, "
                         f"{c.get('skipped', 0)} skipped")
        elif res.get("streamed_counts"):
            parts.append(", ".join(f"{v} {k}" for k, v in res["streamed_counts"].items()) + " (from the log)")
    elif ph["name"] == "benchmark" and res:
        parts.append(f"{len(res.get('end_to_end') or [])} end-to-end rows, {len(res.get('kernels') or [])} kernels")
    elif ph["name"] == "sync" and res:
        warn = res.get("warn") or []
        measured = [w for w in warn if w.get("status") == "measured"]
        if measured:
            parts.append("; ".join(f"batch {w['batch']}: {w['syncs']} syncs" for w in measured))
            err = res.get("error") or {}
            if err.get("status") == "measured":
                parts.append("error mode " + ("raised" if err["raised"] else "did not raise"))
        elif warn:
            parts.append(str(warn[0].get("status")))
    if ph.get("note"):
        parts.append(str(ph["note"]))
    return "; ".join(parts).replace("|", "/") or "-"


def benchmark_markdown(res: dict) -> list[str]:
    settings = res.get("settings") or {}
    lines = ["", "## Benchmark", "",
             f"Device {res.get('device')}; warmup {settings.get('warmup')}, repeats {settings.get('repeats')}, images scaled "
             f"by {settings.get('image_scale')}; torchvision model: {settings.get('torchvision_model')}. "
             f"CUDA-graph mode: {(res.get('cuda_graph') or {}).get('note', '-')}.", ""]
    rows = res.get("end_to_end") or []
    if rows:
        lines += ["| batch | system | images/s (median) | p25-p75 | vs torchvision | peak MiB | matched | mask IoU |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            agree = r.get("agreement") or {}
            ratio = r.get("ratio_vs_torchvision")
            lines.append(f"| {r['batch']} | {r['system']} | {r['items_per_s']:.2f} | {r['items_per_s_p25']:.2f}-"
                         f"{r['items_per_s_p75']:.2f} | {_f(ratio, '.2f')}{'x' if ratio is not None else ''} "
                         f"| {_mib(r.get('peak_memory_bytes'))} | {_f(agree.get('matched_fraction'), '.3f')} "
                         f"| {_f(agree.get('mean_mask_iou'), '.3f')} |")
    if res.get("stages"):
        lines += ["", *load_benchmark_module().profile_markdown([res["stages"]])]
    if res.get("kernels"):
        lines += ["", "| kernel | engine ms | baseline | baseline ms | engine speed-up | engine / baseline peak MiB |",
                  "|---|---|---|---|---|---|"]
        for row in res["kernels"]:
            for key, base in row.items():
                if key in ("kernel", "engine"):
                    continue
                lines.append(f"| {row['kernel']} | {row['engine']['median_s'] * 1e3:.3f} | {key} | {base['median_s'] * 1e3:.3f} "
                             f"| {base['speedup_of_engine']:.2f}x | {_mib(row['engine'].get('peak_memory_bytes'))} / "
                             f"{_mib(base.get('peak_memory_bytes'))} |")
    if res.get("job"):
        lines += ["", *load_benchmark_module().job_markdown(res["job"])]
    for e in res.get("errors") or []:
        lines.append(f"- error in {e['section']}: `{e['error'][:300]}`")
    for s in res.get("skipped") or []:
        lines.append(f"- skipped: {s}")
    return lines


def sync_markdown(res: dict) -> list[str]:
    lines = ["", "## GPU synchronisations (bundled shapes model)", ""]
    first = res.get("first_run")
    if first:
        lines.append(f"First run on {res.get('device')}: batch {first['batch']}, detections {first['detections']}, "
                     f"{first['seconds']:.2f} s (includes compilation).")
    for w in res.get("warn") or []:
        if w.get("status") != "measured":
            lines += ["", f"`set_sync_debug_mode(\"warn\")`: {w.get('status')} ({w.get('reason', '')})."]
            continue
        lines += ["", f"`set_sync_debug_mode(\"warn\")`, batch {w['batch']}: **{w['syncs']}** synchronising call(s).", ""]
        if w["locations"]:
            lines += ["| count | where (innermost frame in engine/ or kernels/) | code | called from |", "|---|---|---|---|"]
            for loc in w["locations"]:
                code = loc["code"].replace("|", "\\|")
                lines.append(f"| {loc['count']} | {loc['where']} | `{code}` | {'; '.join(loc['callers']) or '-'} |")
    err = res.get("error") or {}
    if err.get("status") == "measured":
        text = (f"raised at {err['where']} (`{err['code']}`): {err['message']}" if err["raised"] else "did not raise")
        lines += ["", f"`set_sync_debug_mode(\"error\")`, batch {err['batch']}: {text}."]
    elif err:
        lines += ["", f"`set_sync_debug_mode(\"error\")`: {err.get('status')} ({err.get('reason', '')})."]
    for e in res.get("errors") or []:
        lines.append(f"- error: `{e['error'][:300]}`")
    return lines


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="folder for results.json, results.md, junit xml and logs")
    ap.add_argument("--dry-run", action="store_true", help="every phase in a tiny form on the CPU: checks the script")
    ap.add_argument("--time-limit", type=float, default=None,
                    help=f"total seconds, shared among the phases (default {GPU_TIME_LIMIT:.0f}; "
                    f"{DRY_TIME_LIMIT:.0f} with --dry-run)")
    ap.add_argument("--phases", nargs="+", choices=PHASE_NAMES, default=PHASE_NAMES, help="run only these phases")
    ap.add_argument("--bench-warmup", type=int, default=2, help="untimed calls before each benchmark timing (GPU)")
    ap.add_argument("--bench-repeats", type=int, default=5, help="timed calls per benchmark figure (GPU)")
    ap.add_argument("--phase", choices=["benchmark", "sync"], help=argparse.SUPPRESS)  # internal: run one phase here
    ap.add_argument("--phase-seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.output)
    if args.phase:  # a child process running one phase
        out_dir.mkdir(parents=True, exist_ok=True)
        if args.phase == "benchmark":
            res = phase_benchmark(out_dir, dry_run=args.dry_run, seconds=args.phase_seconds,
                                  warmup=args.bench_warmup, repeats=args.bench_repeats)
        else:
            res = phase_sync(out_dir, dry_run=args.dry_run, seconds=args.phase_seconds)
        return 0 if res["status"] == "passed" else 1

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check.py: error: no CUDA GPU is available on this machine (torch.cuda.is_available() is False); "
              "run it on a machine with an NVIDIA GPU, or pass --dry-run to exercise every phase on the CPU at tiny sizes",
              file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    limit = args.time_limit or (DRY_TIME_LIMIT if args.dry_run else GPU_TIME_LIMIT)
    mode = "dry-run" if args.dry_run else "gpu"
    log(f"gpu_check ({mode}): output {out_dir}, time limit {limit:.0f} s, phases {' '.join(args.phases)}")
    report = {
        "tool": "examples/gpu_check.py",
        "mode": mode,
        "status": "running",
        "time_limit_s": limit,
        "environment": environment(args.dry_run),
        "phases": {},
    }
    env = report["environment"]
    log(f"device {env['device']}; torch {env['torch']} (CUDA {env['cuda_version']}), triton {env['triton']}, "
        f"torchvision {env['torchvision']}")

    def save():
        report["wall_s"] = elapsed()
        write_json(out_dir / "results.json", report)
        (out_dir / "results.md").write_text(markdown(report))

    phases = [p for p in PHASES if p[0] in args.phases]
    shares = {p[0]: p[5] if args.dry_run else p[4] for p in phases}
    available = max(0.0, limit - elapsed())  # the start-up so far comes off every phase's share
    budgets = {name: available * share / sum(shares.values()) for name, share in shares.items()}
    save()
    try:
        for i, (name, kind, gpu_sel, dry_sel, _, _) in enumerate(phases):
            reserved = sum(budgets[p[0]] for p in phases[i + 1:])
            timeout_s = max(5.0, limit - elapsed() - reserved)
            log(f"phase {name}: starting (budget {timeout_s:.0f} s)")
            entry = {"name": name, "kind": kind, "status": "running", "timeout_s": timeout_s}
            report["phases"][name] = entry
            if kind == "pytest":
                entry.update(run_pytest_phase(name, dry_sel if args.dry_run else gpu_sel, out_dir=out_dir,
                                              timeout_s=timeout_s, dry_run=args.dry_run))
            else:
                entry.update(run_child_phase(name, out_dir=out_dir, timeout_s=timeout_s, dry_run=args.dry_run))
            log(f"phase {name}: {entry['status']} in {entry['seconds']:.1f} s: {phase_summary(entry)}")
            save()
    except KeyboardInterrupt:
        report["interrupted"] = True
        log("interrupted")
    failed = [n for n, ph in report["phases"].items() if ph["status"] != "passed"]
    missing = [p[0] for p in phases if p[0] not in report["phases"]]
    report["status"] = "failed" if failed or missing else "passed"
    report["failed_phases"] = failed + missing
    save()
    log(f"done: {report['status']}" + (f" (failed: {', '.join(failed + missing)})" if failed or missing else "")
        + f"; wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    return 0 if report["status"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
