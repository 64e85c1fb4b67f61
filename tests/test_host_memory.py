"""engine.host_memory: freed large blocks are reused during a CPU run, and the results stay the same."""

import threading

import numpy as np
import pytest
import torch

from engine import Predictor, host_memory
from engine.predictor import STAGES
from fresh_process import run_probe
from tiny import TINY_CONFIG, tiny_state_dict

needs_glibc = pytest.mark.skipif(not host_memory.available(), reason="the malloc settings exist under glibc only")

# Run in a fresh interpreter: in a long pytest process, earlier tests leave free chunks in malloc's
# heap, and a 64 MiB block may then come from there even outside the scope (CI saw exactly that).
FAULT_PROBE = """
import json, resource, torch
from engine import host_memory

BLOCK_BYTES = 64 << 20  # over glibc's largest mmap threshold (32 MiB)

def faults_of_two_blocks():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):  # write a block, free it, write another
        block = torch.empty(BLOCK_BYTES // 4)
        block.fill_(1.0)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_two_blocks()
plain = faults_of_two_blocks()
with host_memory.reusing_freed_memory():
    for _ in range(3):  # the heap grows to the blocks' size, in one or two steps
        faults_of_two_blocks()
    reused = faults_of_two_blocks()
after = faults_of_two_blocks()
print(json.dumps({"pages": BLOCK_BYTES // 4096, "plain": plain, "reused": reused, "after": after}))
"""


@needs_glibc
def test_freed_blocks_are_reused_inside_the_scope_only():
    faults = run_probe(FAULT_PROBE)
    pages = faults["pages"]
    assert faults["plain"] >= 1.5 * pages, f"each fresh block should fault its pages in: {faults}"
    assert faults["reused"] < 0.1 * pages, faults
    assert faults["after"] >= 1.5 * pages, f"the settings should be restored when the scope ends: {faults}"


class RecordingLibc:
    """Stands in for glibc: records the mallopt / malloc_trim calls."""

    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_scopes_nest_and_overlap_across_threads(monkeypatch):
    libc = RecordingLibc()
    monkeypatch.setattr(host_memory, "_glibc", libc)
    entered, release = threading.Event(), threading.Event()

    def other_run():
        with host_memory.reusing_freed_memory():
            entered.set()
            release.wait(30)

    with host_memory.reusing_freed_memory():
        assert [c[:2] for c in libc.calls] == [("mallopt", host_memory._M_MMAP_MAX), ("mallopt", host_memory._M_TRIM_THRESHOLD)]
        assert libc.calls[0][2] == 0
        with host_memory.reusing_freed_memory():
            pass
        assert len(libc.calls) == 2, "leaving a nested scope must not restore the settings"
        worker = threading.Thread(target=other_run)
        worker.start()
        assert entered.wait(30)
    assert len(libc.calls) == 2, "another thread's run is still on"
    release.set()
    worker.join(30)
    assert libc.calls[2:] == [
        ("mallopt", host_memory._M_MMAP_MAX, host_memory._DEFAULT_MMAP_MAX),
        ("mallopt", host_memory._M_TRIM_THRESHOLD, host_memory._RESTORED_TRIM_THRESHOLD),
        ("malloc_trim", 0),
    ]
    assert host_memory._active == 0


def test_an_error_inside_the_scope_still_restores(monkeypatch):
    libc = RecordingLibc()
    monkeypatch.setattr(host_memory, "_glibc", libc)
    with pytest.raises(RuntimeError, match="boom"):
        with host_memory.reusing_freed_memory():
            raise RuntimeError("boom")
    assert libc.calls[-1] == ("malloc_trim", 0) and host_memory._active == 0


def test_runs_with_and_without_reuse_give_the_same_results():
    images = [np.random.default_rng(s).integers(0, 256, size=hw + (3,), dtype=np.uint8) for s, hw in enumerate([(60, 80), (97, 45)])]
    reusing = Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG)
    plain = Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG, reuse_host_memory=False)
    assert reusing.reuse_host_memory and not plain.reuse_host_memory
    ours, theirs = reusing.run(images), plain.run(images)
    assert sum(len(r) for r in ours) > 0
    for a, b in zip(ours, theirs):
        for field in ("boxes", "scores", "labels", "masks"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_reuse_host_memory_must_be_a_bool():
    with pytest.raises(TypeError, match="reuse_host_memory must be True or False"):
        Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG, reuse_host_memory="yes")


def test_profile_stages_gives_run_results_and_every_stage():
    predictor = Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG)
    images = [np.random.default_rng(3).integers(0, 256, size=(64, 48, 3), dtype=np.uint8)]
    results, seconds = predictor.profile_stages(images)
    assert list(seconds) == list(STAGES)
    assert all(v >= 0 for v in seconds.values())
    expected = predictor.run(images)
    assert torch.equal(results[0].boxes, expected[0].boxes) and torch.equal(results[0].masks, expected[0].masks)
