"""aelib: the autoencoders of "Building Autoencoders in Keras" as a Keras 3 library.

    import aelib
    aelib.list_models()                      # the seven variant names
    model = aelib.build_model("deep")        # .autoencoder, .encoder, .decoder
    result = aelib.train(aelib.TrainConfig(model="denoise", epochs=1, limit=2000),
                         out_dir="runs/denoise")
    model = aelib.load("runs/denoise/denoise.keras")  # .config: its options; .info: metrics

aelib never imports Ray: Ray jobs live in the project's `jobs/` folder.
"""

import sys as _sys

from aelib import process as _process

__version__ = "0.1.0"


def _import_api() -> None:
    """Imports the public names below (Keras's and TensorFlow's imports: seconds), and
    registers the custom layers for load_model."""
    global Autoencoder, build_model, list_models, model_defaults, load, read_info, save
    global TrainConfig, TrainResult, train
    from aelib import layers  # noqa: F401  (registers the custom layers for load_model)
    from aelib.registry import Autoencoder, build_model, list_models, model_defaults
    from aelib.saving import load, read_info, save
    from aelib.train import TrainConfig, TrainResult, train


# The command line (`python -m aelib`, the `aelib` script) imports them once its flags are
# read (aelib.__main__), so that `aelib --help` and a bad flag answer in a fraction of a
# second, not after TensorFlow's import; a Ctrl-C or SIGTERM during that import is kept for
# the run to stop on as it starts.
if _process.command_line(_sys.argv[0] if _sys.argv else "", getattr(_sys, "orig_argv", [])):
    _process.record_stops_early()
else:
    _import_api()

__all__ = [
    "Autoencoder",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "list_models",
    "load",
    "model_defaults",
    "read_info",
    "save",
    "train",
]
