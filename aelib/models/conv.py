"""Convolutional autoencoders: `conv` and the fully convolutional `denoise`."""

from __future__ import annotations

import keras
from keras import layers

from aelib.registry import register_model


@register_model("image")
def conv(
    filters: tuple[int, int, int] = (16, 8, 8),  # encoder convs; the code is (4, 4, filters[-1])
    kernel_size: int = 3,
    activation: str = "relu",
):
    """The tutorial's convolutional autoencoder on 28x28x1 digits.

    Conv16-Pool-Conv8-Pool-Conv8-Pool gives a (4, 4, 8) = 128-float code; the
    decoder mirrors it, and its one unpadded conv turns 16x16 into 14x14 so the
    output is 28x28 again.
    """
    if not (isinstance(filters, list | tuple) and len(filters) == 3):  # (Python's "not
        raise ValueError(  # enough values to unpack (expected 3, got 2)")
            "filters must be 3 numbers, one per encoder conv (the tutorial's: (16, 8, 8)). "
            f"Received: filters={filters!r}"
        )
    f1, f2, f3 = filters
    conv_kw = dict(kernel_size=kernel_size, activation=activation, padding="same")
    inputs = keras.Input(shape=(28, 28, 1), name="image")
    x = layers.Conv2D(f1, **conv_kw, name="enc_conv_0")(inputs)
    x = layers.MaxPooling2D(2, padding="same")(x)  # 14
    x = layers.Conv2D(f2, **conv_kw, name="enc_conv_1")(x)
    x = layers.MaxPooling2D(2, padding="same")(x)  # 7
    x = layers.Conv2D(f3, **conv_kw, name="enc_conv_2")(x)
    code = layers.MaxPooling2D(2, padding="same", name="code")(x)  # 4
    encoder = keras.Model(inputs, code, name="encoder")

    code_in = keras.Input(shape=(4, 4, f3), name="code")
    x = layers.Conv2D(f3, **conv_kw, name="dec_conv_0")(code_in)
    x = layers.UpSampling2D(2)(x)  # 8
    x = layers.Conv2D(f2, **conv_kw, name="dec_conv_1")(x)
    x = layers.UpSampling2D(2)(x)  # 16
    # 16 -> 14 unpadded, as in the tutorial: 3x3 whatever kernel_size (a 5x5 gave 12,
    # and a 24x24 output)
    x = layers.Conv2D(f1, 3, activation=activation, name="dec_conv_2")(x)
    x = layers.UpSampling2D(2)(x)  # 28
    outputs = layers.Conv2D(
        1, kernel_size, activation="sigmoid", padding="same", name="reconstruction"
    )(x)
    decoder = keras.Model(code_in, outputs, name="decoder")
    return encoder, decoder


@register_model("image")
def denoise(
    filters: int = 32,
    depth: int = 2,  # conv-pool stages; inputs must be a multiple of 2**depth in size
    convs_per_stage: int = 1,  # the tutorial has one conv per stage
    kernel_size: int = 3,
    activation: str = "relu",
    channels: int = 1,  # 1 for grayscale, 3 to denoise RGB images jointly
    upsample: str = "nearest",  # "nearest" (the tutorial's UpSampling2D) or "transpose"
    skips: bool = False,  # U-Net-style: decoder stages also see the encoder's features
):
    """The tutorial's denoiser: Conv32-Pool-Conv32-Pool, a (7, 7, 32) code on
    28x28 digits, decoder Conv32-Up-Conv32-Up-Conv1 sigmoid.

    `upsample="transpose"` swaps each UpSampling2D for a learned stride-2
    Conv2DTranspose, so the decoder also computes features at full resolution
    (as keras.io's current denoising example does) instead of copying pixels.

    `skips=True` makes it U-Net-like: the encoder also outputs each stage's
    features before pooling, and each decoder stage concatenates the matching
    ones after upsampling (then merges them with one conv), so fine detail need
    not pass through the code. The encoder's first output is still the code;
    `decoder([code, *skips])` takes them in the order the encoder returns them.

    Fully convolutional (spatial dims are None), so a model trained on 28x28
    digits also runs on larger images whose sides are multiples of 2**depth.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1. Received: depth={depth}")
    if convs_per_stage < 1:  # (0 left the encoder's input channels to its code)
        raise ValueError(
            f"convs_per_stage must be >= 1. Received: convs_per_stage={convs_per_stage}"
        )
    if upsample not in ("nearest", "transpose"):
        raise ValueError(f"upsample must be 'nearest' or 'transpose'. Received: {upsample!r}")
    conv_kw = dict(kernel_size=kernel_size, activation=activation, padding="same")
    inputs = keras.Input(shape=(None, None, channels), name="image")
    x = inputs
    features = []  # each stage's output before pooling, for the skips
    for stage in range(depth):
        for i in range(convs_per_stage):
            x = layers.Conv2D(filters, **conv_kw, name=f"enc_conv_{stage}_{i}")(x)
        features.append(x)
        x = layers.MaxPooling2D(2, padding="same", name=f"enc_pool_{stage}")(x)
    features.reverse()  # deepest first: the order the decoder upsamples through them
    encoder = keras.Model(inputs, [x, *features] if skips else x, name="encoder")

    code_in = keras.Input(shape=(None, None, filters), name="code")
    skip_in = [  # one input per encoder stage, only when the decoder takes skips
        keras.Input(shape=(None, None, filters), name=f"skip_{stage}")
        for stage in range(depth if skips else 0)
    ]
    x = code_in
    for stage in range(depth):
        for i in range(convs_per_stage):
            x = layers.Conv2D(filters, **conv_kw, name=f"dec_conv_{stage}_{i}")(x)
        if upsample == "transpose":
            x = layers.Conv2DTranspose(filters, strides=2, **conv_kw, name=f"dec_up_{stage}")(x)
        else:
            x = layers.UpSampling2D(2, name=f"dec_up_{stage}")(x)
        if skips:
            x = layers.Concatenate(name=f"dec_skip_{stage}")([x, skip_in[stage]])
            x = layers.Conv2D(filters, **conv_kw, name=f"dec_merge_{stage}")(x)
    outputs = layers.Conv2D(
        channels, kernel_size, activation="sigmoid", padding="same", name="reconstruction"
    )(x)
    decoder = keras.Model([code_in, *skip_in] if skips else code_in, outputs, name="decoder")
    return encoder, decoder
