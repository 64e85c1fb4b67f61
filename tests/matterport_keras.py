"""matterport Mask_RCNN's network, rebuilt from real Keras layers: the oracle of the matterport tests.

matterport's TF1 / Keras 2.2 code cannot be installed where the tests run, but Keras 3 can
(``pip install keras``, run here on its torch backend). This module rebuilds the parts of
matterport's graph that hold weights, with its layer names and hyper-parameters (reference
notes D.3-D.10): ``resnet_graph`` (zero-padding, 7x7 conv with bias, Keras batch norm with its
default eps 1e-3, SAME max-pool, conv/identity blocks with the stride on ``branch2a``), the FPN
(``fpn_c*p*``, nearest ``UpSampling2D``, ``fpn_p*``, ``fpn_p6`` max-pool 1/2), ``rpn_graph``
(512-wide shared conv, softmax over (bg, fg) pairs, (dy, dx, dh, dw) deltas), the classifier head
(7x7 valid conv + BN, 1x1 conv + BN, logits, deltas) and the mask head (4 x conv + BN, deconv,
sigmoid). The TimeDistributed wrappers are left out: the heads run on a batch of pooled RoIs,
which is what TimeDistributed does per RoI. Batch norm runs in inference mode.

It also writes checkpoints in the layout of matterport's ``mask_rcnn_coco.h5`` (Keras 2.2.4's
``save_weights``: ``layer_names`` / ``weight_names`` attributes, ``:0`` suffixes, the RPN's layers
inside the nested ``rpn_model`` group), filled with random weights and non-trivial batch norm
statistics.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np

RPN_LAYERS = ("rpn_conv_shared", "rpn_class_raw", "rpn_bbox_pred")


def _keras():
    import keras
    from keras import layers

    return keras, layers


def _bn(layers, name):
    return layers.BatchNormalization(name=name)  # Keras default epsilon 1e-3, as matterport's BatchNorm


def _conv_block(layers, x, kernel_size, filters, stage, block, strides=(2, 2)):
    f1, f2, f3 = filters
    conv, bn = f"res{stage}{block}_branch", f"bn{stage}{block}_branch"
    y = layers.Conv2D(f1, (1, 1), strides=strides, name=conv + "2a", use_bias=True)(x)
    y = layers.Activation("relu")(_bn(layers, bn + "2a")(y, training=False))
    y = layers.Conv2D(f2, (kernel_size, kernel_size), padding="same", name=conv + "2b", use_bias=True)(y)
    y = layers.Activation("relu")(_bn(layers, bn + "2b")(y, training=False))
    y = layers.Conv2D(f3, (1, 1), name=conv + "2c", use_bias=True)(y)
    y = _bn(layers, bn + "2c")(y, training=False)
    shortcut = layers.Conv2D(f3, (1, 1), strides=strides, name=conv + "1", use_bias=True)(x)
    shortcut = _bn(layers, bn + "1")(shortcut, training=False)
    return layers.Activation("relu")(layers.Add()([y, shortcut]))


def _identity_block(layers, x, kernel_size, filters, stage, block):
    f1, f2, f3 = filters
    conv, bn = f"res{stage}{block}_branch", f"bn{stage}{block}_branch"
    y = layers.Conv2D(f1, (1, 1), name=conv + "2a", use_bias=True)(x)
    y = layers.Activation("relu")(_bn(layers, bn + "2a")(y, training=False))
    y = layers.Conv2D(f2, (kernel_size, kernel_size), padding="same", name=conv + "2b", use_bias=True)(y)
    y = layers.Activation("relu")(_bn(layers, bn + "2b")(y, training=False))
    y = layers.Conv2D(f3, (1, 1), name=conv + "2c", use_bias=True)(y)
    y = _bn(layers, bn + "2c")(y, training=False)
    return layers.Activation("relu")(layers.Add()([y, x]))


def backbone_model(depth: int = 50, fpn_channels: int = 256):
    """Keras model: RGB image [B, H, W, 3] (molded: minus the mean) -> [P2, P3, P4, P5, P6] (NHWC)."""
    keras, layers = _keras()
    image = keras.Input((None, None, 3))
    x = layers.ZeroPadding2D((3, 3))(image)
    x = layers.Conv2D(64, (7, 7), strides=(2, 2), name="conv1", use_bias=True)(x)
    x = layers.Activation("relu")(_bn(layers, "bn_conv1")(x, training=False))
    x = layers.MaxPooling2D((3, 3), strides=(2, 2), padding="same")(x)
    x = _conv_block(layers, x, 3, [64, 64, 256], stage=2, block="a", strides=(1, 1))
    x = _identity_block(layers, x, 3, [64, 64, 256], stage=2, block="b")
    c2 = x = _identity_block(layers, x, 3, [64, 64, 256], stage=2, block="c")
    x = _conv_block(layers, x, 3, [128, 128, 512], stage=3, block="a")
    for block in "bcd":
        x = _identity_block(layers, x, 3, [128, 128, 512], stage=3, block=block)
    c3 = x
    x = _conv_block(layers, x, 3, [256, 256, 1024], stage=4, block="a")
    for i in range({50: 5, 101: 22}[depth]):
        x = _identity_block(layers, x, 3, [256, 256, 1024], stage=4, block=chr(98 + i))
    c4 = x
    x = _conv_block(layers, x, 3, [512, 512, 2048], stage=5, block="a")
    x = _identity_block(layers, x, 3, [512, 512, 2048], stage=5, block="b")
    c5 = _identity_block(layers, x, 3, [512, 512, 2048], stage=5, block="c")

    p5 = layers.Conv2D(fpn_channels, (1, 1), name="fpn_c5p5")(c5)
    p4 = layers.Add()([layers.UpSampling2D(size=(2, 2))(p5), layers.Conv2D(fpn_channels, (1, 1), name="fpn_c4p4")(c4)])
    p3 = layers.Add()([layers.UpSampling2D(size=(2, 2))(p4), layers.Conv2D(fpn_channels, (1, 1), name="fpn_c3p3")(c3)])
    p2 = layers.Add()([layers.UpSampling2D(size=(2, 2))(p3), layers.Conv2D(fpn_channels, (1, 1), name="fpn_c2p2")(c2)])
    outs = [layers.Conv2D(fpn_channels, (3, 3), padding="same", name=f"fpn_p{s}")(p) for s, p in zip((2, 3, 4, 5), (p2, p3, p4, p5))]
    outs.append(layers.MaxPooling2D(pool_size=(1, 1), strides=2, name="fpn_p6")(outs[-1]))
    return keras.Model(image, outs, name="backbone")


def rpn_model(num_anchors: int = 3, fpn_channels: int = 256):
    """Keras ``rpn_model``: feature map [B, h, w, C] -> (bg, fg) logits and probabilities [B, h*w*A, 2],
    deltas [B, h*w*A, 4] (matterport's rpn_class_logits, rpn_probs, rpn_bbox)."""
    keras, layers = _keras()
    features = keras.Input((None, None, fpn_channels))
    shared = layers.Conv2D(512, (3, 3), padding="same", activation="relu", name="rpn_conv_shared")(features)
    x = layers.Conv2D(2 * num_anchors, (1, 1), padding="valid", name="rpn_class_raw")(shared)
    logits = layers.Reshape((-1, 2))(x)
    probs = layers.Activation("softmax")(logits)
    x = layers.Conv2D(4 * num_anchors, (1, 1), padding="valid", name="rpn_bbox_pred")(shared)
    return keras.Model(features, [logits, probs, layers.Reshape((-1, 4))(x)], name="rpn_model")


def classifier_model(num_classes: int, pool_size: int = 7, fpn_channels: int = 256, fc_size: int = 1024):
    """Classifier head on pooled RoIs [R, P, P, C] -> class probabilities [R, K], deltas [R, K, 4] (dy, dx, dh, dw)."""
    keras, layers = _keras()
    pooled = keras.Input((pool_size, pool_size, fpn_channels))
    x = layers.Conv2D(fc_size, (pool_size, pool_size), padding="valid", name="mrcnn_class_conv1")(pooled)
    x = layers.Activation("relu")(_bn(layers, "mrcnn_class_bn1")(x, training=False))
    x = layers.Conv2D(fc_size, (1, 1), name="mrcnn_class_conv2")(x)
    x = layers.Activation("relu")(_bn(layers, "mrcnn_class_bn2")(x, training=False))
    shared = layers.Reshape((fc_size,))(x)
    probs = layers.Activation("softmax")(layers.Dense(num_classes, name="mrcnn_class_logits")(shared))
    deltas = layers.Reshape((num_classes, 4))(layers.Dense(num_classes * 4, name="mrcnn_bbox_fc")(shared))
    return keras.Model(pooled, [probs, deltas], name="classifier")


def mask_model(num_classes: int, pool_size: int = 14, fpn_channels: int = 256):
    """Mask head on pooled RoIs [R, 14, 14, C] -> per-class mask probabilities [R, 28, 28, K] (sigmoid)."""
    keras, layers = _keras()
    pooled = keras.Input((pool_size, pool_size, fpn_channels))
    x = pooled
    for i in range(1, 5):
        x = layers.Conv2D(256, (3, 3), padding="same", name=f"mrcnn_mask_conv{i}")(x)
        x = layers.Activation("relu")(_bn(layers, f"mrcnn_mask_bn{i}")(x, training=False))
    x = layers.Conv2DTranspose(256, (2, 2), strides=2, activation="relu", name="mrcnn_mask_deconv")(x)
    x = layers.Conv2D(num_classes, (1, 1), strides=1, activation="sigmoid", name="mrcnn_mask")(x)
    return keras.Model(pooled, x, name="mask")


def matterport_models(num_classes: int = 81, depth: int = 50) -> dict:
    """The four Keras models, by name ("backbone", "rpn", "classifier", "mask")."""
    return {
        "backbone": backbone_model(depth),
        "rpn": rpn_model(),
        "classifier": classifier_model(num_classes),
        "mask": mask_model(num_classes),
    }


def randomise(models: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Fill every weighted layer with random values; returns ``{"layer/weight": array}``.

    Kernels ~ N(0, 1/fan_in) (He-like, halved, so that deep stacks stay finite), biases and BN
    beta ~ N(0, 0.1), gamma ~ U(0.5, 1.5), moving mean ~ N(0, 0.2), moving variance ~ U(0.5, 2):
    every batch norm does something, and folding biases into them is exercised.
    """
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for model in models.values():
        for layer in model.layers:
            values = layer.get_weights()
            if not values:
                continue
            if type(layer).__name__ == "BatchNormalization":
                c = values[0].shape[0]
                new = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.2, c), rng.uniform(0.5, 2.0, c)]
                names = ("gamma", "beta", "moving_mean", "moving_variance")
            else:
                kernel, bias = values
                fan_in = int(np.prod(kernel.shape[:-1])) if kernel.ndim == 4 else kernel.shape[0]
                if type(layer).__name__ == "Conv2DTranspose":
                    fan_in = int(np.prod(kernel.shape[:2])) * kernel.shape[3]
                new = [rng.normal(0, np.sqrt(1.0 / fan_in), kernel.shape), rng.normal(0, 0.1, bias.shape)]
                names = ("kernel", "bias")
            new = [v.astype(np.float32) for v in new]
            layer.set_weights(new)
            for n, v in zip(names, new):
                weights[f"{layer.name}/{n}"] = v
    return weights


def write_keras2_h5(path, weights: dict[str, np.ndarray], *, full_model: bool = False) -> None:
    """Write ``weights`` as Keras 2.2.4's ``save_weights`` lays them out (matterport's file format).

    One group per layer with a ``weight_names`` attribute (``conv1/kernel:0``...), the datasets at
    ``layer/conv1/kernel:0``; the RPN's layers inside the nested layer group ``rpn_model``.
    ``full_model``: put everything under ``model_weights`` as ``model.save`` does.
    """
    import h5py

    by_layer: dict[str, list[str]] = {}
    for name in weights:
        layer = name.split("/")[0]
        by_layer.setdefault("rpn_model" if layer in RPN_LAYERS else layer, []).append(name)
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if full_model else f
        root.attrs["layer_names"] = [n.encode("utf8") for n in ["input_image"] + list(by_layer)]
        root.attrs["backend"] = b"tensorflow"
        root.attrs["keras_version"] = b"2.2.4"
        root.create_group("input_image").attrs["weight_names"] = []
        for layer, names in by_layer.items():
            group = root.create_group(layer)
            group.attrs["weight_names"] = [(n + ":0").encode("utf8") for n in names]
            for n in names:
                group.create_dataset(n + ":0", data=weights[n])
