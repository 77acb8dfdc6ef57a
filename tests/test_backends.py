"""The same seven models train and round-trip under JAX and PyTorch (TensorFlow is
covered in-process by test_models.py), and a file saved under either reloads under
TensorFlow. PyTorch's tests are skipped where it is not installed: .ci/run installs
its CPU build only where pip finds one on disk (PyPI's is a CUDA build of several GB)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import keras
import numpy as np
import pytest

from helpers import subprocess_env

SCRIPT = r"""
import json, sys
import numpy as np
import keras
import aelib
from aelib import data as data_lib
from aelib.train import TrainConfig, train

out_dir = sys.argv[1]
arrays = data_lib.load_mnist()
report = {"backend": keras.backend.backend(), "models": {}}
for name in aelib.list_models():
    result = train(TrainConfig(model=name, epochs=2, limit=256, test_limit=32, batch_size=64,
                               learning_rate=3e-3, val_split=0.0),
                   data=arrays, figures=False, verbose=0)
    path = aelib.save(result.model, f"{out_dir}/{name}.keras", {"metrics": result.metrics})
    x = data_lib.prepare(arrays[1][0][:8], result.model.input_kind)
    out = result.model.autoencoder.predict(x, verbose=0)
    reloaded = keras.models.load_model(path).predict(x, verbose=0)
    via_code = result.model.decoder.predict(result.model.encoder.predict(x, verbose=0), verbose=0)
    np.save(f"{out_dir}/{name}.npy", out)
    report["models"][name] = {
        "loss": result.history["loss"], "reload_diff": float(np.abs(out - reloaded).max()),
        "split_diff": float(np.abs(out - via_code).max()),
    }
print("REPORT" + json.dumps(report))
"""


BACKENDS = [
    "jax",
    pytest.param(
        "torch",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("torch") is None, reason="PyTorch is not installed"
        ),
    ),
]


@pytest.fixture(scope="module", params=BACKENDS)
def backend_run(request, tmp_path_factory):
    """Every variant trained, saved and reloaded in a child process on one backend."""
    backend = request.param
    out_dir = tmp_path_factory.mktemp(backend)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out_dir)],
        env=subprocess_env(KERAS_BACKEND=backend),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("REPORT"))
    return backend, out_dir, json.loads(line[len("REPORT") :])


def test_every_variant_trains_and_round_trips(backend_run):
    backend, _, report = backend_run
    assert report["backend"] == backend
    assert sorted(report["models"]) == sorted(
        ["dense", "sparse", "deep", "conv", "denoise", "seq2seq", "vae"]
    )
    for name, r in report["models"].items():
        assert r["loss"][-1] < r["loss"][0], (name, r["loss"])
        assert r["reload_diff"] < 1e-6, name
        assert r["split_diff"] < 1e-5, name


@pytest.mark.parametrize("name", ["dense", "conv", "denoise", "seq2seq", "vae"])
def test_file_reloads_under_tensorflow(backend_run, name):
    import aelib
    from aelib import data as data_lib

    assert keras.backend.backend() == "tensorflow"
    _, out_dir, _ = backend_run
    bundle = aelib.load(out_dir / f"{name}.keras")
    _, (x_test, _) = data_lib.load_mnist()
    x = data_lib.prepare(x_test[:8], bundle.input_kind)
    expected = np.load(out_dir / f"{name}.npy")
    np.testing.assert_allclose(bundle.autoencoder.predict(x, verbose=0), expected, atol=1e-4)
