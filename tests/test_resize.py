"""The uint8 resize methods against the libraries they reproduce: Pillow (Detectron2), OpenCV
(mmdetection) and scikit-image (matterport), compared pixel for pixel (exact equality)."""

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import PIL
from conftest import requires_cuda
from engine.config import MaskRCNNConfig
from engine.preprocess import (
    UINT8_RESIZE_METHODS,
    pil_vertical_pass_first,
    preprocess,
    resize_uint8,
    resized_size,
)

PILLOW = tuple(int(v) for v in PIL.__version__.split(".")[:2])

# (input h, w) -> (output h, w)
SIZES = [
    ((1, 1), (1, 1)),
    ((1, 1), (800, 800)),  # tiny to large
    ((2, 3), (800, 1200)),
    ((3, 5), (801, 1333)),
    ((7, 1), (23, 5)),
    ((20, 4000), (7, 1333)),  # very wide, downscale
    ((600, 20), (400, 13)),  # tall, downscale (Pillow 13 runs the vertical pass first)
    ((480, 640), (800, 1067)),  # typical upscale
    ((301, 451), (799, 1197)),  # odd upscale
    ((1201, 799), (601, 401)),  # large to small, about 2x
    ((1500, 1000), (317, 211)),  # strong downscale (wide antialiasing kernel)
    ((256, 256), (128, 128)),  # exactly 2x (cv2 switches to INTER_AREA internally)
    ((100, 37), (100, 80)),  # one axis unchanged
    ((97, 131), (50, 260)),  # height shrinks, width grows
]
KINDS = ["noise", "gray", "smooth"]


def make_image(hw, kind, seed=0):
    """uint8 [H, W, 3] RGB: random noise, a grayscale image converted to RGB (a stride-0 view, as
    ``np.broadcast_to`` gives), or a smooth ramp with flat areas (exact integers after interpolation)."""
    rng = np.random.default_rng(seed)
    h, w = hw
    if kind == "noise":
        return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    if kind == "gray":
        return np.broadcast_to(rng.integers(0, 256, size=(h, w, 1), dtype=np.uint8), (h, w, 3))
    ramp = np.linspace(0, 255, h)[:, None] * 0.6 + np.linspace(0, 255, w)[None, :] * 0.4
    ramp = np.where(ramp > 180, 180, np.floor(ramp))  # a flat plateau
    return np.stack([ramp, 255 - ramp, np.full_like(ramp, 77)], axis=-1).astype(np.uint8)


def pil_resize(image, out_hw):
    return np.array(Image.fromarray(np.ascontiguousarray(image)).resize(out_hw[::-1], Image.BILINEAR))


def cv2_resize(image, out_hw):
    return cv2.resize(np.ascontiguousarray(image), out_hw[::-1], interpolation=cv2.INTER_LINEAR)


def skimage_resize(image, out_hw):
    transform = pytest.importorskip("skimage.transform")
    # matterport's utils.resize arguments, then image.astype(np.uint8)
    out = transform.resize(
        image, out_hw, order=1, mode="constant", cval=0, clip=True, preserve_range=True, anti_aliasing=False
    )
    return out.astype(np.uint8)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("in_hw,out_hw", SIZES)
def test_antialias_uint8_equals_pil(in_hw, out_hw, kind):
    image = make_image(in_hw, kind)
    ours = resize_uint8(image, *out_hw, method="antialias_uint8", pillow_version=PILLOW)
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == out_hw + (3,)
    np.testing.assert_array_equal(ours.numpy(), pil_resize(image, out_hw))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("in_hw,out_hw", SIZES)
def test_cv2_linear_equals_cv2(in_hw, out_hw, kind):
    image = make_image(in_hw, kind)
    ours = resize_uint8(image, *out_hw, method="cv2_linear")
    np.testing.assert_array_equal(ours.numpy(), cv2_resize(image, out_hw))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("in_hw,out_hw", SIZES)
def test_skimage_uint8_equals_skimage(in_hw, out_hw, kind):
    image = make_image(in_hw, kind)
    expected = skimage_resize(image, out_hw)
    ours = resize_uint8(image, *out_hw, method="skimage_uint8")
    np.testing.assert_array_equal(ours.numpy(), expected)


def test_skimage_uint8_clips_to_the_input_range():
    # the zeros outside the image darken the border samples (corner: 200 * 0.72 * 0.73 = 105);
    # skimage clips them to the input's minimum, 180
    image = np.full((4, 6, 3), 200, dtype=np.uint8)
    image[2, 3] = 180
    ours = resize_uint8(image, 9, 13, method="skimage_uint8").numpy()
    assert ours[0, 0, 0] == 180 and ours.min() == 180 and ours[4, 2, 0] == 200
    np.testing.assert_array_equal(ours, skimage_resize(image, (9, 13)))


def test_pillow_pass_order_by_version():
    # height 600 -> 400 loses more than twice the columns 20 -> 13 loses: Pillow 13 resizes vertically first
    image = make_image((600, 20), "noise")
    assert pil_vertical_pass_first(600, 20, 400, 13, (13, 0))
    assert not pil_vertical_pass_first(600, 20, 400, 13, (12, 3))  # 12.2-12.3: only taller than 100:1
    assert pil_vertical_pass_first(3000, 20, 1333, 9, (12, 3))
    assert not pil_vertical_pass_first(3000, 20, 1333, 9, (11, 3))
    assert not pil_vertical_pass_first(400, 20, 600, 13, (13, 0))  # the height grows
    new = resize_uint8(image, 400, 13, method="antialias_uint8", pillow_version=(13, 0)).int()
    old = resize_uint8(image, 400, 13, method="antialias_uint8", pillow_version=(11, 3)).int()
    diff = (new - old).abs()
    assert diff.max() == 1 and 0 < (diff > 0).float().mean() < 0.5
    expected = torch.from_numpy(pil_resize(image, (400, 13))).int()
    assert torch.equal(new if PILLOW >= (13, 0) else old, expected)


@pytest.mark.parametrize("method", UINT8_RESIZE_METHODS)
def test_inputs_untouched(method):
    image = make_image((37, 53), "noise")
    keep = image.copy()
    tensor = torch.from_numpy(image)  # shares memory with image
    for source in (image, tensor):
        out = resize_uint8(source, 37, 53, method=method)  # same size: a copy, not the input
        assert out.data_ptr() != tensor.data_ptr()
        resize_uint8(source, 70, 11, method=method)
    np.testing.assert_array_equal(image, keep)


def test_resize_uint8_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        resize_uint8(np.zeros((4, 4, 3), np.float32), 2, 2, method="cv2_linear")
    with pytest.raises(ValueError, match="at least 1x1"):
        resize_uint8(np.zeros((4, 4, 3), np.uint8), 0, 2, method="cv2_linear")
    with pytest.raises(ValueError, match="unknown"):
        resize_uint8(np.zeros((4, 4, 3), np.uint8), 2, 2, method="torch_bilinear")


# Detectron2-, mmdet- and matterport-like pre-processing (units 0..255, no 1/255 scale)
FAMILIES = {
    "antialias_uint8": dict(channel_order="BGR", pixel_mean=(103.53, 116.28, 123.675), pixel_std=(1.0, 1.0, 1.0)),
    "cv2_linear": dict(channel_order="RGB", pixel_mean=(123.675, 116.28, 103.53), pixel_std=(58.395, 57.12, 57.375)),
    "skimage_uint8": dict(channel_order="RGB", pixel_mean=(123.7, 116.8, 103.9), pixel_std=(1.0, 1.0, 1.0)),
}
LIBRARY = {"antialias_uint8": pil_resize, "cv2_linear": cv2_resize, "skimage_uint8": skimage_resize}


@pytest.mark.parametrize("method", UINT8_RESIZE_METHODS)
def test_preprocess_with_uint8_methods(method):
    config = MaskRCNNConfig(
        input_scale=1.0,
        normalize_before_resize=False,
        resize_rounding="round_half_up",
        resize_method=method,
        min_size=96,
        max_size=160,
        **FAMILIES[method],
    )
    images = [make_image((1, 1), "noise"), make_image((20, 4000), "gray", 1), make_image((75, 51), "smooth")]
    keep = [im.copy() for im in images]
    batch = preprocess(images, config=config, device=torch.device("cpu"))
    sizes = [resized_size(*im.shape[:2], min_size=96, max_size=160, rounding="round_half_up") for im in images]
    assert batch.image_sizes == sizes == [(96, 96), (1, 160), (141, 96)]
    assert batch.original_sizes == [(1, 1), (20, 4000), (75, 51)]
    assert batch.tensor.shape == (3, 3, 160, 160) and batch.tensor.dtype == torch.float32
    mean = torch.tensor(config.pixel_mean)[:, None, None]
    std = torch.tensor(config.pixel_std)[:, None, None]
    for i, (image, (h, w)) in enumerate(zip(images, sizes)):
        x = torch.from_numpy(LIBRARY[method](image, (h, w))).permute(2, 0, 1).float()
        if config.channel_order == "BGR":
            x = x.flip(0)
        assert torch.equal(batch.tensor[i, :, :h, :w], (x - mean) / std)
        assert not batch.tensor[i, :, h:].any() and not batch.tensor[i, :, :, w:].any()
    for image, copy in zip(images, keep):
        np.testing.assert_array_equal(image, copy)


@pytest.mark.parametrize("method", UINT8_RESIZE_METHODS)
def test_config_rejects_normalize_before_resize_with_uint8_methods(method):
    with pytest.raises(ValueError, match="normalize_before_resize=False"):
        MaskRCNNConfig(resize_method=method, normalize_before_resize=True)
    assert MaskRCNNConfig(resize_method=method, normalize_before_resize=False).resize_method == method
    with pytest.raises(ValueError, match="resize_method"):
        MaskRCNNConfig(resize_method="pil", normalize_before_resize=False)


def test_config_rejects_float64_normalisation_of_the_float_resize():
    """normalize_precision="float64" is matterport's uint8 path; the float resize runs in float32."""
    with pytest.raises(ValueError, match="uint8 resize methods"):
        MaskRCNNConfig(normalize_precision="float64")
    with pytest.raises(ValueError, match="uint8 resize methods"):
        MaskRCNNConfig(normalize_precision="float64", normalize_before_resize=False)
    assert MaskRCNNConfig(
        normalize_precision="float64", normalize_before_resize=False, resize_method="skimage_uint8"
    ).normalize_precision == "float64"


@pytest.mark.parametrize("preset", ["torchvision_maskrcnn_resnet50_fpn", "matterport_mask_rcnn_fpn"])
def test_batch_carries_its_windows(preset):
    """preprocess computes each image's window once; the detections and the paste read it from the batch."""
    from engine.config import PRESETS
    from engine.preprocess import image_windows

    config = PRESETS[preset].replace(min_size=64, max_size=128)
    images = [make_image((50, 70), "noise"), make_image((90, 40), "smooth")]
    batch = preprocess(images, config=config, device=torch.device("cpu"))
    assert batch.windows == image_windows(batch, config)
    height, width = batch.tensor.shape[-2:]
    for (h, w), (top, left), window in zip(batch.image_sizes, batch.offsets, batch.windows):
        if config.box_frame == "pixels":
            assert window == (left, top, left + w, top + h)
        else:  # matterport's norm_boxes of that box
            assert window[0] == pytest.approx(left / (width - 1)) and window[3] == pytest.approx((top + h - 1) / (height - 1))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("method", UINT8_RESIZE_METHODS)
@pytest.mark.parametrize("in_hw,out_hw", [((480, 640), (800, 1067)), ((1500, 1000), (317, 211)), ((600, 20), (400, 13))])
def test_uint8_methods_on_cuda_equal_cpu(method, in_hw, out_hw):
    image = torch.from_numpy(make_image(in_hw, "noise"))
    on_gpu = resize_uint8(image.cuda(), *out_hw, method=method)
    assert on_gpu.is_cuda
    assert torch.equal(on_gpu.cpu(), resize_uint8(image, *out_hw, method=method))
