"""The same seven models train and round-trip under JAX and PyTorch (TensorFlow is
covered in-process by test_models.py), and a file saved under one backend reloads and
trains on under the others: TensorFlow's under JAX, JAX's under PyTorch, both under
TensorFlow. PyTorch's tests are skipped where it is not installed: .ci/run installs
its CPU build only where pip finds one on disk (PyPI's is a CUDA build of several GB)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from helpers import subprocess_env

SCRIPT = r"""
import glob, json, sys
import numpy as np
import keras
import aelib
from aelib import data as data_lib
from aelib.train import TrainConfig, built, train

out_dir = sys.argv[1]
arrays = data_lib.load_mnist()
report = {"backend": keras.backend.backend(), "models": {}}
try:  # (PyTorch's allocator error, C++ words and all, was shown as it was)
    built(TrainConfig(model="dense", model_options={"encoding_dim": 2**40}))
except ValueError as e:
    report["too_big"] = str(e)
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
report["others"], report["others_dir"] = {}, sys.argv[2] if len(sys.argv) > 2 else None
for path in sorted(glob.glob(f"{sys.argv[2]}/*.keras") if len(sys.argv) > 2 else []):
    # Another backend's file trains on here, with this backend's own jit default (Keras
    # wrote the saving backend's optimizer class and jit_compile into the file).
    kind = aelib.read_info(path)["input_kind"]
    x = data_lib.prepare(arrays[0][0][:64], kind)
    loaded = (("aelib", aelib.load(path).autoencoder), ("keras", keras.models.load_model(path)))
    for how, model in loaded:
        fresh = keras.models.clone_model(model)
        fresh.compile(optimizer="adam", loss="binary_crossentropy")
        loss = model.fit(x, x, epochs=1, batch_size=32, verbose=0).history["loss"][-1]
        report["others"][f"{path} {how}"] = [model.jit_compile, fresh.jit_compile, loss]
print("REPORT" + json.dumps(report))
"""

SAVED: dict[str, object] = {}  # backend -> the folder of the files its run saved


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
    others = SAVED.get("jax") if backend == "torch" else _tensorflow_files(tmp_path_factory)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out_dir), *([str(others)] if others else [])],
        env=subprocess_env(KERAS_BACKEND=backend),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("REPORT"))
    SAVED[backend] = out_dir
    return backend, out_dir, json.loads(line[len("REPORT") :])


def _tensorflow_files(tmp_path_factory):
    """Two variants trained and saved here, under TensorFlow, for the JAX run to load."""
    import aelib
    from aelib import data as data_lib
    from aelib.train import TrainConfig, train

    out_dir = tmp_path_factory.mktemp("tensorflow")
    arrays = data_lib.load_mnist()
    for name in ("dense", "conv"):
        config = TrainConfig(model=name, epochs=1, limit=128, test_limit=32, val_split=0.0)
        result = train(config, data=arrays, figures=False, verbose=0)
        aelib.save(result.model, out_dir / f"{name}.keras")
    return out_dir


def test_every_variant_trains_and_round_trips(backend_run):
    backend, _, report = backend_run
    assert report["backend"] == backend
    assert sorted(report["models"]) == sorted(
        ["dense", "sparse", "deep", "conv", "denoise", "seq2seq", "vae"]
    )
    assert "Model 'dense' (encoding_dim=1099511627776) does not fit in memory" in report.get(
        "too_big", ""
    ), report.get("too_big")
    for name, r in report["models"].items():
        assert r["loss"][-1] < r["loss"][0], (name, r["loss"])
        assert r["reload_diff"] < 1e-6, name
        assert r["split_diff"] < 1e-5, name
    # TensorFlow's files under JAX; JAX's under PyTorch (where JAX's jit_compile=True sent
    # fit through torch.compile, which failed)
    given = sorted(report["others_dir"] and Path(report["others_dir"]).glob("*.keras"))
    assert len(report["others"]) == 2 * len(given), report["others"]
    assert given or (backend == "torch" and "jax" not in SAVED)  # (-k torch alone)
    for what, (jit, fresh_jit, loss) in report["others"].items():
        assert jit == fresh_jit and np.isfinite(loss), (what, jit, fresh_jit, loss)


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
    # ... and trains on (a PyTorch file named PyTorch's own Adam, which TensorFlow's fit
    # could not use), by aelib.load and by Keras's own load_model
    for model in (bundle.autoencoder, keras.models.load_model(out_dir / f"{name}.keras")):
        history = model.fit(x, x, epochs=1, batch_size=8, verbose=0).history
        fresh = keras.models.clone_model(model)
        fresh.compile(optimizer="adam", loss="binary_crossentropy")
        assert np.isfinite(history["loss"][-1]) and model.jit_compile == fresh.jit_compile
