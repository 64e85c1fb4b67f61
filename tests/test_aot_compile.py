"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90, without a GPU (issue 11).

Each kernel specialisation the engine launches on CUDA (:func:`kernels.aot.kernel_specs`)
is compiled to a cubin for both targets once per session (module fixture; under
``TRITON_INTERPRET=1``, which conftest sets without a GPU, the compiles run in a child
process without it). Then:

- ``test_compiles``: every (specialisation, arch) compiles, and its resources were read;
- ``test_no_spills``, ``test_registers_at_most_128``, ``test_nms_has_no_local_array``:
  issue 11's targets. Where today's kernels miss one, that check is marked
  ``xfail(strict=True)`` with the value measured when the marker was written, so it turns
  red (XPASS) once the kernel is retuned, and the marker must then go.

The measured numbers are attached to each test (``record_property``: registers, spills,
shared memory, occupancy) and ``test_resource_table`` prints the whole table (``-s``).
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("triton")

from engine.config import PRESETS  # noqa: E402
from kernels import aot  # noqa: E402

SPECS = aot.kernel_specs(PRESETS)
ARCHES = aot.ARCHES
CASES = [(spec.name, arch) for spec in SPECS for arch in ARCHES]

# Misses of the issue 11 targets measured with triton 3.8.0 (ptxas 12.9) when these markers
# were written: (target key, specialisation, arch) -> measured value.
_MEASURED_MISSES = {
    # The paste kernels' misses (191-226 registers at 32 x 64 pixels over 4 warps) went with
    # their 16 x 64 CUDA tile over 8 warps (73-80 registers; issue 11).
}


def _target(key: str) -> aot.Target:
    return next(t for t in aot.TARGETS if t.key == key)


def _target_cases(key: str) -> list:
    """(name, arch) cases the target applies to, today's misses marked xfail(strict)."""
    target = _target(key)
    cases = []
    for spec in SPECS:
        if spec.family not in target.families:
            continue
        for arch in ARCHES:
            measured = _MEASURED_MISSES.get((key, spec.name, arch))
            marks = ()
            if measured is not None:
                reason = f"{measured} on sm_{arch} (triton 3.8.0), awaits kernel retuning (issue 11)"
                marks = (pytest.mark.xfail(strict=True, reason=reason),)
            cases.append(pytest.param(spec.name, arch, marks=marks, id=f"{spec.name}-sm_{arch}"))
    return cases


@pytest.fixture(scope="module")
def compiled():
    """{(name, arch): KernelResources} of every case, and the seconds the compiles took."""
    t0 = time.perf_counter()
    records = aot.kernel_resources(ARCHES, SPECS)
    seconds = time.perf_counter() - t0
    return {(r.name, r.arch): r for r in records}, seconds


def _record(compiled, name, arch, record_property) -> aot.KernelResources:
    records, _ = compiled
    rec = records[(name, arch)]
    for prop in ("registers", "spill_store_bytes", "spill_load_bytes", "stack_frame_bytes", "ptx_local_bytes",
                 "shared_dynamic_bytes", "shared_static_bytes", "num_warps", "blocks_per_sm", "occupancy_pct"):
        record_property(prop, getattr(rec, prop))
    return rec


def _compiled_or_skip(rec: aot.KernelResources) -> None:
    if rec.error:  # reported by test_compiles; a target check cannot be judged
        pytest.skip(f"{rec.name} did not compile for {rec.arch_name} (see test_compiles)")


@pytest.mark.parametrize("name, arch", CASES, ids=[f"{n}-sm_{a}" for n, a in CASES])
def test_compiles(compiled, name, arch, record_property):
    rec = _record(compiled, name, arch, record_property)
    assert rec.error is None, rec.error
    assert rec.registers > 0 and rec.num_warps > 0
    # the spill figures are those of this very cubin
    assert rec.ptxas_log in ("compile", "rerun, identical cubin"), rec.ptxas_log
    assert 0 < rec.blocks_per_sm <= aot.SM_LIMITS[arch].max_blocks_per_sm


@pytest.mark.parametrize("name, arch", _target_cases("no_spills"))
def test_no_spills(compiled, name, arch, record_property):
    rec = _record(compiled, name, arch, record_property)
    _compiled_or_skip(rec)
    assert (rec.spill_store_bytes, rec.spill_load_bytes) == (0, 0), (
        f"{rec.spill_store_bytes} B spill stores, {rec.spill_load_bytes} B spill loads"
    )


@pytest.mark.parametrize("name, arch", _target_cases("regs_le_128"))
def test_registers_at_most_128(compiled, name, arch, record_property):
    rec = _record(compiled, name, arch, record_property)
    _compiled_or_skip(rec)
    assert rec.registers <= 128, f"{rec.registers} registers per thread"


@pytest.mark.parametrize("name, arch", _target_cases("nms_no_local_array"))
def test_nms_has_no_local_array(compiled, name, arch, record_property):
    rec = _record(compiled, name, arch, record_property)
    _compiled_or_skip(rec)
    assert rec.ptx_local_bytes == 0, f"{rec.ptx_local_bytes} B of .local arrays in the PTX"
    assert not rec.has_local_array, f"{rec.stack_frame_bytes} B stack frame, {rec.spill_store_bytes} B of it spills"


def test_every_kernel_is_covered():
    """Each @triton.jit kernel of the package (a ``*_kernel`` function) has a specialisation."""
    import importlib

    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - older triton
        InterpretedFunction = ()
    found = set()
    for module in ("kernels.roi_align", "kernels.paste_masks", "kernels.nms"):
        mod = importlib.import_module(module)
        for name, obj in vars(mod).items():
            if isinstance(obj, (JITFunction, InterpretedFunction)) and name.endswith("_kernel"):
                found.add((module, name))
    covered = {(s.module, s.kernel) for s in SPECS}
    assert found, "no Triton kernels found"
    assert found <= covered, f"kernels without an AOT specialisation: {sorted(found - covered)}"


def test_specialisations_follow_the_launchers():
    """Spot checks that the specs carry the launchers' CUDA-path constants."""
    from kernels import nms, paste_masks, roi_align

    by_name = {s.name: s for s in SPECS}
    for out in (7, 14):
        spec = by_name[f"roi_align[out={out},sr=2,aligned=0]"]
        bins, block_c, warps = roi_align._tile(out, 256)
        assert (spec.constexprs["BLOCK_BINS"], spec.constexprs["BLOCK_C"], spec.options["num_warps"]) == (
            bins, block_c, warps
        )
        assert spec.options["enable_fp_fusion"] is False
        assert roi_align._tile(out, 128) == roi_align._tile(out, 256)  # the bundled model's C=128: same tile
    for name in ("roi_align[out=7,sr=0,aligned=1]", "roi_align[crop_and_resize,out=14]"):
        assert name in by_name
    for method in ("torchvision", "grid_sample"):
        spec = by_name[f"paste[{method},thr=0.5]"]
        assert spec.constexprs["EMULATE_FMA"] is False and spec.constexprs["TORCH_CPU_SMALL_PATH"] is False
        assert spec.constexprs["GRID_SAMPLE"] is (method == "grid_sample")
        assert (spec.constexprs["BLOCK_H"], spec.constexprs["BLOCK_W"]) == (paste_masks._BLOCK_H, paste_masks._BLOCK_W)
        assert spec.options["num_warps"] == paste_masks._NUM_WARPS
    tiles = nms._CUDA_TILES
    mask = by_name["nms_suppression_mask"]
    assert (mask.constexprs["BLOCK_ROWS"], mask.constexprs["BLOCK_WORDS"]) == (tiles.block_rows, tiles.block_words)
    assert mask.options["num_warps"] == tiles.mask_warps
    greedy = by_name["nms_greedy"]
    assert greedy.constexprs["PROPAGATE_WORDS"] == tiles.propagate_words
    assert greedy.options["num_warps"] == tiles.greedy_warps


def test_occupancy_arithmetic():
    sm80, sm90 = aot.SM_LIMITS[80], aot.SM_LIMITS[90]
    # 255 registers x 8 warps: 8192 registers per warp, 8 warps fit: one block, 8 / 64 warps
    assert aot.occupancy(255, 8, 0, sm90) == (1, 12.5, "registers")
    # 32 registers x 4 warps: 1024 per warp, 64 warps fit by registers; 16 blocks by warps
    assert aot.occupancy(32, 4, 0, sm80) == (16, 100.0, "warps")
    # 84 registers x 1 warp: 2816 per warp (granularity 256), 23 warps -> 20 (multiple of 4)
    assert aot.occupancy(84, 1, 0, sm80) == (20, 31.25, "registers")
    # 100 KB of shared memory (+ 1 KB reserved): one block on sm_80, two on sm_90
    assert aot.occupancy(32, 4, 100 * 1024, sm80) == (1, 6.25, "shared memory")
    assert aot.occupancy(32, 4, 100 * 1024, sm90) == (2, 12.5, "shared memory")
    # more registers per block than the SM has: cannot launch
    assert aot.occupancy(255, 16, 0, sm90)[0] == 0


def test_resource_table(compiled, record_property):
    records, seconds = compiled
    record_property("compile_seconds_total", round(seconds, 1))
    recs = [records[c] for c in CASES]
    table = aot.markdown_table(recs)
    assert table.count("\n") == len(CASES) + 1
    print(f"\n{len(CASES)} AOT compiles in {seconds:.1f} s\n{table}\n\n{aot.targets_table(recs)}")


def test_without_triton_the_error_is_clear(monkeypatch):
    monkeypatch.setattr(aot, "_HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="needs the `triton` package"):
        aot.kernel_resources(ARCHES, SPECS)
