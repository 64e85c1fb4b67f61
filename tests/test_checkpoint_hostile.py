"""Checkpoints are untrusted files: every hostile or malformed one gives a CheckpointError.

A crafted file must not run code, read other files, or take memory the file does not account
for; a broken one must not surface as a raw KeyError / TypeError / MemoryError. Each format is
attacked where it is weak: Detectron2 pickles (globals that allocate, declared lengths, numpy
shapes and dtypes, one array under many names), matterport HDF5 files (links and datasets that
point to other files, filter plugins, data that is not in the file, a malformed Keras layout),
Keras 3 archives, and any file truncated or corrupted at random (hypothesis).
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import re
import shutil
import struct
import tempfile
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine  # noqa: F401  (import the engine before weights)
from fresh_process import run_probe
from test_weights_detectron2 import d2_layout, random_arrays, save_pkl
from tiny import tiny_state_dict
from weights import CheckpointError, load_checkpoint
from weights import detectron2 as d2

h5py = pytest.importorskip("h5py")
from matterport_keras import write_keras2_h5  # noqa: E402

GIB = 2**30
#: the most a refused request may allocate while it is read and refused (tracemalloc peak)
SMALL = 16 * 2**20


def tiny_matterport_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """A complete matterport Mask R-CNN weight set (one block per stage, 8-wide), in Keras names."""
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}

    def conv(name, k, cin, cout, bn=None):
        weights[f"{name}/kernel"] = rng.normal(0, 0.1, (k, k, cin, cout)).astype(np.float32)
        weights[f"{name}/bias"] = rng.normal(0, 0.1, cout).astype(np.float32)
        if bn:
            for part, value in (("gamma", 1.0), ("beta", 0.0), ("moving_mean", 0.0), ("moving_variance", 1.0)):
                weights[f"{bn}/{part}"] = np.full(cout, value, np.float32)

    conv("conv1", 7, 3, 64, "bn_conv1")
    cin = 64
    for stage in range(2, 6):
        for branch, (k, a, b) in zip("abc", ((1, cin, 4), (3, 4, 4), (1, 4, 8))):
            conv(f"res{stage}a_branch2{branch}", k, a, b, f"bn{stage}a_branch2{branch}")
        conv(f"res{stage}a_branch1", 1, cin, 8, f"bn{stage}a_branch1")
        cin = 8
        conv(f"fpn_c{stage}p{stage}", 1, 8, 8)
        conv(f"fpn_p{stage}", 3, 8, 8)
    conv("rpn_conv_shared", 3, 8, 8)
    conv("rpn_class_raw", 1, 8, 6)
    conv("rpn_bbox_pred", 1, 8, 12)
    conv("mrcnn_class_conv1", 7, 8, 8, "mrcnn_class_bn1")
    conv("mrcnn_class_conv2", 1, 8, 8, "mrcnn_class_bn2")
    weights["mrcnn_class_logits/kernel"] = rng.normal(0, 0.1, (8, 3)).astype(np.float32)
    weights["mrcnn_class_logits/bias"] = np.zeros(3, np.float32)
    weights["mrcnn_bbox_fc/kernel"] = rng.normal(0, 0.1, (8, 12)).astype(np.float32)
    weights["mrcnn_bbox_fc/bias"] = np.zeros(12, np.float32)
    for i in range(1, 5):
        conv(f"mrcnn_mask_conv{i}", 3, 8, 8, f"mrcnn_mask_bn{i}")
    conv("mrcnn_mask_deconv", 2, 8, 8)
    conv("mrcnn_mask", 1, 8, 3)
    return weights


VALID = {"tv.pth": "torchvision", "d2.pkl": "detectron2", "mp.h5": "matterport"}


@functools.cache
def valid_file(name: str) -> bytes:
    """The bytes of a small valid checkpoint: torch.save zip, Detectron2 .pkl or matterport .h5."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        if name == "tv.pth":
            torch.save(tiny_state_dict(), path)
        elif name == "d2.pkl":
            save_pkl(path, random_arrays(d2_layout()))
        else:
            write_keras2_h5(path, tiny_matterport_weights())
        return path.read_bytes()


@pytest.mark.parametrize("name", list(VALID))
def test_valid_tiny_files_load(tmp_path, name):
    (tmp_path / name).write_bytes(valid_file(name))
    assert load_checkpoint(tmp_path / name).family == VALID[name]


def _refused_quickly(path, match: str) -> None:
    """load_checkpoint(path) raises CheckpointError matching ``match``, in little time and memory."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CheckpointError) as refused:
            load_checkpoint(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < SMALL, f"reading the refused file allocated {peak / 2**20:.0f} MiB"
    assert time.perf_counter() - start < 10
    assert re.search(match, str(refused.value)), str(refused.value)


# --- Detectron2 pickles ------------------------------------------------------------------------


def _reconstruct_huge(nbytes: int) -> bytes:
    """numpy's own recipe for an array, ``_reconstruct(ndarray, (nbytes,), 'b')``, for a huge shape."""
    return (
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        + b"\x8a\x05" + nbytes.to_bytes(5, "little") + b"\x85U\x01b\x87R."
    )


HUGE_PICKLES = {
    # bytearray(256 MiB) from a 30-byte file (more kills the process: bytearray zeroes its memory)
    "bytearray(2**28)": (
        b"\x80\x02c__builtin__\nbytearray\nJ" + struct.pack("<i", 2**28) + b"\x85R.",
        r"refused to load the global builtins.bytearray",
    ),
    "_reconstruct 16 GiB": (_reconstruct_huge(16 * GIB), r"refused an array of shape \(17179869184,\)"),
    "ndarray((2**31,)), 16 GiB of float64": (
        b"\x80\x02cnumpy\nndarray\nJ" + struct.pack("<i", 2**31 - 1) + b"\x85R.",
        r"refused to call numpy.ndarray",
    ),
    "BINBYTES8 of 16 GiB": (
        b"\x80\x05\x8e" + struct.pack("<Q", 16 * GIB) + b"xyz.",
        r"truncated: it asks for 17179869184 more bytes",
    ),
    "BYTEARRAY8 of 16 GiB": (
        b"\x80\x05\x96" + struct.pack("<Q", 16 * GIB) + b"xyz.",
        r"truncated: it asks for 17179869184 more bytes",
    ),
    # the C unpickler sizes its memo table by the largest index (here 2**26 pointers, 2**35 for 2**32 - 1)
    "LONG_BINPUT 2**25": (b"\x80\x02}r" + struct.pack("<I", 2**25) + b".", r"expected a Detectron2 .* it is empty"),
}


@pytest.mark.parametrize("name", list(HUGE_PICKLES))
def test_pickle_asking_for_huge_memory_is_refused_before_allocating(tmp_path, name):
    data, message = HUGE_PICKLES[name]
    path = tmp_path / "model_final.pkl"
    path.write_bytes(data)
    _refused_quickly(path, message)


def test_pickle_object_array_of_huge_shape_is_refused(tmp_path):
    """An object dtype sizes the array from its shape before reading the (empty) list of items."""
    data = (
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
        + b"(K\x01J" + struct.pack("<i", 2**24) + b"\x85cnumpy\ndtype\nU\x02O8K\x00K\x01\x87R"
        + b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tb\x89]tb."
    )
    path = tmp_path / "objects.pkl"
    path.write_bytes(data)
    _refused_quickly(path, r"refused the numpy dtype object")


def test_pickle_dtype_state_cannot_make_objects(tmp_path):
    """BUILD on a numpy dtype may set its flags (here: holds objects); the dtype is refused."""
    data = (
        b"\x80\x02cnumpy\ndtype\nU\x02f4\x89\x88\x87R"
        + b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tb."
    )
    path = tmp_path / "dtype.pkl"
    path.write_bytes(data)
    _refused_quickly(path, r"refused the numpy dtype float32 \(kind 'f', flags 63\)")


def test_pickle_codecs_only_latin1(tmp_path):
    path = tmp_path / "codec.pkl"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00utf-16\x86R.")
    _refused_quickly(path, r"refused _codecs.encode\(\.\.\., 'utf-16'\)")


def test_pickle_one_array_under_many_names_is_refused(tmp_path):
    """Pickle memoizes: one 64 KiB array named 4000 times is a 200 KB file of 256 MB of parameters."""
    shared = np.zeros(16384, np.float32)
    arrays = random_arrays(d2_layout())
    arrays.update({f"backbone.bottom_up.res2.{i}.extra.weight": shared for i in range(4000)})
    path = save_pkl(tmp_path / "shared.pkl", arrays)
    assert path.stat().st_size < 4 * 2**20
    with pytest.raises(CheckpointError, match=r"more than the \d+ bytes of the file"):
        d2.read_detectron2(path)


def test_pickle_shared_bytes_decoded_many_times_are_refused(tmp_path):
    """``_codecs.encode`` of one memoized string, many times: each call makes new bytes."""
    text = b"X" + struct.pack("<I", 16384) + b"a" * 16384 + b"q\x00X\x06\x00\x00\x00latin1q\x01"
    again = b"c_codecs\nencode\nh\x00h\x01\x86R"
    path = tmp_path / "encode.pkl"
    path.write_bytes(b"\x80\x02(c_codecs\nencode\n" + text + b"\x86R" + again * 2000 + b"l.")
    _refused_quickly(path, r"refused encoded bytes")


def test_python2_model_zoo_pickle_still_reads(tmp_path):
    """A Python 2 protocol-2 file as the model zoo has them: numpy.core names, raw data as str."""
    raw = np.arange(6, dtype="<f4").tobytes()
    data = (
        b"\x80\x02}q\x00(U\x05modelq\x01}q\x02U\x01aq\x03"
        b"cnumpy.core.multiarray\n_reconstruct\nq\x04cnumpy\nndarray\nq\x05K\x00\x85U\x01b\x87Rq\x06"
        b"(K\x01K\x02K\x03\x86cnumpy\ndtype\nq\x07U\x02f4K\x00K\x01\x87Rq\x08"
        b"(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T" + struct.pack("<I", len(raw)) + raw
        + b"tbsU\n__author__U\x04zoo!U\x13matching_heuristics\x88u."
    )
    out = d2.RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    assert out["__author__"] == "zoo!" and out["matching_heuristics"] is True
    assert np.array_equal(out["model"]["a"], np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
@pytest.mark.parametrize("top", [[1, 2, 3], 7, "text", None])
def test_pickle_of_no_dict_is_refused(tmp_path, suffix, top):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps(top, protocol=2))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


# --- matterport HDF5 -------------------------------------------------------------------------------


@pytest.fixture
def mp_file(tmp_path):
    """A valid tiny matterport .h5 in tmp_path (changed by each test), and its weights."""
    weights = tiny_matterport_weights()
    path = tmp_path / "mask_rcnn.h5"
    write_keras2_h5(path, weights)
    return path, weights


def test_external_link_is_refused(tmp_path, mp_file):
    path, weights = mp_file
    other = tmp_path / "elsewhere.h5"
    write_keras2_h5(other, weights)
    with h5py.File(path, "r+") as f:
        del f["mrcnn_mask"]
        f["mrcnn_mask"] = h5py.ExternalLink(str(other), "/mrcnn_mask")
    _refused_quickly(path, r"/mrcnn_mask is an external link to /mrcnn_mask in the file '.*elsewhere.h5'")


def test_external_link_deep_in_the_file_is_refused_too(tmp_path, mp_file):
    """Links anywhere are refused up front, not only those the weights are read through."""
    path, _ = mp_file
    with h5py.File(path, "r+") as f:
        f["conv1"].create_group("notes")["secret"] = h5py.ExternalLink("/etc/passwd.h5", "/x")
    _refused_quickly(path, r"/conv1/notes/secret is an external link to /x in the file '/etc/passwd.h5'")


def test_external_storage_is_refused(tmp_path, mp_file):
    path, weights = mp_file
    secret = tmp_path / "secret.bin"
    secret.write_bytes(weights["mrcnn_mask/bias"].tobytes())
    with h5py.File(path, "r+") as f:
        del f["mrcnn_mask/mrcnn_mask/bias:0"]
        f["mrcnn_mask"].create_dataset("mrcnn_mask/bias:0", shape=(3,), dtype="f4", external=[(str(secret), 0, 12)])
    _refused_quickly(path, r"dataset /mrcnn_mask/mrcnn_mask/bias:0 keeps its data in other files \('.*secret.bin'\)")


def test_virtual_dataset_is_refused(tmp_path, mp_file):
    path, weights = mp_file
    other = tmp_path / "source.h5"
    write_keras2_h5(other, weights)
    with h5py.File(path, "r+") as f:
        del f["mrcnn_mask/mrcnn_mask/bias:0"]
        layout = h5py.VirtualLayout(shape=(3,), dtype="f4")
        layout[:] = h5py.VirtualSource(str(other), "mrcnn_mask/mrcnn_mask/bias:0", shape=(3,))
        f["mrcnn_mask"].create_virtual_dataset("mrcnn_mask/bias:0", layout)
    _refused_quickly(path, r"dataset /mrcnn_mask/mrcnn_mask/bias:0 is a virtual dataset mapped from .*source.h5")


def test_filter_plugin_is_refused(mp_file):
    """A filter id libhdf5 does not know makes it search its plugin path for a library to load."""
    from h5py import h5d, h5p, h5s, h5t, h5z

    path, _ = mp_file
    with h5py.File(path, "r+") as f:
        del f["mrcnn_mask/mrcnn_mask/bias:0"]
        dcpl = h5p.create(h5p.DATASET_CREATE)
        dcpl.set_chunk((3,))
        dcpl.set_filter(40123, h5z.FLAG_OPTIONAL, ())
        h5d.create(f["mrcnn_mask"].id, b"mrcnn_mask/bias:0", h5t.NATIVE_FLOAT, h5s.create_simple((3,)), dcpl=dcpl)
    _refused_quickly(path, r"dataset /mrcnn_mask/mrcnn_mask/bias:0 needs HDF5 filter plugins \[40123\]")


@pytest.mark.parametrize("target", ["/nowhere", "/conv1/conv1/kernel:0/below", "mrcnn_mask_real/../x"])
def test_soft_link_out_of_the_file_is_refused(mp_file, target):
    path, _ = mp_file
    with h5py.File(path, "r+") as f:
        f.move("mrcnn_mask", "mrcnn_mask_real")
        f["mrcnn_mask"] = h5py.SoftLink(target)
    _refused_quickly(path, rf"/mrcnn_mask is a soft link to {target}, which is not an object of this file")


def test_soft_link_inside_the_file_is_read(mp_file):
    path, _ = mp_file
    with h5py.File(path, "r+") as f:
        f.move("mrcnn_mask", "mrcnn_mask_real")
        f["mrcnn_mask"] = h5py.SoftLink("/mrcnn_mask_real")
    assert load_checkpoint(path).family == "matterport"


def test_dataset_of_data_not_in_the_file_is_refused(mp_file):
    """A chunked dataset never written reads as its fill value: any size from a few bytes."""
    path, _ = mp_file
    with h5py.File(path, "r+") as f:
        del f["mrcnn_mask/mrcnn_mask/bias:0"]
        f["mrcnn_mask"].create_dataset("mrcnn_mask/bias:0", shape=(2**26,), dtype="f4", chunks=(2**16,))
    assert path.stat().st_size < 2**20
    _refused_quickly(path, r"its weights declare \d+ bytes, more than 2 x the \d+ bytes of the file")


def _malform(f, case: str) -> None:
    layer = f["mrcnn_mask"]
    if case == "group where a dataset belongs":
        del layer["mrcnn_mask/bias:0"]
        layer.create_group("mrcnn_mask/bias:0")
    elif case == "dataset where a layer group belongs":
        del f["mrcnn_mask"]
        f["mrcnn_mask"] = np.zeros(3, np.float32)
    elif case == "no layer_names":
        del f.attrs["layer_names"]
    elif case == "layer listed but missing":
        del f["mrcnn_mask"]
    elif case == "weight listed but missing":
        del layer["mrcnn_mask/bias:0"]
    elif case == "layer name not UTF-8":
        f.attrs["layer_names"] = [b"conv1", b"\xff\xfe"]
    elif case == "weight name not UTF-8":
        layer.attrs["weight_names"] = [b"mrcnn_mask/kernel:0", b"mrcnn_mask/\xffbias:0"]
    elif case == "layer_names a number":
        f.attrs["layer_names"] = 42
    elif case == "text weights":
        del layer["mrcnn_mask/bias:0"]
        layer.create_dataset("mrcnn_mask/bias:0", data=np.array([b"a", b"b", b"c"]))
    elif case == "bias of rank 2":
        del layer["mrcnn_mask/bias:0"]
        layer.create_dataset("mrcnn_mask/bias:0", data=np.zeros((3, 1), np.float32))
    elif case == "kernel of rank 3":
        del layer["mrcnn_mask/kernel:0"]
        layer.create_dataset("mrcnn_mask/kernel:0", data=np.zeros((1, 8, 3), np.float32))
    elif case == "bias of the wrong length":
        del layer["mrcnn_mask/bias:0"]
        layer.create_dataset("mrcnn_mask/bias:0", data=np.zeros(5, np.float32))
    elif case == "rpn deltas not in fours":
        rpn = f["rpn_model"]
        for name, shape in (("kernel:0", (1, 1, 8, 10)), ("bias:0", (10,))):
            del rpn[f"rpn_bbox_pred/{name}"]
            rpn.create_dataset(f"rpn_bbox_pred/{name}", data=np.zeros(shape, np.float32))


MALFORMED = {
    "group where a dataset belongs": r"lists the weight 'mrcnn_mask/bias:0', but /mrcnn_mask holds a group",
    "dataset where a layer group belongs": r"layer_names lists 'mrcnn_mask', and / has a dataset",
    "no layer_names": r"no Keras 'layer_names' attribute",
    "layer listed but missing": r"layer_names lists 'mrcnn_mask', and / has no such group",
    "weight listed but missing": r"lists the weight 'mrcnn_mask/bias:0', but /mrcnn_mask holds nothing",
    "layer name not UTF-8": r"'layer_names' of / holds a name that is not UTF-8: b'\\xff\\xfe'",
    "weight name not UTF-8": r"'weight_names' of /mrcnn_mask holds a name that is not UTF-8",
    "layer_names a number": r"'layer_names' of / is not a list of names",
    "text weights": r"weight 'mrcnn_mask/bias:0' is of type \|S1, not numbers",
    "bias of rank 2": r"wrong rank \(1\): mrcnn_mask/bias \(3, 1\) \(expected 1-D\)",
    "kernel of rank 3": r"wrong rank \(1\): mrcnn_mask/kernel \(1, 8, 3\) \(expected 4-D\)",
    "bias of the wrong length": r"mrcnn_mask/bias has shape \(5,\); its layer has 3 outputs",
    "rpn deltas not in fours": r"rpn_bbox_pred/kernel has 10 outputs; matterport has 4 per anchor",
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_keras_layout_is_a_checkpoint_error(mp_file, case):
    path, _ = mp_file
    with h5py.File(path, "r+") as f:
        _malform(f, case)
    with pytest.raises(CheckpointError, match=MALFORMED[case]):
        load_checkpoint(path)


# --- Keras 3 archives ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mask_rcnn.keras", "mask_rcnn.h5", "mask_rcnn_weights"])
def test_keras3_archive_is_named_whatever_its_suffix(tmp_path, name):
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", '{"keras_version": "3.5.0"}')
        archive.writestr("config.json", '{"class_name": "Functional"}')
        archive.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n")
    with pytest.raises(CheckpointError, match=r"is a Keras 3 \.keras archive .* model\.save\('mask_rcnn\.h5'\)"):
        load_checkpoint(path)


def test_keras3_weights_file_is_named(tmp_path):
    path = tmp_path / "mask_rcnn.weights.h5"
    with h5py.File(path, "w") as f:
        f.create_group("layers").create_group("conv1").create_group("vars")["0"] = np.zeros(3, np.float32)
        f.create_group("vars")
    with pytest.raises(CheckpointError, match=r"is a Keras 3 weights file"):
        load_checkpoint(path)


# --- torch.save zips ------------------------------------------------------------------------------


#: load a checkpoint in a fresh interpreter; report the error and how far the resident memory peaked
#: above where it was (Linux: clear_refs 5 resets the peak, VmHWM, to the current size)
LOAD_PROBE = """
import json, sys
from weights import CheckpointError, load_checkpoint

def mib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = mib("VmRSS:")
try:
    load_checkpoint(sys.argv[1])
    error = None
except CheckpointError as exc:
    error = str(exc)
print(json.dumps({"error": error, "grown_mib": mib("VmHWM:") - before}))
"""


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_compressed_torch_zip_is_refused_before_inflating(tmp_path, suffix):
    """torch.load inflates deflated records: 256 MiB of zeros from a file of some 300 KB (torch's
    allocations are not traced by tracemalloc: the peak resident memory of a fresh process is)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to measure the peak resident memory")
    stored = tmp_path / "stored.pth"
    torch.save({"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(2**26)}}, stored)
    path = tmp_path / f"bomb{suffix}"
    with zipfile.ZipFile(stored) as original, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bomb:
        for member in original.namelist():
            with original.open(member) as src, bomb.open(member, "w") as dst:
                shutil.copyfileobj(src, dst, 2**20)
    stored.unlink()
    assert path.stat().st_size < 2**20
    probe = run_probe(LOAD_PROBE, str(path))
    assert probe["grown_mib"] < 64, probe
    assert re.search(r"its zip members unpack to \d+ bytes, more than 2 x the \d+ bytes of the file", probe["error"])


# --- any file -------------------------------------------------------------------------------------


def test_directory_device_and_empty_file(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)
    if os.path.exists("/dev/zero"):
        with pytest.raises(CheckpointError, match="not a regular file"):
            load_checkpoint("/dev/zero")
    for suffix in (".pth", ".pkl", ".h5", ""):
        (tmp_path / f"empty{suffix}").write_bytes(b"")
        with pytest.raises(CheckpointError, match="is empty"):
            load_checkpoint(tmp_path / f"empty{suffix}")
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_checkpoint(tmp_path / "missing.pth")


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(suffix=st.sampled_from([".pth", ".pkl", ".h5", ".bin"]), data=st.binary(min_size=1, max_size=2048))
def test_random_bytes_give_checkpoint_errors(tmp_path_factory, suffix, data):
    path = tmp_path_factory.mktemp("random") / f"model{suffix}"
    path.write_bytes(data)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def _mutated(original: bytes, cut: int | None, edits: list[tuple[int, int]]) -> bytes:
    data = bytearray(original)
    for position, value in edits:
        data[position % len(data)] = value
    return bytes(data[:cut] if cut is not None else data)


@pytest.mark.parametrize("name", list(VALID))
@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    cut=st.none() | st.floats(0.0, 1.0),
    edits=st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), max_size=6),
    head=st.booleans(),
)
def test_truncated_or_corrupted_checkpoints_load_or_give_checkpoint_errors(tmp_path, name, cut, edits, head):
    """Each valid tiny checkpoint, cut short and with bytes overwritten (``head``: within its first
    KiB, where the headers and the pickle's opcodes are), loads or raises CheckpointError, nothing else."""
    original = valid_file(name)
    edits = [(p % 1024 if head else p, v) for p, v in edits]
    path = tmp_path / f"mutated_{name}"
    path.write_bytes(_mutated(original, None if cut is None else max(1, int(cut * len(original))), edits))
    try:
        load_checkpoint(path)
    except CheckpointError:
        pass


@pytest.mark.parametrize(
    "key",
    ["backbone.body.layer1.0.conv2.weight", "roi_heads.box_predictor.cls_score.weight", "rpn.head.cls_logits.weight"],
)
def test_a_state_dict_missing_a_tensor_the_sizes_are_read_from_gives_checkpoint_error(key):
    """A tensor the family's conversion reads deep inside (not one of its signature keys): the
    raw KeyError it met becomes a CheckpointError naming the family."""
    from tiny import tiny_state_dict

    from weights import load_checkpoint
    from weights.errors import CheckpointError

    state = tiny_state_dict()
    del state[key]
    with pytest.raises(CheckpointError, match="torchvision"):
        load_checkpoint(state)
