"""LSTM sequence-to-sequence autoencoder."""

from __future__ import annotations

import keras
from keras import layers

from aelib.registry import register_model


@register_model("sequence")
def seq2seq(
    timesteps: int = 28,  # an MNIST digit read row by row
    input_dim: int = 28,
    latent_dim: int = 64,
):
    """LSTM encoder -> RepeatVector -> LSTM decoder returning sequences.

    The decoder's LSTM is followed by a per-step Dense(sigmoid) so outputs lie
    in [0, 1] like the pixels (an LSTM alone emits tanh values).
    """
    inputs = keras.Input(shape=(timesteps, input_dim), name="sequence")
    code = layers.LSTM(latent_dim, name="code")(inputs)
    encoder = keras.Model(inputs, code, name="encoder")

    code_in = keras.Input(shape=(latent_dim,), name="code")
    x = layers.RepeatVector(timesteps, name="repeat")(code_in)
    x = layers.LSTM(latent_dim, return_sequences=True, name="dec_lstm")(x)
    outputs = layers.Dense(input_dim, activation="sigmoid", name="reconstruction")(x)
    decoder = keras.Model(code_in, outputs, name="decoder")
    return encoder, decoder
