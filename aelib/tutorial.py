"""The tutorial's training settings per variant (Adam; epochs and batch sizes)."""

from __future__ import annotations

from typing import Any

# What "Building Autoencoders in Keras" trains each model with, and the test
# losses it reports (binary cross-entropy), for the benchmark's comparison.
TUTORIAL = {
    "dense": {"epochs": 50, "batch_size": 256, "reported_test_loss": 0.09},
    # (sparse: "a train loss of 0.11 and test loss of 0.10")
    "sparse": {
        "epochs": 100,
        "batch_size": 256,
        "reported_test_loss": 0.10,
        "reported_code_mean": 3.33,
    },
    "deep": {"epochs": 100, "batch_size": 256, "reported_test_loss": 0.08},
    "conv": {"epochs": 50, "batch_size": 128, "reported_test_loss": 0.094},
    "denoise": {"epochs": 100, "batch_size": 128},
    "seq2seq": {"epochs": 50, "batch_size": 256},
    "vae": {"epochs": 50, "batch_size": 100},
}
REPORTED_DENSE_CODE_MEAN = 7.30
# The seven variants, in the tutorial's order (aelib.list_models(), without importing Keras:
# the command line's --model choices).
VARIANTS = tuple(TUTORIAL)


def tutorial_settings(name: str) -> dict[str, Any]:
    """The TrainConfig fields the tutorial uses for variant `name`."""
    settings = TUTORIAL.get(name, {})
    return {k: settings[k] for k in ("epochs", "batch_size") if k in settings}
