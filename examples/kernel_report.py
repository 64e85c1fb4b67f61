"""Registers, spills, shared memory and occupancy of every Triton kernel, compiled ahead of time.

    python examples/kernel_report.py                                   # print the tables
    python examples/kernel_report.py --markdown kernels.md             # also write them to a file
    python examples/kernel_report.py --update-benchmarks BENCHMARKS.md # refresh that file's section
    python examples/kernel_report.py --json records.json               # also write the records as JSON

Compiles each Triton kernel of :mod:`kernels`, in every specialisation the engine launches on
CUDA (the specialisations of the presets in :data:`engine.config.PRESETS`), to cubins for sm_80
and sm_90 with :mod:`kernels.aot`: no GPU or CUDA driver needed.
Prints one row per kernel and architecture, then issue 11's targets (0 spills everywhere,
RoIAlign and paste at <= 128 registers per thread, no per-thread local array in NMS) and
whether each is met. ``--update-benchmarks`` replaces the part of the file between
``<!-- kernel-resources:start -->`` and ``<!-- kernel-resources:end -->`` (appended at the
end when the markers are absent) with the tables, the date and the toolchain versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import PRESETS  # noqa: E402
from kernels import aot  # noqa: E402

START = "<!-- kernel-resources:start -->"
END = "<!-- kernel-resources:end -->"


def ptxas_version() -> str:
    """'12.9.86'-style version of the ptxas that ships with triton, or 'unknown'."""
    try:
        from triton import knobs

        out = subprocess.run([knobs.nvidia.ptxas.path, "--version"], capture_output=True, text=True, check=True).stdout
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"
    for line in out.splitlines():
        if "release" in line and ", V" in line:
            return line.rsplit(", V", 1)[1].strip()
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


def section(records, *, int_variants: bool) -> str:
    import triton

    limits = ", ".join(
        f"{lim.name}: {lim.regs_per_sm} registers, {lim.max_warps_per_sm} warps, {lim.max_blocks_per_sm} blocks, "
        f"{lim.smem_per_sm // 1024} KB shared memory"
        for lim in aot.SM_LIMITS.values()
    )
    lines = [
        START,
        "## Kernel resources (ahead-of-time compile, no GPU)",
        "",
        f"Written on {datetime.date.today().isoformat()} by `python examples/kernel_report.py"
        f"{' --int-variants' if int_variants else ''} --update-benchmarks BENCHMARKS.md` with triton {triton.__version__} "
        f"(ptxas {ptxas_version()}): every Triton kernel, in each specialisation the engine launches on CUDA, "
        f"compiled to sm_80 and sm_90 cubins by `kernels/aot.py` on a machine without a GPU "
        f"({len(records)} compiles). Registers, spills and stack frame are per thread, from "
        "ptxas; shared memory is Triton's dynamic allocation + the cubin's static part. Occupancy is "
        "theoretical, not measured: blocks per SM and the share of the SM's 64 warps, from registers "
        f"(allocated per warp in units of 256), warps and shared memory (+ 1 KB reserved per block) against {limits}. "
        "The same checks run in CI: `tests/test_aot_compile.py`.",
        "",
        "### Issue 11 targets",
        "",
        aot.targets_table(records),
        "",
        "### Per kernel",
        "",
        aot.markdown_table(records),
        "",
        "Names: `roi_align[out=P,sr=S,aligned=A]` is RoIAlign with output P x P, sampling ratio S (0: adaptive) "
        "and aligned A (torchvision: sr=2, aligned=0; Detectron2 and mmdetection: sr=0, aligned=1); "
        "`roi_align[crop_and_resize,out=P]` is matterport's crop_and_resize mode; P = 7 is the box head, 14 the "
        "mask head (FPN width 256, four levels). `paste[M,thr=T]` is the paste kernel for method M with "
        "threshold T (full and crop modes run the same binary). `nms_suppression_mask` / `nms_greedy` are "
        "the two NMS launches with `_CUDA_TILES`."
        + (
            " `B=1` (one image per batch) and `num_words=1` (at most 64 boxes) are the variants Triton compiles "
            "when that run-time argument equals 1."
            if int_variants
            else ""
        ),
        END,
    ]
    return "\n".join(lines)


def update_benchmarks(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    if START in old and END in old and old.index(START) < old.index(END):
        new = old[: old.index(START)] + text + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip("\n") + ("\n\n" if old.strip() else "") + text + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", metavar="FILE", help="write the section (tables, date, versions) to FILE")
    ap.add_argument("--update-benchmarks", metavar="BENCHMARKS_MD", help="replace the kernel-resources section of this file")
    ap.add_argument("--json", metavar="FILE", help="write the records (one per kernel and arch) as JSON to FILE")
    ap.add_argument("--arch", type=int, nargs="+", default=list(aot.ARCHES), help="compute capabilities (default: 80 90)")
    ap.add_argument(
        "--int-variants",
        action="store_true",
        help="also compile the B=1 / num_words=1 variants Triton specialises for run-time arguments equal to 1",
    )
    ap.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPUs, at most 4)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    records = aot.kernel_resources(args.arch, aot.kernel_specs(PRESETS, int_variants=args.int_variants), jobs=args.jobs)
    seconds = time.perf_counter() - t0
    print(aot.markdown_table(records))
    print()
    print(aot.targets_table(records))
    print(f"\n{len(records)} compiles in {seconds:.1f} s")
    text = section(records, int_variants=args.int_variants)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_json() for r in records]))
    if args.update_benchmarks:
        update_benchmarks(Path(args.update_benchmarks), text)
        print(f"updated {args.update_benchmarks}")
    failed = [r for r in records if r.error]
    for r in failed:
        print(f"compile error: {r.name} {r.arch_name}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
