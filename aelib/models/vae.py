"""Variational autoencoder with a 2-D latent space."""

from __future__ import annotations

import keras
from keras import layers

from aelib.layers import Sampling
from aelib.registry import register_model


@register_model("flat")
def vae(
    input_dim: int = 784,
    intermediate_dim: int = 256,
    latent_dim: int = 2,  # 2 so the latent plane and digit manifold can be drawn
    seed: int | None = None,  # for the sampling noise
):
    """The tutorial's VAE: 784-256-(z_mean, z_log_var)-sample-256-784.

    The loss is the mean binary cross-entropy per pixel (as compiled for every
    variant) plus the KL term, which `Sampling` adds scaled by 1 / input_dim:
    the tutorial's `784 * bce + kl`, divided by 784.
    """
    if input_dim < 1:  # (the KL weight is 1 / input_dim)
        raise ValueError(f"input_dim must be >= 1. Received: input_dim={input_dim}")
    inputs = keras.Input(shape=(input_dim,), name="image")
    h = layers.Dense(intermediate_dim, activation="relu", name="enc_dense")(inputs)
    z_mean = layers.Dense(latent_dim, name="z_mean")(h)
    z_log_var = layers.Dense(latent_dim, name="z_log_var")(h)
    z = Sampling(kl_weight=1.0 / input_dim, seed=seed, name="z")([z_mean, z_log_var])
    encoder = keras.Model(inputs, z, name="encoder")

    code_in = keras.Input(shape=(latent_dim,), name="code")
    h = layers.Dense(intermediate_dim, activation="relu", name="dec_dense")(code_in)
    outputs = layers.Dense(input_dim, activation="sigmoid", name="reconstruction")(h)
    decoder = keras.Model(code_in, outputs, name="decoder")
    return encoder, decoder
