"""matterport checkpoints: reading Keras .h5 files and reproducing the network stage by stage.

The oracle is matterport's graph rebuilt from real Keras 3 layers (tests/matterport_keras.py),
with random weights and batch-norm statistics; the engine reads the same weights from a file in
matterport's Keras 2.2.4 layout and must give the same FPN maps, RPN outputs, class
probabilities, box deltas and mask probabilities.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest
import torch

import engine  # noqa: F401  (weights imports engine)
from engine.backbone import tf_same_max_pool
from engine.config import TORCHVISION_MASKRCNN_R50_FPN
from engine.loading import build_model
from weights import Checkpoint, CheckpointError
from weights import matterport as mp

keras = pytest.importorskip("keras")
pytest.importorskip("h5py")
if keras.backend.backend() != "torch":  # pragma: no cover - the oracle is run on the torch backend
    pytest.skip("the Keras oracle needs KERAS_BACKEND=torch", allow_module_level=True)

from matterport_keras import matterport_models, randomise, write_keras2_h5  # noqa: E402

MEAN_PIXEL = np.array([123.7, 116.8, 103.9], dtype=np.float32)
NUM_CLASSES = 81
# network-only configuration: what the matterport network itself needs (eps, stride, stem pool)
NETWORK_CONFIG = TORCHVISION_MASKRCNN_R50_FPN.replace(name="matterport_network", bn_eps=mp.BN_EPS, stride_in_1x1=True, stem_pool="tf_same")


@pytest.fixture(scope="module")
def keras_matterport():
    models = matterport_models(NUM_CLASSES)
    weights = randomise(models, seed=3)
    return models, weights


@pytest.fixture(scope="module")
def engine_model(keras_matterport, tmp_path_factory):
    _, weights = keras_matterport
    path = tmp_path_factory.mktemp("mp") / "mask_rcnn_random.h5"
    write_keras2_h5(path, weights)
    state, spec = mp.convert(path)
    checkpoint = Checkpoint(state_dict=state, spec=spec, family="matterport")
    return build_model(checkpoint, config=NETWORK_CONFIG)


def _close(actual: torch.Tensor, expected: np.ndarray, *, rtol: float = 1e-4, what: str = "") -> None:
    expected = torch.from_numpy(np.asarray(expected, dtype=np.float32))
    scale = float(expected.abs().max()) or 1.0
    err = float((actual - expected).abs().max())
    assert err <= rtol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def _molded_photo(height: int, width: int) -> np.ndarray:
    from skimage import data

    image = data.astronaut()[:height, :width].astype(np.float32)
    return image - MEAN_PIXEL


def test_reader_keras2_layout_and_model_weights_group(tmp_path, keras_matterport):
    _, weights = keras_matterport
    for full in (False, True):
        path = tmp_path / f"w{int(full)}.h5"
        write_keras2_h5(path, weights, full_model=full)
        read = mp.read_matterport(path)
        assert set(read) == set(weights)
        assert all(np.array_equal(read[k], weights[k]) for k in weights)
    assert mp.looks_like_matterport(f"{k}:0" for k in weights)
    assert not mp.looks_like_matterport(["backbone.body.conv1.weight"])


def test_spec_read_from_the_file(engine_model):
    spec = engine_model.spec
    assert spec.blocks_per_stage == (3, 4, 6, 3)
    assert spec.rpn_channels == 512 and spec.num_anchors == 3
    assert spec.num_classes == spec.num_box_classes == spec.num_mask_classes == NUM_CLASSES
    assert spec.mask_norm and spec.mask_convs == 4 and spec.representation_size == 1024


@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
def test_features_and_rpn_match_keras(keras_matterport, engine_model, size):
    models, _ = keras_matterport
    image = _molded_photo(*size)
    expected = [np.asarray(p.detach().cpu()) for p in models["backbone"](image[None], training=False)]
    with torch.no_grad():
        features = engine_model.backbone(torch.from_numpy(image).permute(2, 0, 1)[None])
        logits, deltas = engine_model.rpn.head(features)
    assert len(features) == 5
    for level, (ours, theirs) in enumerate(zip(features, expected), start=2):
        assert tuple(ours.shape[-2:]) == theirs.shape[1:3], f"P{level} size"
        _close(ours.permute(0, 2, 3, 1), theirs, what=f"P{level}")
        pair_logits, probs, bbox = (np.asarray(t.detach().cpu()) for t in models["rpn"](theirs, training=False))
        b, a, h, w = logits[level - 2].shape
        ours_logit = logits[level - 2].permute(0, 2, 3, 1).reshape(b, -1)
        # one logit per anchor is fg - bg: compare on the scale of the pair (cancellation in the difference)
        _close(ours_logit, pair_logits[..., 1] - pair_logits[..., 0], rtol=1e-4 * np.abs(pair_logits).max()
               / max(np.abs(pair_logits[..., 1] - pair_logits[..., 0]).max(), 1e-6), what=f"RPN logit P{level}")
        _close(torch.sigmoid(ours_logit), probs[..., 1], rtol=1e-3, what=f"RPN foreground P{level}")
        ours_d = deltas[level - 2].view(b, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4)
        _close(ours_d, bbox[..., [1, 0, 3, 2]], what=f"RPN deltas P{level}")


def test_box_and_mask_heads_match_keras(keras_matterport, engine_model):
    models, _ = keras_matterport
    rng = np.random.default_rng(5)
    pooled7 = rng.normal(0, 1, (6, 7, 7, 256)).astype(np.float32)
    pooled14 = rng.normal(0, 1, (3, 14, 14, 256)).astype(np.float32)
    probs, deltas = (np.asarray(t.detach().cpu()) for t in models["classifier"](pooled7, training=False))
    masks = np.asarray(models["mask"](pooled14, training=False).detach().cpu())
    heads = engine_model.roi_heads
    with torch.no_grad():
        logits, box_deltas = heads.box_predictor(heads.box_head(torch.from_numpy(pooled7).permute(0, 3, 1, 2)))
        mask_logits = heads.mask_predictor(heads.mask_head(torch.from_numpy(pooled14).permute(0, 3, 1, 2)))
    _close(torch.softmax(logits, -1), probs, what="class probabilities")
    _close(box_deltas.view(6, NUM_CLASSES, 4), deltas[..., [1, 0, 3, 2]], what="box deltas")
    _close(torch.sigmoid(mask_logits).permute(0, 2, 3, 1), masks, what="mask probabilities")


@pytest.mark.parametrize("size", [(8, 8), (7, 9), (1, 2), (6, 5)])
def test_tf_same_max_pool_matches_keras(size):
    from keras import layers

    x = np.random.default_rng(1).normal(size=(2, *size, 3)).astype(np.float32)
    expected = np.asarray(layers.MaxPooling2D((3, 3), strides=(2, 2), padding="same")(x).detach().cpu())
    ours = tf_same_max_pool(torch.from_numpy(x).permute(0, 3, 1, 2), kernel_size=3, stride=2)
    assert torch.equal(ours.permute(0, 2, 3, 1), torch.from_numpy(expected))
    if size[0] % 2 == 0 and size[0] > 2:  # PyTorch's symmetric padding shifts the windows of even maps
        torch_pool = torch.nn.functional.max_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), 3, 2, padding=1)
        assert not torch.equal(torch_pool.permute(0, 2, 3, 1), torch.from_numpy(expected))


def test_r101_block_letters():
    names = {f"res4{chr(97 + i)}_branch2a/kernel": None for i in range(23)}
    letters = mp._letters(names, 4)
    assert letters == [chr(97 + i) for i in range(23)] and letters[-1] == "w"


def test_errors_name_what_is_wrong(tmp_path, keras_matterport):
    _, weights = keras_matterport
    incomplete = {k: v for k, v in weights.items() if not k.startswith("mrcnn_mask_deconv")}
    with pytest.raises(CheckpointError, match="mrcnn_mask_deconv"):
        mp.convert(incomplete)
    extra = dict(weights, **{"mystery_layer/kernel": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match="mystery_layer"):
        mp.convert(extra)
    with pytest.raises(CheckpointError, match="not a matterport"):
        mp.convert({"conv1/kernel": np.zeros((7, 7, 3, 64), np.float32)})
    not_h5 = tmp_path / "x.h5"
    not_h5.write_bytes(b"not an hdf5 file")
    with pytest.raises(CheckpointError, match="HDF5"):
        mp.read_matterport(not_h5)


def test_caller_mapping_not_modified(keras_matterport):
    _, weights = keras_matterport
    before = {k: v.copy() for k, v in weights.items()}
    mp.convert(weights)
    assert set(before) == set(weights) and all(np.array_equal(before[k], weights[k]) for k in weights)


def test_family_detection_and_mixed_up_checkpoints(tmp_path, keras_matterport):
    from weights import detect_family, load_checkpoint

    _, weights = keras_matterport
    path = tmp_path / "model.h5"
    write_keras2_h5(path, weights)
    assert load_checkpoint(path).family == "matterport"
    assert detect_family({f"{k}:0": v for k, v in weights.items()}) == "matterport"
    with pytest.raises(CheckpointError, match="not tensors"):
        load_checkpoint(path, family="torchvision")
    with pytest.raises(CheckpointError, match="not a matterport"):
        load_checkpoint({"backbone.body.conv1.weight": torch.zeros(64, 3, 7, 7)}, family="matterport")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(CheckpointError):
        load_checkpoint(truncated)


def test_missing_h5py_is_explained(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` fail
    with pytest.raises(CheckpointError, match="pip install h5py"):
        mp.read_matterport(tmp_path / "any.h5")
