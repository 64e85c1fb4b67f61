"""The HTTP application of ``maskrcnn-engine serve``: the Open Inference Protocol (KServe v2) and
``POST /predict`` over one :class:`engine.Predictor`, with dynamic batching
(:mod:`engine.serve.batcher`), limits checked before decoding, and Prometheus metrics.

Endpoints (KServe v2, as Triton Inference Server, KServe, Seldon MLServer speak it):

- ``GET /v2/health/live``, ``GET /v2/health/ready``: 200 or 503; no key needed.
- ``GET /v2/models/{name}``: the model's metadata (inputs, outputs, datatypes, shapes).
- ``GET /v2/models/{name}/ready``.
- ``POST /v2/models/{name}/infer``: JSON tensors, or the binary tensor data extension
  (``Inference-Header-Content-Length``) as ``tritonclient.http`` sends them. One input:
  ``image`` (``BYTES`` [1]: an encoded JPEG/PNG/WebP/BMP/TIFF; base64 text in JSON form) or
  ``pixels`` (``UINT8`` [H, W, 3], RGB). Request parameter ``score_threshold`` keeps only
  detections scoring at least that. Outputs: ``boxes`` (``FP32`` [N, 4], x1 y1 x2 y2 in the
  image's pixels), ``scores`` (``FP32`` [N]), ``labels`` (``INT64`` [N]), ``class_names``
  (``BYTES`` [N]) and ``masks`` (``BYTES`` [N], each a COCO compressed RLE as JSON text).
- ``POST /predict``: the image file as the body; back, JSON in the form of a line of
  ``predictions.jsonl`` (``height``, ``width``, ``detections`` with COCO ``bbox``, ``score``,
  ``category_id``, ``category_name``, RLE ``segmentation``).
- ``GET /metrics``: Prometheus text.

Errors come back as ``{"error": message}`` with a status that says whose fault it was: 400 (bad
input), 401 (key), 404 (no such model), 413 (body or pixels over the limits), 503 (queue full,
with ``Retry-After``, or shutting down), 500 (the model failed on that batch).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import struct
import time
from dataclasses import dataclass

import numpy as np

__all__ = ["ServeOptions", "create_app"]


@dataclass(frozen=True)
class ServeOptions:
    """What the server does besides the predictor's own settings (``maskrcnn-engine serve``)."""

    model_name: str = "model"
    max_batch_size: int = 8
    max_delay_ms: float = 5.0
    max_queue: int = 64
    max_body_mb: float = 32.0
    max_pixels: int | None = 100_000_000
    api_key: str | None = None


class HTTPError(Exception):
    """An answer other than 200: ``status`` and a message for the caller."""

    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


_OUTPUTS = [
    {"name": "boxes", "datatype": "FP32", "shape": [-1, 4]},
    {"name": "scores", "datatype": "FP32", "shape": [-1]},
    {"name": "labels", "datatype": "INT64", "shape": [-1]},
    {"name": "class_names", "datatype": "BYTES", "shape": [-1]},
    {"name": "masks", "datatype": "BYTES", "shape": [-1]},
]
_INPUTS = [
    {"name": "image", "datatype": "BYTES", "shape": [1]},
    {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, 3]},
]


class _Metrics:
    """The server's Prometheus metrics, in a registry of its own (Triton's names where one means the same)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("nv_inference_request", "Inference requests by outcome", ["outcome"], registry=self.registry)
        self.latency = Histogram("maskrcnn_request_seconds", "Request latency, arrival to answer", registry=self.registry)
        self.queue = Histogram("maskrcnn_queue_seconds", "Time an image waited for its batch", registry=self.registry)
        self.compute = Histogram("maskrcnn_compute_seconds", "Predictor.run time per batch", registry=self.registry)
        buckets = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
        self.batch_size = Histogram("maskrcnn_batch_size", "Images per batch", buckets=buckets, registry=self.registry)
        self.depth = Gauge("maskrcnn_queue_depth", "Images waiting for a batch", registry=self.registry)
        self.images = Counter("nv_inference_count", "Images predicted", registry=self.registry)

    def batch(self, stats) -> None:
        self.batch_size.observe(stats.size)
        self.compute.observe(stats.compute_seconds)
        self.images.inc(stats.size)
        for seconds in stats.queue_seconds:
            self.queue.observe(seconds)


def _decode(data: bytes, max_pixels: int | None) -> np.ndarray:
    from engine.image_files import ImageDecodeError, decode_image_bytes

    if not data:
        raise HTTPError(400, "empty image: send a JPEG, PNG, WebP, BMP or TIFF file")
    try:
        return decode_image_bytes(data, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        status = 413 if exc.reason == "too_large" else 400
        raise HTTPError(status, f"{exc} (accepted: JPEG, PNG, WebP, BMP or TIFF)") from None


def _bytes_elements(raw: bytes) -> list[bytes]:
    """BYTES tensor elements of the binary extension: each a 4-byte little-endian length, then its bytes."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise HTTPError(400, "malformed BYTES tensor: a length prefix is cut short")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise HTTPError(400, "malformed BYTES tensor: an element is longer than the data")
        out.append(raw[offset : offset + n])
        offset += n
    return out


def _bytes_tensor(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _parse_infer(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON part of an infer request and the binary data after it."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise HTTPError(400, "Inference-Header-Content-Length must be an integer") from None
        if not 0 <= n <= len(body):
            raise HTTPError(400, "Inference-Header-Content-Length is larger than the body")
        head, binary = body[:n], body[n:]
    else:
        head, binary = body, b""
    try:
        request = json.loads(head)
    except (ValueError, UnicodeDecodeError):
        raise HTTPError(400, "the request is not valid JSON") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise HTTPError(400, 'the request needs "inputs": a list of tensors')
    return request, binary


def _input_image(request: dict, binary: bytes, max_pixels: int | None) -> tuple[str, object]:
    """``("image", bytes)`` or ``("pixels", uint8 [H, W, 3])`` from the request's one input."""
    inputs = request["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise HTTPError(400, 'send exactly one input: "image" (BYTES [1]) or "pixels" (UINT8 [H, W, 3])')
    tensor = inputs[0]
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise HTTPError(400, f"input {name!r}: shape must be a list of non-negative integers")
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    raw = binary[:size] if size is not None else None
    if size is not None and len(raw) != size:
        raise HTTPError(400, f"input {name!r}: binary_data_size {size} is more than the data sent")
    if name == "image":
        if datatype != "BYTES" or shape != [1]:
            raise HTTPError(400, f'input "image" must be BYTES of shape [1]; got {datatype} {shape}')
        if raw is not None:
            elements = _bytes_elements(raw)
        else:
            data = tensor.get("data")
            if not isinstance(data, list) or len(data) != 1 or not isinstance(data[0], str):
                raise HTTPError(400, 'input "image" in JSON form: "data" holds one base64 string')
            try:
                elements = [base64.b64decode(data[0], validate=True)]
            except ValueError:
                raise HTTPError(400, 'input "image" in JSON form must be base64 text') from None
        if len(elements) != 1:
            raise HTTPError(400, f'input "image" must hold one element; got {len(elements)}')
        return "image", elements[0]
    if name == "pixels":
        if datatype != "UINT8" or len(shape) != 3 or shape[2] != 3 or shape[0] < 1 or shape[1] < 1:
            raise HTTPError(400, f'input "pixels" must be UINT8 of shape [H, W, 3]; got {datatype} {shape}')
        if max_pixels is not None and shape[0] * shape[1] > max_pixels:
            raise HTTPError(413, f"{shape[1]}x{shape[0]} pixels is over the limit of {max_pixels:,}")
        count = shape[0] * shape[1] * 3
        if raw is not None:
            if len(raw) != count:
                raise HTTPError(400, f'input "pixels": {len(raw)} bytes for shape {shape} ({count} expected)')
            array = np.frombuffer(raw, dtype=np.uint8)
        else:
            data = tensor.get("data")
            try:
                array = np.asarray(data, dtype=np.int64).reshape(-1)
            except (TypeError, ValueError):
                raise HTTPError(400, 'input "pixels": "data" must be a list of integers') from None
            if array.size != count or array.min(initial=0) < 0 or array.max(initial=0) > 255:
                raise HTTPError(400, f'input "pixels": {array.size} values in 0..255 expected {count}')
            array = array.astype(np.uint8)
        return "pixels", array.reshape(shape)
    raise HTTPError(400, f'unknown input {name!r}: send "image" (BYTES [1]) or "pixels" (UINT8 [H, W, 3])')


def _score_threshold(parameters) -> float | None:
    value = (parameters or {}).get("score_threshold")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise HTTPError(400, f"parameter score_threshold must be a number in [0, 1]; got {value!r}")
    return float(value)


def create_app(predictor, options: ServeOptions = ServeOptions()):
    """The Starlette application serving ``predictor`` (see the module docstring)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from engine.batch_job import detections_rows
    from engine.preprocess import resized_canvas
    from engine.serve.batcher import DynamicBatcher, QueueFullError

    metrics = _Metrics()
    max_body = int(options.max_body_mb * 2**20)
    batcher = DynamicBatcher(
        predictor.run, lambda h, w: resized_canvas((h, w), predictor.config),
        max_batch_size=options.max_batch_size, max_delay=options.max_delay_ms / 1000, max_queue=options.max_queue,
        on_batch=metrics.batch,
    )
    state = {"ready": False}
    names = list(predictor.class_names)
    category_ids = predictor.coco_category_ids

    def authorise(request: Request) -> None:
        if options.api_key is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {options.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise HTTPError(401, "missing or wrong API key: send Authorization: Bearer KEY")

    def check_model(name: str) -> None:
        if name != options.model_name:
            raise HTTPError(404, f"unknown model {name!r}; this server serves {options.model_name!r}")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise HTTPError(413, f"the body of {int(declared):,} bytes is over the limit of {max_body:,} (--max-body-mb)")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_body:
                raise HTTPError(413, f"the body is over the limit of {max_body:,} bytes (--max-body-mb)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def predict_image(image: np.ndarray):
        if not state["ready"]:
            raise HTTPError(503, "the server is shutting down", {"Retry-After": "1"})
        try:
            future = batcher.submit(image)
        except QueueFullError as exc:
            metrics.requests.labels("rejected").inc()
            raise HTTPError(503, f"server busy: {exc}; retry later", {"Retry-After": "1"}) from None
        metrics.depth.set(batcher.depth)
        try:
            return await future
        except Exception as exc:  # noqa: BLE001 - the model failed on this batch
            raise HTTPError(500, f"the model failed on this request's batch: {type(exc).__name__}: {exc}") from None

    def handler(endpoint, *, auth: bool = True):
        async def wrapped(request: Request):
            start = time.perf_counter()
            try:
                if auth:
                    authorise(request)
                response = await endpoint(request)
                if request.method == "POST":
                    metrics.requests.labels("success").inc()
                    metrics.latency.observe(time.perf_counter() - start)
                return response
            except HTTPError as error:
                if request.method == "POST" and error.status != 503:
                    metrics.requests.labels("failure").inc()
                return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)

        return wrapped

    async def live(request: Request):
        return JSONResponse({"live": True})

    async def ready(request: Request):
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    async def model_metadata(request: Request):
        check_model(request.path_params["name"])
        return JSONResponse({
            "name": options.model_name, "versions": ["1"], "platform": f"maskrcnn-engine/{predictor.family}",
            "inputs": _INPUTS, "outputs": _OUTPUTS,
        })

    async def model_ready(request: Request):
        check_model(request.path_params["name"])
        return JSONResponse({"name": options.model_name, "ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    async def infer(request: Request):
        check_model(request.path_params["name"])
        body = await read_body(request)
        infer_request, binary = _parse_infer(body, request.headers.get("inference-header-content-length"))
        threshold = _score_threshold(infer_request.get("parameters"))
        kind, value = _input_image(infer_request, binary, options.max_pixels)
        image = await asyncio.to_thread(_decode, value, options.max_pixels) if kind == "image" else value
        det = (await predict_image(image)).to("cpu")
        if threshold is not None:
            det = det[det.scores >= threshold]
        rles = await asyncio.to_thread(lambda: [json.dumps(r, separators=(",", ":")) for r in _rles(det)])
        labels = det.labels.tolist()
        tensors = {
            "boxes": ("FP32", [len(det), 4], det.boxes.numpy().astype(np.float32)),
            "scores": ("FP32", [len(det)], det.scores.numpy().astype(np.float32)),
            "labels": ("INT64", [len(det)], det.labels.numpy().astype(np.int64)),
            "class_names": ("BYTES", [len(det)], [names[i] if 0 <= i < len(names) else str(i) for i in labels]),
            "masks": ("BYTES", [len(det)], rles),
        }
        return _infer_response(infer_request, tensors, options.model_name)

    async def predict_file(request: Request):
        body = await read_body(request)
        image = await asyncio.to_thread(_decode, body, options.max_pixels)
        det = await predict_image(image)
        rows = await asyncio.to_thread(detections_rows, det, class_names=names, category_ids=category_ids)
        return JSONResponse({"height": int(image.shape[0]), "width": int(image.shape[1]), "detections": rows})

    async def metrics_text(request: Request):
        metrics.depth.set(batcher.depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False  # not ready: new requests get 503; those waiting finish
            await batcher.stop()

    routes = [
        Route("/v2/health/live", handler(live, auth=False)),
        Route("/v2/health/ready", handler(ready, auth=False)),
        Route("/v2/models/{name}", handler(model_metadata)),
        Route("/v2/models/{name}/ready", handler(model_ready)),
        Route("/v2/models/{name}/infer", handler(infer), methods=["POST"]),
        Route("/predict", handler(predict_file), methods=["POST"]),
        Route("/metrics", handler(metrics_text)),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.batcher, app.state.metrics = batcher, metrics
    return app


def _rles(det) -> list[dict]:
    """COCO RLEs of the detections' masks (full or box-local: the same RLEs)."""
    return [d["segmentation"] for d in det.to_coco(0)]


def _infer_response(request: dict, tensors: dict, model_name: str):
    """The KServe v2 response: JSON tensors, or with the binary extension those the request asked
    binary (``parameters.binary_data`` per output, or ``binary_data_output`` for all)."""
    from starlette.responses import JSONResponse, Response

    all_binary = bool((request.get("parameters") or {}).get("binary_data_output", False))
    asked = {o.get("name"): o for o in request.get("outputs") or [] if isinstance(o, dict)}
    unknown = set(asked) - set(tensors)
    if unknown:
        raise HTTPError(400, f"unknown outputs {sorted(unknown)}; this model gives {list(tensors)}")
    outputs, blobs = [], []
    for name in asked or tensors:
        datatype, shape, value = tensors[name]
        binary = bool(((asked.get(name) or {}).get("parameters") or {}).get("binary_data", all_binary))
        entry = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            blob = _bytes_tensor([v.encode() for v in value]) if datatype == "BYTES" else np.ascontiguousarray(value).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = list(value) if datatype == "BYTES" else np.asarray(value).reshape(-1).tolist()
        outputs.append(entry)
    payload = {"model_name": model_name, "model_version": "1", "outputs": outputs}
    if "id" in request:
        payload["id"] = request["id"]
    if not blobs:
        return JSONResponse(payload)
    head = json.dumps(payload).encode()
    return Response(
        head + b"".join(blobs), media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
