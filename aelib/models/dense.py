"""Fully connected autoencoders: `dense`, `sparse` and `deep`."""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from aelib.layers import ActivityL1
from aelib.registry import register_model


def _mlp(
    input_dim: int,
    encoder_units: Sequence[int],
    encoding_dim: int,
    activation: str,
    l1: float = 0.0,
) -> tuple[keras.Model, keras.Model]:
    inputs = keras.Input(shape=(input_dim,), name="image")
    x = inputs
    for i, units in enumerate(encoder_units):
        x = layers.Dense(units, activation=activation, name=f"enc_dense_{i}")(x)
    code = layers.Dense(encoding_dim, activation=activation, name="code")(x)
    if l1:
        code = ActivityL1(l1, name="code_l1")(code)
    encoder = keras.Model(inputs, code, name="encoder")

    code_in = keras.Input(shape=(encoding_dim,), name="code")
    x = code_in
    for i, units in enumerate(reversed(encoder_units)):
        x = layers.Dense(units, activation=activation, name=f"dec_dense_{i}")(x)
    outputs = layers.Dense(input_dim, activation="sigmoid", name="reconstruction")(x)
    decoder = keras.Model(code_in, outputs, name="decoder")
    return encoder, decoder


@register_model("flat")
def dense(
    input_dim: int = 784,  # flattened 28x28 digit
    encoding_dim: int = 32,  # the tutorial's 32 floats: compression factor 24.5
    activation: str = "relu",
):
    """784 -> Dense(32, relu) -> Dense(784, sigmoid)."""
    return _mlp(input_dim, (), encoding_dim, activation)


@register_model("flat")
def sparse(
    input_dim: int = 784,
    encoding_dim: int = 32,
    activation: str = "relu",
    # L1 on the code, summed over units and averaged over the batch (Keras 1's
    # semantics, see ActivityL1). With that, the tutorial's 1e-4 makes codes far
    # sparser than it reports (mean 1.27 against dense's 8.73 after 100 epochs);
    # 1e-5 reproduces its effect, codes about half as dense as dense's
    # (jobs/results: 0.46x here, the tutorial's 3.33 / 7.30 = 0.46x).
    l1: float = 1e-5,
):
    """`dense` with an L1 activity penalty on the 32-float code."""
    return _mlp(input_dim, (), encoding_dim, activation, l1=l1)


@register_model("flat")
def deep(
    input_dim: int = 784,
    hidden_units: tuple[int, ...] = (128, 64),  # encoder side; mirrored in the decoder
    encoding_dim: int = 32,
    activation: str = "relu",
):
    """784-128-64-32-64-128-784."""
    return _mlp(input_dim, tuple(hidden_units), encoding_dim, activation)
