"""``maskrcnn-engine``: the command line (also ``python -m engine.cli``).

    maskrcnn-engine predict INPUT... --output DIR [--weights W] [--family F] [--class-names FILE]
        [--device D] [--precision P] [--batch-size B] [--score-threshold S] [--mask-format full|box]
        [--max-pixels N] [--decode-budget MIB] [--decode-workers N] [--format jsonl|parquet]
        [--rows-per-shard N] [--retry-errors] [--force] [--no-progress]
        [--ray [ADDRESS]] [--workers N] [--verbose]
    maskrcnn-engine to-coco DIR [--output FILE] [--annotations ANN.json] [--category-map MAP.json]

``predict`` runs a checkpoint over image files (see :mod:`engine.batch_job`): without
``--weights``, the bundled shapes model. Rerunning it on the same ``--output`` resumes. With
``--ray`` the job runs as a Ray Data pipeline (:mod:`engine.ray_job`) on the cluster at ADDRESS,
or on a local one started for the run. ``to-coco`` turns a run's output folder into a COCO
results file (:mod:`engine.coco_results`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose mistakes print one line: what was wrong and where to look."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.HelpFormatter):
    """--help shows every default: the value, or the help text's own words where the default
    is decided at run time (those say "default: ...")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or action.required:
            return text
        return f"{text} (default: %(default)s)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def _max_pixels(text: str) -> int:
    try:
        value = int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a pixel count (0: no limit); got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: no limit); got {value}")
    return value


def _score(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1; got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1; got {value}")
    return value


def _add_predictor_options(parser: argparse.ArgumentParser, *, mask_format: str) -> None:
    """The options that build the Predictor (:func:`_build_predictor`), the same for predict and serve."""
    parser.add_argument("--weights", help="checkpoint file (default: the bundled shapes model)")
    parser.add_argument("--family", choices=("torchvision", "detectron2", "mmdetection", "matterport"), help="checkpoint family, if it cannot be told from the file (default: detected)")
    parser.add_argument("--class-names", metavar="FILE", help="the foreground class names, one per line in label order (default: those the checkpoint carries, or COCO's for COCO-sized heads, or 'class i')")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="arithmetic of the network")
    parser.add_argument(
        "--score-threshold", type=_score, default=None,
        help="keep detections scoring above this (default: the checkpoint family's own: 0.05, matterport 0.7)",
    )
    parser.add_argument("--mask-format", default=mask_format, choices=("full", "box"), help="box: masks kept as box crops (less memory, the same RLEs)")


def _parser() -> argparse.ArgumentParser:
    from engine.image_files import DEFAULT_MAX_PIXELS

    parser = _Parser(prog="maskrcnn-engine", description="Mask R-CNN checkpoints over many images.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = commands.add_parser(
        "predict",
        formatter_class=_Help,
        help="predict instance masks for image files; results as JSON lines, resumable",
        description="Runs a checkpoint over files, folders (recursive), glob patterns and @list.txt files. "
        "Writes predictions.jsonl, errors.jsonl and run.json in --output; a rerun skips what is done. "
        "One run writes an output folder at a time (a second one is refused), and a rerun with other "
        "settings (weights, thresholds, precision, mask format, class names) is refused unless --force.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, glob patterns or @list.txt")
    p.add_argument("--output", "-o", required=True, help="output folder (created; reused to resume)")
    _add_predictor_options(p, mask_format="full")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="images per forward pass")
    p.add_argument("--max-pixels", type=_max_pixels, default=DEFAULT_MAX_PIXELS, help="larger images (by their header) are errors, never decoded; 0: no limit")
    p.add_argument("--decode-budget", type=_positive_int, default=1024, metavar="MIB", help="MiB of decoded images held at once (a larger batch is decoded alone)")
    p.add_argument("--decode-workers", type=_positive_int, default=4, help="image decoding threads")
    p.add_argument("--format", default="jsonl", choices=("jsonl", "parquet"), help="predictions.jsonl, or Parquet shards in predictions.parquet/")
    p.add_argument("--rows-per-shard", type=_positive_int, default=1000, help="with --format parquet: images per shard")
    p.add_argument("--retry-errors", action="store_true", help="on a resume, retry the transient errors (files that could not be read)")
    p.add_argument("--force", action="store_true", help="add to an output folder written with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
        help="run on Ray Data: the cluster at ADDRESS ('auto', 'ray://host:10001'), or a local one without ADDRESS",
    )
    p.add_argument("--workers", type=_positive_int, default=1, help="with --ray: predictor actors (one GPU each on GPU nodes)")
    p.add_argument("--verbose", action="store_true", help="with --ray: show Ray's own logs and progress")
    s = commands.add_parser(
        "serve",
        formatter_class=_Help,
        help="serve a checkpoint over HTTP: the Open Inference Protocol (KServe v2) and POST /predict",
        description="Serves a checkpoint over HTTP with dynamic batching (images of one padded canvas share a "
        "forward pass, so an answer never depends on the other requests). Ready when GET /v2/health/ready says so. "
        "Needs the serve extra: pip install 'maskrcnn-engine[serve]'.",
    )
    s.add_argument("--model-name", help="the model's name in the protocol's paths (default: the weights file's stem)")
    _add_predictor_options(s, mask_format="box")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (put a TLS proxy in front to expose it)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--max-batch-size", type=_positive_int, default=8, help="images per forward pass at most")
    s.add_argument("--max-delay-ms", type=float, default=5.0, help="ms a batch waits for company after its first image")
    s.add_argument("--max-queue", type=_positive_int, default=64, help="images waiting at most; more get 503 with Retry-After")
    s.add_argument("--max-body-mb", type=float, default=32.0, help="request bodies over this get 413")
    s.add_argument("--max-pixels", type=_max_pixels, default=100_000_000, help="images over this (by their header) get 413; 0: no limit")
    s.add_argument("--api-key-file", metavar="FILE", help="a file holding the key every endpoint but the health checks wants as 'Authorization: Bearer KEY' (default: no key)")
    c = commands.add_parser(
        "to-coco",
        formatter_class=_Help,
        help="a predict run's output folder as a COCO results file (for COCO.loadRes / COCOeval)",
        description="Reads predictions.jsonl or predictions.parquet/ of a predict run (finished, interrupted or "
        "running: it only reads) and writes the COCO results list. With --annotations, image ids come from "
        "the data set's file names and category ids from its category names.",
    )
    c.add_argument("run_dir", metavar="DIR", help="the --output folder of a predict run")
    c.add_argument("--output", "-o", help="results file (default: DIR/coco_results.json)")
    c.add_argument("--annotations", help="the data set's COCO annotation file (image ids by file_name, category ids by name)")
    c.add_argument("--category-map", help='JSON file {"label": category_id, ...}, overriding the lookup by name')
    return parser


class CommandError(Exception):
    """A mistake of the command line's user: printed as one line, exit status 2."""


def _job_options(args: argparse.Namespace):
    from engine.batch_job import JobOptions

    return JobOptions(
        batch_size=args.batch_size, decode_workers=args.decode_workers, progress=not args.no_progress,
        format=args.format, rows_per_shard=args.rows_per_shard, max_pixels=args.max_pixels or None,
        decode_budget=args.decode_budget << 20, retry_errors=args.retry_errors, force=args.force,
    )


def _check_extras(args: argparse.Namespace) -> None:
    try:
        import pycocotools.mask  # noqa: F401  (the masks are written as COCO RLE)
    except ImportError:
        raise CommandError("predict writes masks as COCO RLE with pycocotools: pip install 'maskrcnn-engine[coco]'") from None
    if args.format == "parquet":
        from engine.job_outputs import import_pyarrow

        try:
            import_pyarrow()
        except ImportError as exc:
            raise CommandError(str(exc)) from None


def _build_predictor(args: argparse.Namespace, device: str):
    """The command's :class:`engine.Predictor` and the weights file it reads."""
    from engine import Predictor

    if args.weights and not Path(args.weights).is_file():
        raise CommandError(f"--weights {args.weights}: no such file")
    if args.class_names and not Path(args.class_names).is_file():
        raise CommandError(f"--class-names {args.class_names}: no such file (one class name per line)")
    options = dict(device=device, precision=args.precision, score_threshold=args.score_threshold, mask_format=args.mask_format)
    if args.class_names:
        options["class_names"] = Path(args.class_names)
    if args.weights:
        return Predictor(args.weights, family=args.family, **options), Path(args.weights)
    from engine.bundled import shapes_model, shapes_predictor

    return shapes_predictor(**options), Path(shapes_model().checkpoint)


def _settings_and_record(args: argparse.Namespace, predictor, weights: Path, device: str) -> tuple[dict, dict]:
    """The job's settings (checked on a resume) and the other entries of ``run.json``."""
    from engine.batch_job import job_settings
    from weights.bundled import file_sha256

    sha256 = file_sha256(weights)
    settings = job_settings(
        weights_sha256=sha256, family=predictor.family, config=predictor.config, precision=args.precision,
        mask_format=args.mask_format, class_names=predictor.class_names, category_ids=predictor.coco_category_ids,
    )
    record = {"weights": str(weights), "weights_sha256": sha256, "family": predictor.family, "device": device, "num_classes": predictor.num_classes}
    return settings, record


def predict(args: argparse.Namespace) -> int:
    from engine.batch_job import collect_inputs, run_job

    _check_extras(args)
    try:
        inputs = collect_inputs(args.inputs)
    except (FileNotFoundError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    if not inputs:
        raise CommandError("no images found in the inputs")
    _quiet_decoder_logs()
    if args.ray is not None:
        return _predict_on_ray(args, inputs)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    predictor, weights = _build_predictor(args, device)
    settings, record = _settings_and_record(args, predictor, weights, device)
    summary = run_job(
        predictor, inputs, Path(args.output), options=_job_options(args), class_names=settings["class_names"],
        category_ids=predictor.coco_category_ids, record=record, settings=settings,
    )
    print(summary.line())
    return 0


def _quiet_decoder_logs() -> None:
    """OpenCV logs each undecodable file to stderr; the job writes it to errors.jsonl instead."""
    import cv2

    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except AttributeError:  # an OpenCV build without the logging utilities
        pass


def _predict_on_ray(args: argparse.Namespace, inputs) -> int:
    from engine.ray_job import PredictorSpec, init_ray, run_ray_job

    address = None if args.ray == "local" else args.ray
    # the driver reads the checkpoint once (before Ray starts: a bad file stops here), for the
    # settings and the names the actors write
    predictor, weights = _build_predictor(args, "cpu")
    ray = init_ray(address, verbose=args.verbose)
    device = args.device or ("cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu")
    settings, record = _settings_and_record(args, predictor, weights, device)
    names, category_ids = settings["class_names"], predictor.coco_category_ids
    del predictor
    spec = PredictorSpec(
        weights=args.weights, family=args.family, device=device, precision=args.precision,
        score_threshold=args.score_threshold, mask_format=args.mask_format,
    )
    summary = run_ray_job(
        spec, inputs, Path(args.output), address=address, workers=args.workers, options=_job_options(args),
        class_names=names, category_ids=category_ids, record=record, settings=settings, verbose=args.verbose,
    )
    print(summary.line())
    return 0


def to_coco_command(args: argparse.Namespace) -> int:
    import json

    from engine.coco_results import to_coco

    run_dir = Path(args.run_dir)
    destination = Path(args.output) if args.output else run_dir / "coco_results.json"
    category_map = None
    try:
        if args.category_map:
            category_map = json.loads(Path(args.category_map).read_text())
            if not isinstance(category_map, dict):
                raise ValueError(f"--category-map must hold a JSON object {{label: category_id}}; got {type(category_map).__name__}")
        written = to_coco(run_dir, destination, annotations=args.annotations, category_map=category_map)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        raise CommandError(str(exc)) from None
    extra = f"; image ids in {written['images_index']}" if written["images_index"] else ""
    print(f"{written['detections']} detections of {written['images']} images in {written['results']}{extra}")
    return 0


def serve_command(args: argparse.Namespace) -> int:
    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise CommandError("serve needs its extra: pip install 'maskrcnn-engine[serve]'") from None
    from engine.serve.app import ServeOptions, create_app
    from engine.serve.server import run_server

    api_key = None
    if args.api_key_file:
        try:
            api_key = Path(args.api_key_file).read_text().strip()
        except OSError as exc:
            raise CommandError(f"--api-key-file {args.api_key_file}: {exc.strerror or exc}") from None
        if not api_key:
            raise CommandError(f"--api-key-file {args.api_key_file} is empty")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    predictor, weights = _build_predictor(args, device)
    name = args.model_name or weights.stem
    options = ServeOptions(
        model_name=name, max_batch_size=args.max_batch_size, max_delay_ms=args.max_delay_ms, max_queue=args.max_queue,
        max_body_mb=args.max_body_mb, max_pixels=args.max_pixels or None, api_key=api_key,
    )
    print(f"serving {name} ({predictor.family}, {device}) on http://{args.host}:{args.port}/v2/models/{name}", flush=True)
    run_server(create_app(predictor, options), host=args.host, port=args.port)
    return 0


def main(argv=None) -> int:
    """Runs a command; a user's mistake (a missing file, no CUDA, an unreadable checkpoint, an
    output folder in use or written with other settings) prints one ``error:`` line, exit 2."""
    from engine.job_outputs import OutputBusyError, SettingsMismatchError
    from weights.errors import CheckpointError

    args = _parser().parse_args(argv)
    try:
        if args.command == "predict":
            return predict(args)
        if args.command == "to-coco":
            return to_coco_command(args)
        if args.command == "serve":
            return serve_command(args)
    except (CommandError, CheckpointError, OutputBusyError, SettingsMismatchError) as exc:
        return _fail(str(exc))
    except RuntimeError as exc:
        if "CUDA" in str(exc) or "device" in str(exc):  # resolve_device: no CUDA, or no such device
            return _fail(str(exc).replace("use device='cpu'", "use --device cpu"))
        raise
    except OSError as exc:  # an output that is a file, a full disk, no permission: the system's own words
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}")
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    return 2  # pragma: no cover - argparse refuses other commands


def _fail(message: str) -> int:
    print(f"error: {message.splitlines()[0] if message else 'failed'}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
