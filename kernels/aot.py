"""Ahead-of-time compilation of this package's Triton kernels for GPU targets, without a GPU.

Every ``@triton.jit`` kernel of :mod:`kernels` is compiled, in each specialisation the
engine launches on CUDA, to a cubin for ``sm_80`` (A100) and ``sm_90`` (H100/H200) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``. Passing the target
keeps Triton from asking a CUDA driver for the current device, so this runs on a machine
with no GPU and no driver; ``ptxas`` and ``cuobjdump`` come with the ``triton`` wheel.

For each compiled kernel :func:`kernel_resources` reports (see :class:`KernelResources`):
registers per thread, spill stores/loads (from the ``ptxas -v`` log of
Triton's own ``ptxas`` run, or on a Triton cache hit of a rerun of ``ptxas`` on the same
PTX with Triton's flags, checked to rebuild the cubin byte for byte), registers and stack
frame of the cubin itself (``cuobjdump --dump-resource-usage``, checked against the log),
dynamic shared memory (Triton's metadata) and the cubin's static shared memory (ptxas
adds 1 KB on sm_90 to kernels that use shared memory), per-thread local arrays (``.local``
declarations in the PTX; a stack frame beyond the spill slots would be one too), and the
theoretical occupancy from the SM limits in :data:`SM_LIMITS`.

Specialisations (:func:`kernel_specs`) are read from the launchers, not copied: RoIAlign
tiles from :func:`kernels.roi_align._tile` for every (mode, aligned, sampling ratio, output
size) of the configurations passed in (the engine's presets, :data:`engine.config.PRESETS`:
this package imports nothing from the engine, so the caller hands them over); paste from the launcher's
``_BLOCK_H`` / ``_BLOCK_W`` / ``_NUM_WARPS`` for every (method, mask threshold) of the
presets, with the CUDA path's ``EMULATE_FMA=False``, ``TORCH_CPU_SMALL_PATH=False``; NMS
from ``kernels.nms._CUDA_TILES``. Argument types and 16-divisibility follow what Triton's
JIT derives from the launchers' arguments (torch allocations are 16-byte aligned; ``C``,
the FPN width, is a multiple of 16). Full and crop paste modes launch the same binary
(the layout is run-time metadata), so each method is listed once.

Under ``TRITON_INTERPRET=1`` (which ``tests/conftest.py`` sets on machines without a GPU)
``@triton.jit`` gives interpreter objects that cannot be compiled; the compiles then run
in a child process without that variable (``python -m kernels.aot --specs-from-stdin``),
transparently.

Command line: ``python examples/kernel_report.py`` (the engine presets' specialisations: tables,
``--json``, ``--update-benchmarks``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

try:
    import triton

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    _HAS_TRITON = False

__all__ = [
    "ARCHES",
    "SM_LIMITS",
    "TARGETS",
    "KernelResources",
    "KernelSpec",
    "SmLimits",
    "Target",
    "compile_kernel",
    "default_jobs",
    "evaluate_targets",
    "kernel_resources",
    "kernel_specs",
    "markdown_table",
    "occupancy",
    "targets_table",
]

_REPO_ROOT = Path(__file__).resolve().parent.parent
_ALIGNED = 16  # bytes: torch's allocations, hence Triton's "D" (tt.divisibility = 16) specialisation


def _require_triton() -> None:
    if not _HAS_TRITON:
        raise RuntimeError(
            "kernels.aot compiles the Triton kernels and needs the `triton` package "
            "(pip install triton; Linux only). The kernels' PyTorch references do not need it."
        )


# --------------------------------------------------------------------------------------
# SM limits and occupancy
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmLimits:
    """Per-SM resources of one compute capability (CUDA programming guide, compute capabilities table)."""

    arch: int
    regs_per_sm: int = 65536
    max_regs_per_block: int = 65536
    max_regs_per_thread: int = 255
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    warp_alloc_granularity: int = 4  # warps per SM limited by registers are rounded down to a multiple of 4
    smem_per_sm: int = 164 * 1024
    smem_alloc_unit: int = 128
    reserved_smem_per_block: int = 1024  # the driver's system use, per block, on compute capability 8.0+

    @property
    def name(self) -> str:
        return f"sm_{self.arch}"


SM_LIMITS: dict[int, SmLimits] = {
    80: SmLimits(80, smem_per_sm=164 * 1024),  # A100
    90: SmLimits(90, smem_per_sm=228 * 1024),  # H100 / H200
}
ARCHES: tuple[int, ...] = tuple(SM_LIMITS)


def occupancy(registers: int, num_warps: int, shared_bytes: int, limits: SmLimits) -> tuple[int, float, str]:
    """Theoretical occupancy of a kernel: ``(blocks per SM, % of max warps, limiter)``.

    As NVIDIA's occupancy calculator computes it: registers per warp rounded up to
    ``reg_alloc_unit``, warps the register file holds rounded down to
    ``warp_alloc_granularity``, shared memory per block (``shared_bytes``: the kernel's
    dynamic + static shared memory, plus ``reserved_smem_per_block``) rounded up to
    ``smem_alloc_unit``, against the SM's warps, blocks and shared memory.
    ``limiter`` names the binding limit ("warps", "registers", "shared memory", "blocks").
    """
    by = {
        "blocks": limits.max_blocks_per_sm,
        "warps": limits.max_warps_per_sm // num_warps,
    }
    regs_per_warp = math.ceil(registers * 32 / limits.reg_alloc_unit) * limits.reg_alloc_unit
    if registers > limits.max_regs_per_thread or regs_per_warp * num_warps > limits.max_regs_per_block:
        by["registers"] = 0
    elif regs_per_warp > 0:
        warps = limits.regs_per_sm // regs_per_warp
        warps -= warps % limits.warp_alloc_granularity
        by["registers"] = warps // num_warps
    smem = shared_bytes + limits.reserved_smem_per_block
    smem = math.ceil(smem / limits.smem_alloc_unit) * limits.smem_alloc_unit
    if smem > 0:
        by["shared memory"] = limits.smem_per_sm // smem
    limiter = min(by, key=lambda k: (by[k], k != "warps"))  # ties: report warps (the block shape) first
    blocks = by[limiter]
    return blocks, 100.0 * blocks * num_warps / limits.max_warps_per_sm, limiter


# --------------------------------------------------------------------------------------
# Specialisations
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelSpec:
    """One specialisation of one kernel, as a launcher passes it on CUDA.

    ``signature``: the run-time arguments' Triton types (``"*fp32"``, ``"i32"``, ...);
    ``constexprs``: the compile-time arguments; ``divisible``: arguments Triton sees as
    16-divisible (16-byte-aligned pointers, ints that are multiples of 16); ``options``:
    the launch options (``num_warps``, ``enable_fp_fusion``); ``used_by``: where the
    engine launches it.
    """

    name: str
    family: str  # "roi_align", "paste" or "nms"
    module: str
    kernel: str
    signature: dict
    constexprs: dict
    divisible: tuple
    options: dict
    used_by: tuple = ()

    def key(self) -> tuple:
        """What determines the binary (two specs with the same key compile to the same cubin)."""
        return (
            self.module,
            self.kernel,
            tuple(self.signature.items()),
            tuple(sorted(self.constexprs.items())),
            tuple(sorted(self.divisible)),
            tuple(sorted(self.options.items())),
        )


_ROI_ALIGN_SIGNATURE = {
    "feat_ptr": "*fp32",
    "level_meta_ptr": "*i64",
    "level_f32_ptr": "*fp32",
    "rois_ptr": "*fp32",
    "out_ptr": "*fp32",
    "C": "i32",
    "B": "i32",
}
_PASTE_SIGNATURE = {
    "masks_ptr": "*fp32",
    "boxes_ptr": "*fp32",
    "meta_ptr": "*i64",
    "out_ptr": "*u8",  # the engine always thresholds: a uint8 buffer viewed as bool
    "M": "i32",  # do_not_specialize
    "PAD": "i32",  # do_not_specialize
    "box_scale": "fp32",
}
_NMS_MASK_SIGNATURE = {
    "boxes_ptr": "*fp32",
    "segment_ids_ptr": "*i32",
    "mask_ptr": "*i64",
    "N": "i32",
    "num_words": "i32",
    "iou_threshold": "fp32",
}
_NMS_GREEDY_SIGNATURE = {
    "mask_ptr": "*i64",
    "segment_ids_ptr": "*i32",
    "segment_bounds_ptr": "*i64",  # torch.searchsorted's int64 result
    "score_rank_ptr": "*i64",
    "removed_ptr": "*i64",
    "keep_ptr": "*i8",
    "N": "i32",
    "num_words": "i32",
}

_SEGMENTED_NMS_MASK_SIGNATURE = {
    "boxes_ptr": "*fp32",
    "counts_ptr": "*i32",
    "mask_ptr": "*i64",
    "S": "i32",
    "num_words": "i32",
    "iou_threshold": "fp32",
}
_SEGMENTED_NMS_GREEDY_SIGNATURE = {
    "mask_ptr": "*i64",
    "counts_ptr": "*i32",
    "removed_ptr": "*i64",
    "keep_ptr": "*i8",
    "G": "i32",
    "S": "i32",
    "num_words": "i32",
}


def _pointers(signature: dict) -> tuple:
    return tuple(k for k, v in signature.items() if v.startswith("*"))


def kernel_specs(presets, *, channels: int = 256, int_variants: bool = False) -> list[KernelSpec]:
    """Every distinct kernel specialisation the engine launches on CUDA, in a stable order.

    ``presets``: mapping of name to configuration (:class:`engine.config.MaskRCNNConfig`;
    pass ``engine.config.PRESETS``), of which the RoIAlign fields (``roi_mode``,
    ``box_pool_size``, ``mask_pool_size``, ``roi_sampling_ratio``, ``roi_aligned``) and the
    paste fields (``paste_method``, ``mask_threshold``) are read. ``channels``: the FPN width C
    (256 for every supported checkpoint family; the bundled shapes model has 128, which gives
    the same tiles). Specialisations that several presets share are listed once, ``used_by``
    naming them.

    Run-time integer arguments are taken in their general form. Triton's JIT also
    specialises an integer argument equal to 1 (it becomes a constant) and one that is a
    multiple of 16; ``int_variants=True`` adds the value-1 cases the engine meets often:
    RoIAlign with ``B == 1`` (one image per batch) and both NMS kernels with
    ``num_words == 1`` (at most 64 boxes), named with a ``B=1`` / ``num_words=1`` suffix.
    """
    from kernels import nms, paste_masks, roi_align

    specs: dict[tuple, KernelSpec] = {}

    def add(spec: KernelSpec, user: str) -> None:
        k = spec.key()
        if k in specs:
            old = specs[k]
            if user not in old.used_by:
                specs[k] = dataclasses.replace(old, used_by=old.used_by + (user,))
        else:
            specs[k] = dataclasses.replace(spec, used_by=(user,))

    num_levels = 4  # engine.model.RoIHeads.pool: features[:4] (P2..P5)
    roi_div = _pointers(_ROI_ALIGN_SIGNATURE) + (("C",) if channels % 16 == 0 else ())
    for pname, cfg in presets.items():
        crop = cfg.roi_mode == "crop_and_resize"
        for stage, out in (("box", cfg.box_pool_size), ("mask", cfg.mask_pool_size)):
            block_bins, block_c, num_warps = roi_align._tile(out, channels)
            sr = 0 if crop else cfg.roi_sampling_ratio  # as multilevel_roi_align_triton passes them
            aligned = False if crop else bool(cfg.roi_aligned)
            if crop:
                name = f"roi_align[crop_and_resize,out={out}]"
            else:
                name = f"roi_align[out={out},sr={sr},aligned={int(aligned)}]"
            add(
                KernelSpec(
                    name=name,
                    family="roi_align",
                    module="kernels.roi_align",
                    kernel="_multilevel_roi_align_kernel",
                    signature=dict(_ROI_ALIGN_SIGNATURE),
                    constexprs=dict(
                        NUM_LEVELS=num_levels,
                        OUT=out,
                        SAMPLING_RATIO=sr,
                        ALIGNED=aligned,
                        CROP_AND_RESIZE=crop,
                        BLOCK_BINS=block_bins,
                        BLOCK_C=block_c,
                    ),
                    divisible=roi_div,
                    options=dict(num_warps=num_warps, enable_fp_fusion=False),
                ),
                f"{pname} ({stage} head)",
            )

    for pname, cfg in presets.items():
        method = cfg.paste_method
        thr = float(cfg.mask_threshold)
        add(
            KernelSpec(
                name=f"paste[{method},thr={thr:g}]",
                family="paste",
                module="kernels.paste_masks",
                kernel="_paste_masks_kernel",
                signature=dict(_PASTE_SIGNATURE),
                constexprs=dict(
                    THRESHOLD=thr,
                    APPLY_THRESHOLD=True,
                    GRID_SAMPLE=method == "grid_sample",
                    EMULATE_FMA=False,
                    TORCH_CPU_SMALL_PATH=False,
                    BLOCK_H=paste_masks._BLOCK_H,
                    BLOCK_W=paste_masks._BLOCK_W,
                ),
                divisible=_pointers(_PASTE_SIGNATURE),
                options=dict(num_warps=paste_masks._NUM_WARPS, enable_fp_fusion=False),
            ),
            f"{pname} (full and crop modes)",
        )

    tiles = nms._CUDA_TILES
    mask_options = dict(num_warps=tiles.mask_warps, enable_fp_fusion=False)
    greedy_options = dict(num_warps=tiles.greedy_warps)  # the launchers leave enable_fp_fusion at its default
    mask_tiles = dict(BLOCK_ROWS=tiles.block_rows, BLOCK_WORDS=tiles.block_words)
    greedy_tiles = dict(SEGMENTS_PER_PROGRAM=tiles.segments_per_program, PROPAGATE_WORDS=tiles.propagate_words)
    for name, kernel, signature, constexprs, options, used_by in (
        ("nms_suppression_mask", "_nms_suppression_mask_kernel", _NMS_MASK_SIGNATURE, mask_tiles, mask_options,
         "batched_nms (public API)"),
        ("nms_greedy", "_nms_greedy_kernel", _NMS_GREEDY_SIGNATURE, greedy_tiles, greedy_options,
         "batched_nms (public API)"),
        ("segmented_nms_mask", "_segmented_nms_mask_kernel", _SEGMENTED_NMS_MASK_SIGNATURE, mask_tiles, mask_options,
         "every preset (RPN and detections, the engine's NMS)"),
        ("segmented_nms_greedy", "_segmented_nms_greedy_kernel", _SEGMENTED_NMS_GREEDY_SIGNATURE, greedy_tiles,
         greedy_options, "every preset (RPN and detections, the engine's NMS)"),
    ):
        add(
            KernelSpec(
                name=name,
                family="nms",
                module="kernels.nms",
                kernel=kernel,
                signature=dict(signature),
                constexprs=dict(constexprs),
                divisible=_pointers(signature),
                options=dict(options),
            ),
            used_by,
        )
    out = list(specs.values())
    if int_variants:
        out = [v for spec in out for v in (spec, *_value_one_variants(spec))]
    return out


def _value_one_variants(spec: KernelSpec) -> list[KernelSpec]:
    """The spec with a run-time int argument equal to 1, as Triton's JIT specialises it."""
    arg = {"roi_align": "B", "nms": "num_words"}.get(spec.family)
    if arg is None:
        return []
    signature = {k: v for k, v in spec.signature.items() if k != arg}
    return [
        dataclasses.replace(
            spec,
            name=spec.name[:-1] + f",{arg}=1]" if spec.name.endswith("]") else f"{spec.name}[{arg}=1]",
            signature=signature,
            constexprs={**spec.constexprs, arg: 1},
            divisible=tuple(d for d in spec.divisible if d != arg),
        )
    ]


# --------------------------------------------------------------------------------------
# Compiling and measuring
# --------------------------------------------------------------------------------------


@dataclass
class KernelResources:
    """What one specialisation compiles to on one architecture (``error`` set if it failed)."""

    name: str
    family: str
    kernel: str
    arch: int
    num_warps: int = 0
    registers: int = 0  # per thread
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    stack_frame_bytes: int = 0  # per thread, ptxas (includes spill slots and local arrays)
    ptx_local_bytes: int = 0  # per thread: .local arrays Triton's PTX declares
    shared_dynamic_bytes: int = 0  # Triton's metadata.shared, requested at launch
    shared_static_bytes: int = 0  # cuobjdump SHARED: static shared memory of the cubin
    blocks_per_sm: int = 0
    occupancy_pct: float = 0.0
    occupancy_limiter: str = ""
    compile_seconds: float = 0.0
    ptxas_log: str = ""  # source of the spill figures: "compile" (Triton's own ptxas run) or a rerun
    constexprs: dict = field(default_factory=dict)
    used_by: tuple = ()
    error: str | None = None

    @property
    def arch_name(self) -> str:
        return f"sm_{self.arch}"

    @property
    def threads(self) -> int:
        return 32 * self.num_warps

    @property
    def spills(self) -> int:
        """Spill stores + spill loads, bytes per thread."""
        return self.spill_store_bytes + self.spill_load_bytes

    @property
    def shared_bytes(self) -> int:
        return self.shared_dynamic_bytes + self.shared_static_bytes

    @property
    def has_local_array(self) -> bool:
        """A per-thread local array: declared in the PTX, or stack frame beyond the spill slots."""
        return self.ptx_local_bytes > 0 or self.stack_frame_bytes > self.spill_store_bytes

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["used_by"] = list(self.used_by)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "KernelResources":
        d = dict(d)
        d["used_by"] = tuple(d.get("used_by", ()))
        return cls(**d)


def _jit_function(spec: KernelSpec):
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(spec.module), spec.kernel)
    if not isinstance(fn, JITFunction):
        raise RuntimeError(
            f"{spec.module}.{spec.kernel} is a {type(fn).__name__}, not a JITFunction (TRITON_INTERPRET=1?); "
            "compile in a process without TRITON_INTERPRET (kernel_resources does so by itself)"
        )
    return fn


def compile_kernel(spec: KernelSpec, arch: int):
    """``triton.compile`` of one specialisation for ``sm_<arch>``; returns the CompiledKernel.

    Checks that the spec names every parameter of the kernel (so a kernel that gains or
    loses a parameter fails here instead of compiling a stale specialisation).
    """
    _require_triton()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(spec)
    params = list(fn.arg_names)
    given = set(spec.signature) | set(spec.constexprs)
    if set(params) != given or set(spec.signature) & set(spec.constexprs):
        raise ValueError(
            f"{spec.name}: the spec does not match {spec.kernel}'s parameters: kernel {params}, "
            f"spec {list(spec.signature) + list(spec.constexprs)}"
        )
    signature = {p: ("constexpr" if p in spec.constexprs else spec.signature[p]) for p in params}
    attrs = {(params.index(p),): [["tt.divisibility", _ALIGNED]] for p in spec.divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(spec.options))


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name.replace("-", "_")).path


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_PTX_LOCAL = re.compile(r"^\s*\.local\s+(?:\.align\s+\d+\s+)?\.(?:b|u|s|f)(\d+)\s+\w+\[(\d+)\]", re.M)


def _ptxas_rerun(ptx: str, arch: int, options, workdir: Path) -> tuple[str, bytes]:
    """``ptxas -v`` on Triton's PTX with the flags of Triton's ``make_cubin``; (log, cubin)."""
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    src = workdir / "k.ptx"
    out = workdir / "k.cubin"
    src.write_text(ptx)
    if knobs.compilation.disable_line_info:
        debug = ["-lineinfo", "-suppress-debug-info"]
    elif knobs.nvidia.disable_ptxas_opt:
        debug = ["-g"]
    else:
        debug = ["-lineinfo"]
    cmd = [get_ptxas(arch).path, *debug, *([] if options.enable_fp_fusion else ["--fmad=false"]), "-v"]
    if knobs.nvidia.disable_ptxas_opt:
        cmd += ["--opt-level", "0"]
    cmd += ["--regAllocOptLevel=2", *(options.ptx_options.split(" ") if options.ptx_options else [])]
    cmd += [f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return res.stdout + res.stderr, out.read_bytes()


def _compile_with_ptxas_log(spec: KernelSpec, arch: int):
    """(CompiledKernel, the ptxas -v log of this compile, or "" on a Triton cache hit)."""
    from triton import knobs

    buf = io.StringIO()
    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # make_cubin then prints ptxas' -v log (its stderr) with print()
    try:
        with contextlib.redirect_stdout(buf):
            compiled = compile_kernel(spec, arch)
    finally:
        knobs.nvidia.dump_ptxas_log = old
    return compiled, buf.getvalue()


def measure(spec: KernelSpec, arch: int) -> KernelResources:
    """Compiles one specialisation for ``sm_<arch>`` and reads its resources; never raises
    for a compile error (the record's ``error`` holds it)."""
    rec = KernelResources(
        name=spec.name,
        family=spec.family,
        kernel=spec.kernel,
        arch=arch,
        num_warps=int(spec.options.get("num_warps", 4)),
        constexprs=dict(spec.constexprs),
        used_by=tuple(spec.used_by),
    )
    t0 = time.perf_counter()
    try:
        compiled, log = _compile_with_ptxas_log(spec, arch)
    except Exception as e:  # noqa: BLE001 - reported per kernel
        rec.compile_seconds = time.perf_counter() - t0
        rec.error = f"{type(e).__name__}: {e}"[:4000]
        return rec
    rec.compile_seconds = time.perf_counter() - t0
    md = compiled.metadata
    rec.num_warps = int(md.num_warps)
    rec.shared_dynamic_bytes = int(md.shared)
    ptx = compiled.asm["ptx"]
    cubin = compiled.asm["cubin"]
    rec.ptx_local_bytes = sum(int(bits) // 8 * int(n) for bits, n in _PTX_LOCAL.findall(ptx))
    try:
        with tempfile.TemporaryDirectory(prefix="kernels_aot_") as tmp:
            tmp = Path(tmp)
            (tmp / "triton.cubin").write_bytes(cubin)
            usage = subprocess.run(
                [_tool("cuobjdump"), "--dump-resource-usage", str(tmp / "triton.cubin")],
                capture_output=True, text=True, check=True,
            ).stdout
            m = _RESOURCE.search(usage)
            if not m:
                raise RuntimeError(f"cannot parse cuobjdump --dump-resource-usage output:\n{usage}")
            rec.registers, rec.stack_frame_bytes, rec.shared_static_bytes = (int(m.group(i)) for i in (1, 2, 3))
            if _PTXAS_USED.search(log):
                rec.ptxas_log = "compile"
            else:  # a cache hit ran no ptxas: run it again on the PTX, check it rebuilds the cubin
                log, rerun = _ptxas_rerun(ptx, arch, md, tmp)
                rec.ptxas_log = "rerun, identical cubin" if rerun == cubin else "rerun, DIFFERENT cubin"
            used = _PTXAS_USED.search(log)
            frame = _PTXAS_FRAME.search(log)
            if not (used and frame):
                raise RuntimeError(f"cannot parse the ptxas -v log:\n{log}")
            if int(used.group(1)) != rec.registers or int(frame.group(1)) != rec.stack_frame_bytes:
                raise RuntimeError(
                    f"ptxas -v ({used.group(1)} registers, {frame.group(1)} B stack) disagrees with the cubin "
                    f"({rec.registers} registers, {rec.stack_frame_bytes} B stack)"
                )
            rec.spill_store_bytes, rec.spill_load_bytes = int(frame.group(2)), int(frame.group(3))
    except Exception as e:  # noqa: BLE001 - reported per kernel
        rec.error = f"resource readout failed: {type(e).__name__}: {e}"[:4000]
        return rec
    rec.blocks_per_sm, rec.occupancy_pct, rec.occupancy_limiter = occupancy(
        rec.registers, rec.num_warps, rec.shared_bytes, SM_LIMITS[arch]
    )
    return rec


def _interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def _measure_task(task: tuple) -> KernelResources:
    spec, arch = task
    return measure(spec, arch)


def _measure_all(specs: Sequence[KernelSpec], arches: Sequence[int], jobs: int) -> list[KernelResources]:
    """measure() of every (spec, arch), in that order; ``jobs > 1``: in forked worker processes.

    Only called in a process that has not touched CUDA (forking is then safe). The tasks
    start slowest first (NMS, whose 64-fold unrolled loops take Triton the longest), so
    that the workers finish together.
    """
    tasks = [(s, a) for s in specs for a in arches]
    if jobs <= 1 or len(tasks) <= 1:
        return [_measure_task(t) for t in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    for module in sorted({s.module for s in specs}):  # imported once, before the fork
        _jit_function(next(s for s in specs if s.module == module))
    import triton.compiler  # noqa: F401

    order = sorted(range(len(tasks)), key=lambda i: tasks[i][0].family != "nms")
    results: list = [None] * len(tasks)
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=ctx) as pool:
        for i, rec in zip(order, pool.map(_measure_task, [tasks[i] for i in order])):
            results[i] = rec
    return results


def _measure_in_subprocess(specs: Sequence[KernelSpec], arches: Sequence[int], jobs: int) -> list[KernelResources]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    payload = json.dumps({"specs": [dataclasses.asdict(s) for s in specs], "arches": list(arches)})
    with tempfile.TemporaryDirectory(prefix="kernels_aot_") as tmp:
        out = Path(tmp) / "records.json"
        # a cache of its own: every compile runs ptxas, whose log gives the spill figures (a cubin
        # cached before an edit elsewhere in a kernel's file differs in its line table only)
        env["TRITON_CACHE_DIR"] = str(Path(tmp) / "triton_cache")
        # the records go to a file: Triton prints to stdout (e.g. the PTX of a failing ptxas run)
        cmd = [sys.executable, "-m", "kernels.aot", "--specs-from-stdin", "--json-out", str(out), "--jobs", str(jobs)]
        proc = subprocess.run(cmd, input=payload, capture_output=True, text=True, env=env, cwd=str(_REPO_ROOT))
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"AOT compile subprocess failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
            )
        return [KernelResources.from_json(d) for d in json.loads(out.read_text())]


def _spec_from_json(d: dict) -> KernelSpec:
    d = dict(d)
    d["divisible"] = tuple(d["divisible"])
    d["used_by"] = tuple(d["used_by"])
    return KernelSpec(**d)


def default_jobs() -> int:
    """Worker processes for the compiles: the CPUs this process may use, at most 4."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(4, n))


def kernel_resources(
    arches: Iterable[int],
    specs: Sequence[KernelSpec],
    *,
    jobs: int | None = None,
    subprocess_mode: str = "auto",
) -> list[KernelResources]:
    """Compiles every specialisation (from :func:`kernel_specs`) for every arch; one record each.

    Records come spec by spec, arch by arch. A compile error does not raise: it is in that
    record's ``error``. ``jobs``: parallel compile processes (default :func:`default_jobs`).
    ``subprocess_mode``: "auto" (a fresh child process, without ``TRITON_INTERPRET``, when
    the interpreter is on here or ``jobs > 1``; else in this process), "always" or "never"
    ("never" compiles one after another in this process and needs ``TRITON_INTERPRET`` off).
    """
    _require_triton()
    arches = [int(a) for a in arches]
    for a in arches:
        if a not in SM_LIMITS:
            raise ValueError(f"unknown arch {a}; known: {sorted(SM_LIMITS)}")
    specs = list(specs)
    jobs = default_jobs() if jobs is None else max(1, int(jobs))
    if subprocess_mode not in ("auto", "always", "never"):
        raise ValueError(f"subprocess_mode must be 'auto', 'always' or 'never'; got {subprocess_mode!r}")
    if subprocess_mode == "always" or (subprocess_mode == "auto" and (_interpreter_active() or jobs > 1)):
        return _measure_in_subprocess(specs, arches, jobs)
    return _measure_all(specs, arches, 1)


# --------------------------------------------------------------------------------------
# Targets (issue 11) and tables
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A resource target of issue 11: ``check`` must hold for every record of ``families``."""

    key: str
    text: str
    families: tuple
    check: object  # callable(KernelResources) -> bool
    value: object  # callable(KernelResources) -> str, the measured quantity
    severity: object  # callable(KernelResources) -> number, to name the worst miss

    def applies(self, rec: KernelResources) -> bool:
        return rec.family in self.families


TARGETS: tuple[Target, ...] = (
    Target(
        "no_spills",
        "0 bytes spilled in every kernel",
        ("roi_align", "paste", "nms"),
        lambda r: r.spill_store_bytes == 0 and r.spill_load_bytes == 0,
        lambda r: f"{r.spill_store_bytes}/{r.spill_load_bytes} B spill st/ld",
        lambda r: r.spill_store_bytes + r.spill_load_bytes,
    ),
    Target(
        "regs_le_128",
        "RoIAlign and paste at <= 128 registers per thread",
        ("roi_align", "paste"),
        lambda r: r.registers <= 128,
        lambda r: f"{r.registers} registers",
        lambda r: r.registers,
    ),
    Target(
        "nms_no_local_array",
        "no per-thread local array in NMS",
        ("nms",),
        lambda r: not r.has_local_array,
        lambda r: f"{r.ptx_local_bytes} B .local in PTX, {r.stack_frame_bytes} B stack",
        lambda r: r.ptx_local_bytes + r.stack_frame_bytes,
    ),
)


def evaluate_targets(records: Sequence[KernelResources]) -> list[tuple[Target, bool, list[KernelResources], int]]:
    """``(target, met, missing records, records it applies to)`` per target; a record
    with a compile error counts as a miss."""
    out = []
    for t in TARGETS:
        applicable = [r for r in records if t.applies(r)]
        misses = [r for r in applicable if r.error or not t.check(r)]
        out.append((t, not misses, misses, len(applicable)))
    return out


def markdown_table(records: Sequence[KernelResources]) -> str:
    """The records as a Markdown table, one row per kernel specialisation and arch."""
    lines = [
        "| Kernel | Arch | Warps | Regs/thread | Spill st/ld (B) | Stack (B) | Local array | "
        "Smem dyn + static (B) | Blocks/SM | Occupancy | Limited by |",
        "|---|---|--:|--:|--:|--:|---|--:|--:|--:|---|",
    ]
    for r in records:
        if r.error:
            lines.append(f"| `{r.name}` | {r.arch_name} | {r.num_warps} | compile error: {r.error.splitlines()[0][:80]} "
                         "| | | | | | | |")
            continue
        local = "yes" if r.has_local_array else "no"
        if r.ptx_local_bytes:
            local += f" ({r.ptx_local_bytes} B in PTX)"
        lines.append(
            f"| `{r.name}` | {r.arch_name} | {r.num_warps} | {r.registers} | "
            f"{r.spill_store_bytes}/{r.spill_load_bytes} | {r.stack_frame_bytes} | {local} | "
            f"{r.shared_dynamic_bytes} + {r.shared_static_bytes} | {r.blocks_per_sm} | "
            f"{r.occupancy_pct:.1f}% | {r.occupancy_limiter} |"
        )
    return "\n".join(lines)


def targets_table(records: Sequence[KernelResources]) -> str:
    """Issue 11's targets as a Markdown table: met or not, how many compiles miss, the worst."""
    lines = ["| Target | Met | Compiles missing it | Worst | Kernels missing it |", "|---|---|--:|---|---|"]
    for t, met, misses, n in evaluate_targets(records):
        if met:
            lines.append(f"| {t.text} | yes | 0 of {n} | - | - |")
            continue
        errors = [r for r in misses if r.error]
        measured = [r for r in misses if not r.error]
        worst = "compile error" if not measured else ""
        if measured:
            w = max(measured, key=t.severity)
            worst = f"{t.value(w)} (`{w.name}` {w.arch_name})"
        names = list(dict.fromkeys(r.name for r in misses))
        note = f" ({len(errors)} did not compile)" if errors else ""
        lines.append(
            f"| {t.text} | no | {len(misses)} of {n}{note} | {worst} | {', '.join(f'`{x}`' for x in names)} |"
        )
    return "\n".join(lines)


def _main(argv=None) -> int:
    """The child process of :func:`kernel_resources`: specs as JSON on stdin, records to a JSON file.

    (The tables for the engine's presets: ``python examples/kernel_report.py``.)
    """
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--specs-from-stdin", action="store_true", required=True,
                   help="read {'specs': [...], 'arches': [...]} as JSON on stdin (kernel_resources' child process)")
    p.add_argument("--json-out", metavar="FILE", required=True, help="write the records as JSON to FILE")
    p.add_argument("--jobs", type=int, default=1, help="parallel compile processes")
    args = p.parse_args(argv)
    payload = json.loads(sys.stdin.read())
    specs = [_spec_from_json(d) for d in payload["specs"]]
    records = _measure_all(specs, payload["arches"], args.jobs or 1)
    Path(args.json_out).write_text(json.dumps([r.to_json() for r in records]))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
