"""Custom layers, registered so `.keras` files reload with `safe_mode` on."""

from __future__ import annotations

import keras
from keras import layers, ops

from aelib.registry import is_int, is_number


@keras.saving.register_keras_serializable(package="aelib")
class ActivityL1(layers.Layer):
    """Identity that adds `l1 * mean over the batch of sum(|x|)` to the loss.

    This is the tutorial's `activity_regularizer=regularizers.l1(1e-4)` as
    Keras 1 computed it: summed over units, averaged over the batch. Keras 3
    changed how activity regularizers scale with the batch between releases,
    so the penalty is spelled out here to mean the same on every version and
    backend, whatever the batch size.
    """

    def __init__(self, l1: float = 1e-4, **kwargs):
        super().__init__(**kwargs)
        if not (is_number(l1) and 0 <= l1 < float("inf")):  # (NaN fails too; "x": '<=')
            raise ValueError(f"l1 must be >= 0 and finite. Received: l1={l1}")
        self.l1 = float(l1)

    def call(self, x):
        if self.l1:
            batch = ops.cast(ops.shape(x)[0], x.dtype)
            self.add_loss(self.l1 * ops.sum(ops.abs(x)) / batch)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "l1": self.l1}


@keras.saving.register_keras_serializable(package="aelib")
class Sampling(layers.Layer):
    """VAE reparameterisation: z = mean + exp(log_var / 2) * eps.

    Adds `kl_weight * KL(q(z|x) || N(0, I))`, averaged over the batch, to the
    model's losses (so it trains the same on every backend, with no custom
    train step). Samples only while training: at inference it returns the
    mean, so `decoder(encoder(x))` is deterministic.
    """

    def __init__(self, kl_weight: float = 1.0, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not (is_number(kl_weight) and 0 <= kl_weight < float("inf")):
            raise ValueError(f"kl_weight must be >= 0 and finite. Received: {kl_weight=}")
        # Keras keeps the seed in the backend's seed dtype: PyTorch's int32, JAX's uint32.
        # A negative or too big one failed with an OverflowError traceback under JAX, or
        # PyTorch's words naming no option (and a file saved under TensorFlow with a seed
        # of 2**31 or more would not load under PyTorch).
        if seed is not None and not (is_int(seed) and 0 <= seed < 2**31):
            raise ValueError(f"seed must be None or an int in [0, 2**31 - 1]. Received: {seed=}")
        self.kl_weight = float(kl_weight)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        z_mean, z_log_var = inputs
        kl = -0.5 * ops.sum(1.0 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var), axis=-1)
        self.add_loss(self.kl_weight * ops.mean(kl))
        if not training:
            return z_mean
        eps = keras.random.normal(ops.shape(z_mean), seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * eps

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "kl_weight": self.kl_weight, "seed": self.seed}
