"""Image inputs: every accepted form converts to the documented uint8 RGB values, every bad
input is rejected with a message naming the image, inputs are never modified, and the real
Predictor runs on random shapes/dtypes and on degenerate sizes (1x1, 20x4000)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Predictor
from engine.inputs import as_rgb_uint8_images
from tiny import TINY_CONFIG, tiny_state_dict


def rgb(*pixels_rows) -> np.ndarray:
    """uint8 [H, W, 3] from rows of (r, g, b) triples: the expected output, spelled out."""
    return np.array(pixels_rows, dtype=np.uint8)


def gray3(values) -> np.ndarray:
    """uint8 [H, W, 3] with each grayscale value replicated to R, G and B."""
    v = np.asarray(values, dtype=np.uint8)
    return np.repeat(v[:, :, None], 3, axis=2)


RGB_2x2 = rgb([(1, 2, 3), (4, 5, 6)], [(7, 8, 9), (250, 251, 255)])

# (id, input factory, expected uint8 [H, W, 3]); factories so that every test gets fresh objects.
ACCEPTED = [
    ("uint8-hwc", lambda: RGB_2x2.copy(), RGB_2x2),
    ("uint8-negative-stride", lambda: RGB_2x2.copy()[:, ::-1], RGB_2x2[:, ::-1]),
    ("uint8-fortran-order", lambda: np.asfortranarray(RGB_2x2), RGB_2x2),
    ("uint8-strided-view", lambda: np.repeat(RGB_2x2, 2, axis=1)[:, ::2], RGB_2x2),
    ("uint8-gray-hw", lambda: np.array([[0, 10], [200, 255]], np.uint8), gray3([[0, 10], [200, 255]])),
    ("uint8-gray-hw1", lambda: np.array([[[0], [10]], [[200], [255]]], np.uint8), gray3([[0, 10], [200, 255]])),
    (
        "uint8-rgba-alpha-dropped",
        lambda: np.concatenate([RGB_2x2, np.full((2, 2, 1), 17, np.uint8)], axis=2),
        RGB_2x2,
    ),
    ("bool-gray", lambda: np.array([[True, False]]), gray3([[255, 0]])),
    ("bool-rgb", lambda: np.array([[[True, False, True]]]), rgb([(255, 0, 255)])),
    (
        # v / 257 rounded to nearest: 128 -> 0.498, 129 -> 0.502, 32767 -> 127.498, 32768 -> 127.502
        "uint16-scaled",
        lambda: np.array([[0, 65535, 257, 128, 129, 32767, 32768, 32896]], np.uint16),
        gray3([[0, 255, 1, 0, 1, 127, 128, 128]]),
    ),
    ("uint16-big-endian", lambda: np.array([[0, 65535]], ">u2"), gray3([[0, 255]])),
    (
        "float32-unit-range",
        lambda: np.array([[0.0, 0.5, 1.0, 0.25, -0.2, 1.0 / 255]], np.float32),
        gray3([[0, 128, 255, 64, 0, 1]]),
    ),
    (
        "float64-0-255-range",
        lambda: np.array([[0.4, 2.5, 254.6, 300.0, -3.0, 1.5]], np.float64),
        gray3([[0, 3, 255, 255, 0, 2]]),
    ),
    ("float16-unit-range", lambda: np.array([[[0.0, 0.5, 1.0]]], np.float16), rgb([(0, 128, 255)])),
    ("float32-all-zero", lambda: np.zeros((1, 2, 3), np.float32), np.zeros((1, 2, 3), np.uint8)),
    (
        # alpha is dropped before the range is decided: an alpha of 255 does not make RGB [0, 255]
        "float32-rgba-alpha-ignored",
        lambda: np.array([[[0.5, 1.0, 0.0, 255.0]]], np.float32),
        rgb([(128, 255, 0)]),
    ),
    ("int64-in-range", lambda: np.array([[[0, 128, 255]]], np.int64), rgb([(0, 128, 255)])),
    ("int8-in-range", lambda: np.array([[0, 127]], np.int8), gray3([[0, 127]])),
    ("uint32-in-range", lambda: np.array([[[3, 4, 255]]], np.uint32), rgb([(3, 4, 255)])),
    (
        # [3, 1, 4]: both ends could be channels; numpy arrays follow OpenCV/PIL (HWC, here RGBA)
        "numpy-ambiguous-is-hwc",
        lambda: np.arange(12, dtype=np.uint8).reshape(3, 1, 4),
        np.arange(12, dtype=np.uint8).reshape(3, 1, 4)[..., :3],
    ),
    ("tensor-uint8-hwc", lambda: torch.from_numpy(RGB_2x2.copy()), RGB_2x2),
    ("tensor-uint8-chw", lambda: torch.from_numpy(RGB_2x2.copy()).permute(2, 0, 1).contiguous(), RGB_2x2),
    ("tensor-uint8-chw-view", lambda: torch.from_numpy(RGB_2x2.copy()).permute(2, 0, 1), RGB_2x2),
    (
        "tensor-float-chw-unit",
        lambda: torch.tensor([[[0.0, 1.0]], [[0.5, 0.25]], [[1.0, 0.0]]]),
        rgb([(0, 128, 255), (255, 64, 0)]),
    ),
    ("tensor-gray-hw", lambda: torch.tensor([[0, 255]], dtype=torch.uint8), gray3([[0, 255]])),
    ("tensor-gray-1hw", lambda: torch.tensor([[[0.0, 1.0]]]), gray3([[0, 255]])),
    (
        "tensor-rgba-chw",
        lambda: torch.cat(
            [torch.from_numpy(RGB_2x2.copy()).permute(2, 0, 1), torch.full((1, 2, 2), 9, dtype=torch.uint8)]
        ),
        RGB_2x2,
    ),
    (
        # [3, 1, 4]: both ends could be channels; tensors follow torchvision (CHW)
        "tensor-ambiguous-is-chw",
        lambda: torch.arange(12, dtype=torch.uint8).reshape(3, 1, 4),
        np.arange(12, dtype=np.uint8).reshape(3, 1, 4).transpose(1, 2, 0),
    ),
    (
        # [1, 4, 3]: the first dim is a channel count, so this is a 4x3 grayscale image, not 1x4 RGB
        "tensor-1x4x3-is-chw-gray",
        lambda: torch.from_numpy(RGB_2x2.copy()).reshape(1, 4, 3),
        gray3(RGB_2x2.reshape(4, 3)),
    ),
    ("tensor-bfloat16", lambda: torch.tensor([[0.0, 0.5, 1.0]], dtype=torch.bfloat16), gray3([[0, 128, 255]])),
    ("tensor-uint16", lambda: torch.tensor([[0, 65535]], dtype=torch.uint16), gray3([[0, 255]])),
    ("tensor-bool", lambda: torch.tensor([[True, False]]), gray3([[255, 0]])),
    ("tensor-requires-grad", lambda: torch.tensor([[0.0, 0.5]], requires_grad=True), gray3([[0, 128]])),
]


def _clone(obj):
    return obj.detach().clone() if isinstance(obj, torch.Tensor) else obj.copy()


def _assert_same(before, after):
    if isinstance(before, torch.Tensor):
        assert before.dtype == after.dtype and before.shape == after.shape
        assert torch.equal(before, after.detach())
    else:
        assert before.dtype == after.dtype and before.shape == after.shape
        np.testing.assert_array_equal(before, after)


def _check_output(out: np.ndarray):
    assert type(out) is np.ndarray
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.flags.c_contiguous


@pytest.mark.parametrize("make,expected", [pytest.param(m, e, id=i) for i, m, e in ACCEPTED])
def test_accepted_form_converts_to_documented_values(make, expected):
    image = make()
    before = _clone(image)
    if isinstance(image, np.ndarray):
        image.flags.writeable = False  # any write into the caller's array would raise
    (out,) = as_rgb_uint8_images([image])
    _check_output(out)
    np.testing.assert_array_equal(out, expected)
    _assert_same(before, image)


def _byte_range(obj) -> tuple[int, int]:
    """[start, end) addresses of the memory an array or a tensor's storage occupies."""
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        return storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    low, high = np.lib.array_utils.byte_bounds(obj) if hasattr(np.lib, "array_utils") else np.byte_bounds(obj)
    return low, high


def _needs_no_conversion(image) -> bool:
    """The one pass-through case: uint8 whose [H, W, 3] reading is C-contiguous in memory.

    A tensor is read as [H, W, C] after undoing the CHW rule, so a CHW view of HWC memory passes too.
    """
    if isinstance(image, torch.Tensor):
        hwc = image.permute(1, 2, 0) if image.ndim == 3 and image.shape[0] in (1, 3, 4) else image
        return image.dtype == torch.uint8 and hwc.ndim == 3 and hwc.shape[2] == 3 and hwc.is_contiguous()
    return image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.flags.c_contiguous


@pytest.mark.parametrize("make,expected", [pytest.param(m, e, id=i) for i, m, e in ACCEPTED])
def test_output_shares_memory_only_when_nothing_was_converted(make, expected):
    image = make()
    (out,) = as_rgb_uint8_images(image)
    in_start, in_end = _byte_range(image)
    out_start, out_end = _byte_range(out)
    overlaps = out_start < in_end and in_start < out_end
    assert overlaps == _needs_no_conversion(image)
    if isinstance(image, np.ndarray) and _needs_no_conversion(image):
        assert out is image


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_real_pil_image_is_rejected_with_hint(mode):
    pil_image = pytest.importorskip("PIL.Image")
    with pytest.raises(TypeError, match=r"images\[0\] is a PIL\.Image\.Image .*np\.asarray\(img\.convert"):
        as_rgb_uint8_images([pil_image.new(mode, (4, 3))])


def test_containers_single_image_list_tuple_and_empty():
    assert as_rgb_uint8_images([]) == []
    assert as_rgb_uint8_images(()) == []
    single = as_rgb_uint8_images(RGB_2x2)
    assert len(single) == 1 and single[0] is RGB_2x2
    mixed = (RGB_2x2, torch.from_numpy(RGB_2x2).permute(2, 0, 1), RGB_2x2.astype(np.float32) / 255)
    outs = as_rgb_uint8_images(mixed)
    assert len(outs) == 3
    for out in outs:
        _check_output(out)
        np.testing.assert_array_equal(out, RGB_2x2)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64, torch.bool, torch.int32, torch.uint16])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_chw_tensor_equals_hwc_array(dtype, channels):
    rng = np.random.default_rng(channels)
    high = {torch.bool: 2, torch.uint16: 65536}.get(dtype, 256)
    hwc = rng.integers(0, high, size=(5, 7, channels))
    if dtype.is_floating_point:
        hwc = hwc / 255.0  # the [0, 1] convention
    tensor_dtype_as_numpy = torch.empty(0, dtype=dtype).numpy().dtype
    hwc = hwc.astype(tensor_dtype_as_numpy)
    chw = torch.from_numpy(hwc.copy()).permute(2, 0, 1)
    from_tensor, from_array = as_rgb_uint8_images([chw, hwc])
    np.testing.assert_array_equal(from_tensor, from_array)


def test_grad_tensor_and_device_are_handled():
    t = torch.rand(3, 4, 5, requires_grad=True)
    (out,) = as_rgb_uint8_images(t)
    np.testing.assert_array_equal(out, np.floor(t.detach().permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
    if torch.cuda.is_available():
        (on_gpu,) = as_rgb_uint8_images(t.detach().cuda())
        np.testing.assert_array_equal(on_gpu, out)


class _FakePILImage:
    """Stands in for PIL.Image.Image: only the module name matters to the error hint."""


_FakePILImage.__module__ = "PIL.Image"

GOOD = np.zeros((4, 4, 3), np.uint8)

# (id, images, exception, message pattern, index of the bad image or None for the container)
REJECTED = [
    ("str-container", "not an image", TypeError, r"images must be one image .*got a str", None),
    ("none-container", None, TypeError, r"got None", None),
    ("generator-container", (x for x in [GOOD]), TypeError, r"list/tuple.*got a generator", None),
    ("dict-container", {0: GOOD}, TypeError, r"got a dict", None),
    ("str-element", [GOOD, "cat.jpg"], TypeError, r"images\[1\] is a str \(file paths are not read", 1),
    ("none-element", [None], TypeError, r"images\[0\] is None", 0),
    ("nested-list", [GOOD, GOOD, [[[0, 0, 0]]]], TypeError, r"images\[2\] is a list \(images cannot be nested", 2),
    ("pil-element", [_FakePILImage()], TypeError, r"is a PIL\.Image\._FakePILImage .*np\.asarray\(img\.convert", 0),
    ("scalar-element", [np.float32(1.0)], TypeError, r"images\[0\] is a numpy\.float32", 0),
    ("complex-array", [np.zeros((4, 4, 3), np.complex64)], TypeError, r"unsupported dtype.*dtype complex64", 0),
    ("object-array", [np.zeros((4, 4, 3), object)], TypeError, r"unsupported dtype.*dtype object", 0),
    ("string-array", [np.full((4, 4, 3), "a")], TypeError, r"unsupported dtype.*dtype <U1", 0),
    ("complex-tensor", [torch.zeros(3, 4, 4, dtype=torch.complex64)], TypeError, r"complex and quantized dtypes", 0),
    ("sparse-tensor", [torch.zeros(4, 4).to_sparse()], TypeError, r"sparse tensors are not images", 0),
    ("meta-tensor", [torch.zeros(3, 4, 4, device="meta")], TypeError, r"meta tensor holds no pixel values", 0),
    ("nan", [GOOD, np.array([[0.1, np.nan]], np.float32)], ValueError, r"images\[1\] has 1 NaN or infinite", 1),
    ("inf", [np.array([[[0.1, np.inf, -np.inf]]], np.float64)], ValueError, r"images\[0\] has 2 NaN or infinite", 0),
    ("nan-tensor", [torch.tensor([[float("nan")]])], ValueError, r"NaN or infinite", 0),
    ("negative-int", [np.array([[-1, 5]], np.int32)], ValueError, r"outside \[0, 255\] \(min -1, max 5\)", 0),
    ("large-int", [np.array([[0, 256]], np.int64)], ValueError, r"outside \[0, 255\] \(min 0, max 256\)", 0),
    ("large-uint32", [np.array([[300]], np.uint32)], ValueError, r"outside \[0, 255\]", 0),
    ("large-int-tensor", [torch.tensor([[1000]])], ValueError, r"outside \[0, 255\]", 0),
    ("zero-height", [np.zeros((0, 5, 3), np.uint8)], ValueError, r"images\[0\] is empty.*at least 1", 0),
    ("zero-width-gray", [GOOD, np.zeros((5, 0), np.float32)], ValueError, r"images\[1\] is empty", 1),
    ("zero-size-chw-tensor", [torch.zeros(3, 0, 5)], ValueError, r"is empty", 0),
    ("two-channels", [np.zeros((4, 4, 2), np.uint8)], ValueError, r"images\[0\] has 2 channels", 0),
    ("five-channels", [np.zeros((4, 4, 5), np.uint8)], ValueError, r"has 5 channels", 0),
    ("zero-channels", [np.zeros((4, 4, 0), np.uint8)], ValueError, r"has 0 channels", 0),
    ("numpy-chw", [np.zeros((3, 8, 8), np.uint8)], ValueError, r"has 8 channels.*arr\.transpose\(1, 2, 0\)", 0),
    ("tensor-two-channels-first", [torch.zeros(2, 8, 8)], ValueError, r"has 8 channels.*read as \[C, H, W\] when", 0),
    ("tensor-two-channels-last", [torch.zeros(8, 8, 2)], ValueError, r"has 2 channels", 0),
    ("batch-4d", [np.zeros((1, 8, 8, 3), np.uint8)], ValueError, r"images\[0\] is 4-D.*list\(batch\)", 0),
    ("batch-4d-tensor", torch.zeros(2, 3, 8, 8), ValueError, r"images\[0\] is 4-D", 0),
    ("5d", [np.zeros((1, 1, 8, 8, 3), np.uint8)], ValueError, r"is 5-D", 0),
    ("1d", [np.zeros(8, np.uint8)], ValueError, r"is 1-D", 0),
    ("0d", [np.array(3, np.uint8)], ValueError, r"is 0-D", 0),
]


@pytest.mark.parametrize("images,exc,match,index", [pytest.param(*r[1:], id=r[0]) for r in REJECTED])
def test_rejection_is_clear(images, exc, match, index):
    with pytest.raises(exc, match=match) as info:
        as_rgb_uint8_images(images)
    message = str(info.value)
    assert "accepted:" in message, "every rejection says what is accepted"
    if index is not None:
        assert f"images[{index}]" in message
        bad = images if isinstance(images, (np.ndarray, torch.Tensor)) else images[index]
        if isinstance(bad, (np.ndarray, torch.Tensor)):
            # what was received: type, shape and dtype
            assert str(tuple(bad.shape)) in message and str(bad.dtype) in message
            assert ("numpy.ndarray" if isinstance(bad, np.ndarray) else "torch.Tensor") in message


def test_rejections_come_through_predictor_run(predictor):
    with pytest.raises(TypeError, match=r"images\[1\] is None"):
        predictor.run([GOOD, None])
    with pytest.raises(ValueError, match=r"images\[0\] has 2 channels"):
        predictor.run(np.zeros((4, 4, 2), np.uint8))


# --- the real pipeline ----------------------------------------------------------------------

BOX_TOLERANCE = 1e-2  # boxes are scaled back to the input frame and not re-clipped (as torchvision)


@pytest.fixture(scope="module")
def predictor():
    return Predictor(tiny_state_dict(), device="cpu", config=TINY_CONFIG)


def check_well_formed(result, height: int, width: int):
    n = len(result)
    assert result.image_size == (height, width)
    assert result.masks.shape == (n, height, width) and result.masks.dtype == torch.bool
    assert result.boxes.shape == (n, 4) and result.scores.shape == (n,) and result.labels.shape == (n,)
    x1, y1, x2, y2 = result.boxes.unbind(1)
    tol = BOX_TOLERANCE
    assert torch.all(x1 >= -tol) and torch.all(x1 <= x2 + tol) and torch.all(x2 <= width + tol)
    assert torch.all(y1 >= -tol) and torch.all(y1 <= y2 + tol) and torch.all(y2 <= height + tol)
    assert torch.isfinite(result.scores).all()


def make_image(height, width, channels, dtype, kind, seed):
    """A random image of the given shape/dtype; torch tensors with channels are laid out CHW."""
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels is None else (height, width, channels)
    if dtype == np.bool_:
        array = rng.random(shape) < 0.5
    elif dtype == np.uint16:
        array = rng.integers(0, 65536, size=shape).astype(np.uint16)
    elif dtype == np.uint8:
        array = rng.integers(0, 256, size=shape).astype(np.uint8)
    else:
        scale = 1.0 if seed % 2 else 255.0  # both float conventions
        array = (rng.random(shape) * scale).astype(dtype)
    if kind == "numpy":
        return array
    tensor = torch.from_numpy(array)
    return tensor if channels is None else tensor.permute(2, 0, 1)


image_specs = st.tuples(
    st.integers(1, 64),
    st.integers(1, 64),
    st.sampled_from([None, 1, 3, 4]),
    st.sampled_from([np.uint8, np.uint16, np.float32, np.float64, np.bool_]),
    st.sampled_from(["numpy", "torch"]),
    st.integers(0, 2**16),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(image_specs, min_size=1, max_size=3))
def test_predictor_runs_on_random_shapes_and_dtypes(predictor, specs):
    images = [make_image(*spec) for spec in specs]
    before = [_clone(im) for im in images]
    results = predictor.run(images)
    assert len(results) == len(images)
    for result, (height, width, *_rest) in zip(results, specs):
        assert result.masks.shape[1:] == (height, width)
        check_well_formed(result, height, width)
    for original, image in zip(before, images):
        _assert_same(original, image)


def test_predictor_on_tensor_chw_float_matches_uint8_array(predictor):
    array = np.random.default_rng(1).integers(0, 256, size=(40, 56, 3)).astype(np.uint8)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    from_array, from_tensor = predictor.run([array, tensor])
    torch.testing.assert_close(from_tensor.boxes, from_array.boxes)
    assert torch.equal(from_tensor.masks, from_array.masks)


@pytest.mark.parametrize("height,width", [(1, 1), (1, 2), (2, 1), (1, 64), (64, 1)])
def test_tiny_images_give_well_formed_results(predictor, height, width):
    image = np.random.default_rng(0).integers(0, 256, size=(height, width, 3)).astype(np.uint8)
    (result,) = predictor.run(image)
    check_well_formed(result, height, width)


@pytest.mark.parametrize(
    "height,width,config",
    [
        pytest.param(20, 4000, TINY_CONFIG, id="20x4000-tiny-sizes"),  # short side would floor to 0
        pytest.param(4000, 20, TINY_CONFIG, id="4000x20-tiny-sizes"),
        pytest.param(20, 4000, TINY_CONFIG.replace(min_size=800, max_size=1333), id="20x4000-default-sizes"),
        pytest.param(4000, 20, TINY_CONFIG.replace(min_size=800, max_size=1333), id="4000x20-default-sizes"),
    ],
)
def test_elongated_images_give_well_formed_results(height, width, config):
    predictor = Predictor(tiny_state_dict(), device="cpu", config=config)
    image = np.random.default_rng(0).integers(0, 256, size=(height, width, 3)).astype(np.uint8)
    (result,) = predictor.run([image])
    check_well_formed(result, height, width)
