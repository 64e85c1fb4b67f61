"""``Predictor``: a checkpoint in, instance masks out.

    predictor = Predictor("maskrcnn_resnet50_fpn_coco.pth")   # CUDA when present, else CPU
    results = predictor.run(images)      # uint8 HxWx3 RGB arrays and/or image file paths, or one of them
    predictor.class_names[results[0].labels[0]]                # the name of a detection
    results[0].to_coco(image_id, category_ids=predictor.coco_category_ids)

    Predictor(weights, input_format="BGR").run(cv2.imread(path))   # OpenCV's BGR arrays, as Detectron2

The steps are kept apart, as in torchvision and Detectron2: :meth:`Predictor.preprocess`
(normalise, resize, pad), the network stages of :class:`engine.model.MaskRCNN`, and
:func:`engine.postprocess.to_original_frame` (boxes to the input frame, mask paste-back).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from engine.backbone import fold_frozen_batch_norms
from engine.class_names import coco_category_ids, default_class_names, load_class_names
from engine.config import MaskRCNNConfig
from engine.cuda_graphs import GraphedDenseNetwork
from engine.host_memory import reusing_freed_memory
from engine.inputs import as_rgb_uint8_images
from engine.model import CPU_PRECISION_NEEDS, cpu_has_fast_kernels
from engine.loading import build_model, checkpoint_config, load_checkpoint
from engine.postprocess import MASK_FORMATS, padded_to_original_frame
from engine.preprocess import ImageBatch, preprocess, resized_canvas
from engine.results import Detections


# the steps of one padded batch, as :meth:`Predictor.profile_stages` times them
STAGES = ("preprocess", "backbone+fpn", "rpn", "box head + detection", "mask head", "paste")

#: channel orders :class:`Predictor` takes arrays in (``input_format``)
INPUT_FORMATS = ("RGB", "BGR")


def default_device() -> torch.device:
    """The device used when none is given: ``cuda`` when CUDA is available, else ``cpu`` (the
    same default as the ``maskrcnn-engine`` command and the examples)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A torch.device (None: :func:`default_device`), with a clear error when CUDA is asked for and absent."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} was requested but CUDA is not available on this machine; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
    return dev


def validate_images(images) -> list[np.ndarray]:
    """The caller's images as C-contiguous uint8 [H, W, 3] RGB numpy arrays, one per image.

    A thin wrapper of :func:`engine.inputs.as_rgb_uint8_images`, which holds the rules: one image
    or a list/tuple; numpy arrays or torch tensors; grayscale, RGB, RGBA, CHW tensors; uint8,
    uint16, bool, float and in-range integer dtypes. The inputs are never modified; clear
    TypeError/ValueError naming the image otherwise.
    """
    return as_rgb_uint8_images(images)


def _is_path(image) -> bool:
    return isinstance(image, (str, os.PathLike))


def _check_max_pixels(max_pixels) -> int | None:
    if max_pixels is None:
        return None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 0:
        raise ValueError(f"max_pixels must be None (the default cap), 0 (no limit) or a positive int; got {max_pixels!r}")
    return max_pixels


def padded_size_groups(images: Sequence[np.ndarray], config) -> list[list[int]]:
    """Indices of ``images`` ([H, W, 3] arrays) grouped by the padded size each has alone under
    ``config`` (:func:`engine.preprocess.resized_canvas`), groups in order of their first image."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(resized_canvas(image.shape[:2], config), []).append(i)
    return list(groups.values())


def _check_cpu_compile(device: torch.device) -> None:
    """Refuse ``cpu_compile=True`` where it cannot run: a CUDA device, or no C++ compiler."""
    if device.type != "cpu":
        raise ValueError(
            f"cpu_compile=True compiles the network for the CPU and needs device='cpu'; got device={str(device)!r} "
            "(on CUDA, cuda_graph=True replays the dense part from CUDA graphs)"
        )
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as error:  # inductor's own message says which compilers it looked for
        raise RuntimeError(f"cpu_compile=True needs a C++ compiler for torch.compile's CPU code (inductor): {error}") from error


class Predictor:
    """Runs a pretrained Mask R-CNN checkpoint on batches of images.

    Args:
        weights: path to a checkpoint file (torchvision ``.pth`` state dict, Detectron2 ``.pkl`` or
            ``.pth``, mmdetection ``.pth``, matterport Keras ``.h5``), or the loaded state dict /
            container itself (not modified). The bundled shapes model: :func:`engine.bundled.shapes_predictor`.
        family: "torchvision", "detectron2", "mmdetection" or "matterport"; by default detected from the checkpoint's keys.
        device: "cpu", "cuda" or "cuda:N"; None (default): "cuda" when CUDA is available, else
            "cpu" (:func:`default_device`, as the command line and the examples). On CUDA the
            post-processing runs the Triton kernels; on CPU (or with ``ENGINE_FORCE_REFERENCE=1``)
            their PyTorch references.
        input_format: "RGB" (default) or "BGR": the channel order of the arrays given to
            :meth:`run`. "BGR" takes ``cv2.imread`` arrays as they are and gives the detections
            their RGB twin gives with "RGB", as Detectron2's ``DefaultPredictor.__call__``
            (detectron2/engine/defaults.py: BGR in, flipped when ``cfg.INPUT.FORMAT``, the
            model's order, is "RGB") and mmdetection's ``inference_detector`` on arrays (BGR,
            ``bgr_to_rgb`` in the data preprocessor) do. The model's own order is
            ``config.channel_order``, not this. The swap costs nothing extra: pre-processing
            already reorders the uint8 pixels for networks that want BGR, and now does so exactly
            when the input's order differs from the network's. Image files given by path are
            decoded as RGB whatever this says: input_format is about arrays only.
        class_names: names of the checkpoint's foreground classes in label order, without the
            background (as Detectron2's ``thing_classes`` and mmdetection's ``classes``): a
            sequence, a comma-separated string, or a text file with one per line (a path;
            :func:`engine.class_names.load_class_names`). By default the names the checkpoint
            carries (mmdetection's ``meta``), else the family's default
            (:func:`engine.class_names.default_class_names`). See :attr:`class_names`.
        max_pixels: image files given to :meth:`run` by path with more than this many pixels are
            refused before decoding (:func:`engine.image_files.decode_image_file`); None
            (default): ``engine.image_files.DEFAULT_MAX_PIXELS`` (about 179 megapixels,
            Pillow's decompression-bomb limit); 0: no limit.
        precision: "fp32" (default; exact parity with the checkpoint's framework), or "bf16" /
            "fp16" (fast mode): backbone, FPN and heads in reduced precision, channels-last, batch
            norms folded into the convolutions; on a CPU without oneDNN kernels for it
            (bf16: AVX512-BF16 or AMX; fp16: AVX512-FP16 or AMX-FP16) a warning, and fp32;
            box decoding, NMS and the kernels stay float32.
        config: full configuration; by default the checkpoint family's preset (torchvision
            ``maskrcnn_resnet50_fpn``, batch-norm eps read from the file).
        score_threshold, nms_threshold, detections_per_image, mask_threshold: override those
            fields of the configuration.
        mask_format: "full" (bool [N, H, W] masks) or "box" (:class:`engine.results.BoxMasks`:
            each mask kept only inside its pasted box, expanded on demand; for very large images
            or many detections).
        max_chunk_bytes: paste at most this many output bytes per launch (default: from free memory).
        cuda_graph: replay the dense part of the network (backbone, FPN, RPN head) from CUDA graphs,
            one captured per input shape (:mod:`engine.cuda_graphs`); the results are the eager
            ones. CUDA only: on CPU it is a ValueError.
        reuse_host_memory: on the CPU, under Linux with glibc, let :meth:`run` reuse the large
            blocks it frees instead of taking fresh pages from the kernel for each
            (:mod:`engine.host_memory`: 1.07-1.15x on an fp32 R50-FPN batch of 4, same results, about
            0.5 GiB more peak resident memory during the run). False keeps the process's malloc
            settings untouched.
        cpu_compile: on the CPU, run the backbone, FPN, RPN head and the box and mask heads through
            ``torch.compile`` (inductor, weights frozen; :meth:`engine.model.MaskRCNN.compile_networks`).
            Opt-in speed mode: the first runs of new input shapes compile (tens of seconds each),
            the results differ from the default's by float32 rounding (BENCHMARKS.md), and it needs
            a C++ compiler. CPU only: on CUDA it is a ValueError (``cuda_graph`` is the CUDA mode).

    Attributes:
        class_names: tuple of str indexed by label, so that ``class_names[label]`` names a
            detection, with background handled as :func:`engine.class_names.default_class_names`
            does: background-first layouts (torchvision, matterport) have an entry per
            classifier output, "__background__" at 0 (torchvision's COCO file: its 91 slots,
            "N/A" at the ids COCO left unused); background-last layouts (Detectron2,
            mmdetection) have only the K foreground names, labels 0..K-1 (the background's
            index K is never a label).
        coco_category_ids: None, or a tuple indexed by label giving the COCO category id, for
            :meth:`engine.results.Detections.to_coco` (``category_ids=``):
            :func:`engine.class_names.coco_category_ids` of :attr:`class_names`. None where the
            label is the id: torchvision's 91-slot COCO layout, and every model whose names are
            not the 80 COCO classes (a fine-tuned model's own classes); the 80-to-91 table for
            the 80-class COCO layouts (Detectron2 and mmdetection labels 0..79, matterport
            labels 1..80).
        input_format: "RGB" or "BGR", the channel order of arrays given to :meth:`run`.
        device, config, family, mask_format: as given or resolved.
    """

    def __init__(
        self,
        weights: str | os.PathLike | Mapping[str, Tensor],
        *,
        family: str | None = None,
        device: str | torch.device | None = None,
        input_format: str = "RGB",
        class_names: str | os.PathLike | Sequence[str] | None = None,
        max_pixels: int | None = None,
        precision: str = "fp32",
        config: MaskRCNNConfig | None = None,
        score_threshold: float | None = None,
        nms_threshold: float | None = None,
        detections_per_image: int | None = None,
        mask_threshold: float | None = None,
        mask_format: str = "full",
        max_chunk_bytes: int | None = None,
        cuda_graph: bool = False,
        reuse_host_memory: bool = True,
        cpu_compile: bool = False,
    ) -> None:
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {', '.join(map(repr, MASK_FORMATS))}; got {mask_format!r}")
        self.mask_format = mask_format
        self.max_chunk_bytes = max_chunk_bytes
        if not isinstance(input_format, str) or input_format not in INPUT_FORMATS:
            raise ValueError(
                f'input_format must be "RGB" or "BGR" (the channel order of the arrays given to run(); '
                f"cv2.imread gives BGR, as Detectron2's DefaultPredictor takes); got {input_format!r}"
            )
        self.input_format = input_format
        self.max_pixels = _check_max_pixels(max_pixels)
        self._pixel_configs: tuple[MaskRCNNConfig, MaskRCNNConfig] | None = None
        self.device = resolve_device(device)
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be True or False; got {cuda_graph!r}")
        if not isinstance(reuse_host_memory, bool):
            raise TypeError(f"reuse_host_memory must be True or False; got {reuse_host_memory!r}")
        self.reuse_host_memory = reuse_host_memory and self.device.type == "cpu"
        if not isinstance(cpu_compile, bool):
            raise TypeError(f"cpu_compile must be True or False; got {cpu_compile!r}")
        if cpu_compile:
            _check_cpu_compile(self.device)
        self.cpu_compile = cpu_compile
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True captures CUDA graphs and needs device='cuda'; got device={str(self.device)!r}")
        if precision in CPU_PRECISION_NEEDS and self.device.type == "cpu" and not cpu_has_fast_kernels(precision):
            warnings.warn(
                f"precision={precision!r}: this CPU has no oneDNN {precision} kernels (they need "
                f"{CPU_PRECISION_NEEDS[precision]}), where {precision} runs far slower than fp32; running fp32 instead",
                RuntimeWarning,
                stacklevel=2,
            )
            precision = "fp32"
        checkpoint = load_checkpoint(weights, family=family)
        config = checkpoint_config(checkpoint) if config is None else config
        overrides = {
            "score_threshold": score_threshold,
            "nms_threshold": nms_threshold,
            "detections_per_image": detections_per_image,
            "mask_threshold": mask_threshold,
        }
        changes = {k: v for k, v in overrides.items() if v is not None}
        self.config = config.replace(**changes) if changes else config
        self.family = checkpoint.family
        background, num_classes = self.config.background_index, checkpoint.spec.num_classes
        if class_names is not None:
            names = load_class_names(class_names, num_classes=num_classes, background=background)
        elif checkpoint.class_names is not None:  # foreground names in label order (mmdetection's meta; count checked there)
            names = [*(["__background__"] if background == "first" else []), *checkpoint.class_names]
        else:
            names = default_class_names(num_classes, background=background, family=self.family)
        self.class_names: tuple[str, ...] = tuple(names)
        self.coco_category_ids: tuple[int, ...] | None = coco_category_ids(self.class_names, background=background)
        self.model = build_model(checkpoint, config=self.config, precision=precision).to(self.device)
        if precision != "fp32" or self.config.fold_batch_norms:  # other roundings: no parity default
            fold_frozen_batch_norms(self.model)
        # on the CPU a host read costs nothing and cutting the padding saves the heads' work
        self.model.trim_padding = self.device.type != "cuda"
        if self.model.channels_last(self.device):
            self.model = self.model.to(memory_format=torch.channels_last)
        if cpu_compile:
            self.model.compile_networks()
        self._graphed = None
        if cuda_graph:
            self.model.autocast_cache = False
            self._graphed = GraphedDenseNetwork(self.model.dense_outputs)

    @property
    def num_classes(self) -> int:
        """Classifier outputs of the checkpoint, background included."""
        return self.model.spec.num_classes

    def _pixel_config(self) -> MaskRCNNConfig:
        """The configuration pre-processing runs with: :attr:`config`, with ``channel_order``
        standing for the reorder the input needs.

        :func:`engine.preprocess.preprocess` takes RGB and flips the uint8 channels when
        ``channel_order`` is "BGR" (the network wants BGR). BGR input for an RGB network needs
        the same flip, and BGR input for a BGR network none; so with ``input_format="BGR"`` the
        order is swapped here, and the pixels are reordered once or not at all (the means and
        stds stay in the network's order, which the flipped pixels then have).
        """
        if self.input_format == "RGB":
            return self.config
        cached = self._pixel_configs
        if cached is None or cached[0] is not self.config:
            swapped = "RGB" if self.config.channel_order == "BGR" else "BGR"
            cached = self._pixel_configs = (self.config, self.config.replace(channel_order=swapped))
        return cached[1]

    def _load_images(self, images) -> list[np.ndarray]:
        """The images of one :meth:`run` call as C-contiguous uint8 [H, W, 3] arrays in
        :attr:`input_format` order.

        ``images``: one image or a list/tuple of them, each an array or tensor
        (:func:`validate_images`) or an image file path (``str`` or ``os.PathLike``), decoded
        by :func:`engine.image_files.decode_image_file` with :attr:`max_pixels` as RGB, then put
        in :attr:`input_format` order (for "BGR" one uint8 copy, reordered back by
        pre-processing: what a path gives never depends on input_format).

        Raises:
            engine.image_files.ImageDecodeError (a ValueError): a file that is not a readable
                image, or over :attr:`max_pixels`; the message names ``images[i]`` and the path.
            OSError: a file that cannot be read.
            TypeError, ValueError: an array that is not an image (:func:`validate_images`).
        """
        if _is_path(images):
            images = [images]
        if isinstance(images, (list, tuple)) and any(_is_path(image) for image in images):
            images = [self._decode(image, i) if _is_path(image) else image for i, image in enumerate(images)]
        return validate_images(images)

    def _decode(self, path: str | os.PathLike, index: int) -> np.ndarray:
        """One image file -> uint8 [H, W, 3] in :attr:`input_format` order."""
        from engine.image_files import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image_file

        limit = DEFAULT_MAX_PIXELS if self.max_pixels is None else (self.max_pixels or None)
        try:
            image = decode_image_file(path, max_pixels=limit)
        except ImageDecodeError as error:
            raise ImageDecodeError(f"images[{index}] ({os.fspath(path)}): {error}", reason=error.reason, pixels=error.pixels) from error
        return image[:, :, ::-1] if self.input_format == "BGR" else image

    def preprocess(self, images) -> ImageBatch:
        """Images (any form :meth:`run` takes) -> the padded, normalised batch on the predictor's device."""
        return preprocess(self._load_images(images), config=self._pixel_config(), device=self.device)

    @torch.inference_mode()
    def run(self, images) -> list[Detections]:
        """Detect and segment instances.

        Args:
            images: one image or a list of images of any sizes, as uint8 numpy arrays [H, W, 3] in
                :attr:`input_format` order (RGB by default; "BGR" for ``cv2.imread`` arrays), or any
                form :func:`engine.inputs.as_rgb_uint8_images` converts (grayscale, RGBA/BGRA, CHW
                tensors, uint16 or float pixels), or image file paths (``str`` / ``os.PathLike``,
                mixed with arrays as wished), decoded as RGB whatever :attr:`input_format` says
                (:meth:`_load_images`). Not modified. They go through the
                backbone as one padded batch, or with ``config.batch_padding="by_size"`` (the
                mmdetection preset) as one batch per padded size, each image then padded as alone.

        Returns:
            One :class:`engine.results.Detections` per image (tensors on the predictor's device),
            in the order given; ``[]`` for an empty list.

        Raises:
            engine.image_files.ImageDecodeError (a ValueError), OSError: a path that cannot be
                read or decoded (the first one stops the call; decode files yourself with
                :func:`engine.image_files.decode_image_file` to skip bad ones).

        Host reads of device data: on CUDA exactly one per padded batch, whatever its size and family:
        the detections per image, read right before the masks are pasted so that they can be
        allocated at their real size (:func:`engine.postprocess.padded_to_original_frame`).
        Everything before it stays in fixed-size padded tensors with counts on the device. On
        the CPU two more reads (free there) cut the padding after the RPN and after the
        detections (``MaskRCNN.trim_padding``). ``tests/test_host_sync_audit.py`` counts them
        for every preset.
        """
        images = self._load_images(images)
        with self._host_memory_scope():
            return self._run_validated(images)

    def _host_memory_scope(self):
        """The scope of one run: :func:`~engine.host_memory.reusing_freed_memory` where
        ``reuse_host_memory`` is on (CPU), otherwise nothing."""
        return reusing_freed_memory() if self.reuse_host_memory else contextlib.nullcontext()

    def _run_validated(self, images: list[np.ndarray]) -> list[Detections]:
        """:meth:`run` on validated images: one padded batch, or one per padded size."""
        groups = [list(range(len(images)))] if self.config.batch_padding == "together" else padded_size_groups(images, self.config)
        if len(groups) == 1:
            return self._run_padded_batch(images)
        results = [None] * len(images)
        for group in groups:
            for i, detections in zip(group, self._run_padded_batch([images[i] for i in group])):
                results[i] = detections
        return results

    @torch.inference_mode()
    def profile_stages(self, images) -> tuple[list[Detections], dict[str, float]]:
        """:meth:`run` on ``images`` as one padded batch (whatever ``config.batch_padding``),
        with the seconds each of :data:`STAGES` took; on CUDA the device is synchronised
        between stages, so the figures are for profiling, not for the fastest run."""
        images = self._load_images(images)
        marks: list[float] = []
        with self._host_memory_scope():
            results = self._run_padded_batch(images, stage_marks=marks)
        return results, {name: b - a for name, a, b in zip(STAGES, marks, marks[1:])}

    def _run_padded_batch(self, images: list[np.ndarray], *, stage_marks: list[float] | None = None) -> list[Detections]:
        """:meth:`run` on validated images, as one padded batch; with ``stage_marks`` a clock
        reading is appended before the first of :data:`STAGES` and after each."""
        if not images:
            return []

        def mark() -> None:
            if stage_marks is not None:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                stage_marks.append(time.perf_counter())

        mark()
        batch = preprocess(images, config=self._pixel_config(), device=self.device)
        mark()
        model = self.model
        if self._graphed is not None:
            features, logits, deltas = self._graphed(batch.tensor)
            mark()
            proposals = model.padded_proposals(features, batch, head_outputs=(logits, deltas))
        else:
            features = model.features(batch)
            mark()
            proposals = model.padded_proposals(features, batch)
        mark()
        features = model.pooling_maps(features)  # once for both heads (and the NCHW maps freed on the CPU)
        detections = model.padded_detect(features, proposals, batch)
        mark()
        mask_probs = model.padded_mask_probabilities(features, detections, batch)
        mark()
        results = padded_to_original_frame(
            detections,
            mask_probs,
            image_sizes=batch.image_sizes,
            original_sizes=batch.original_sizes,
            config=self.config,
            mask_format=self.mask_format,
            max_chunk_bytes=self.max_chunk_bytes,
            windows=batch.windows,
        )
        mark()
        return results
