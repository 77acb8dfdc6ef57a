"""Every variant builds, trains, splits into encoder/decoder and round-trips as .keras
(under the default TensorFlow backend; tests/test_backends.py repeats this under JAX
and PyTorch)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

import aelib
from aelib import data as data_lib
from aelib import plots
from aelib.layers import ActivityL1, Sampling
from aelib.train import (
    FIGURE_FILES,
    Splits,
    TrainConfig,
    checkpoint_path,
    compile_model,
    load_arrays,
    make_splits,
    resume_settings,
    seed_states,
    stopped_run,
    tail_for_test,
    training_data,
)
from helpers import subprocess_env

NAMES = ["dense", "sparse", "deep", "conv", "denoise", "seq2seq", "vae"]


@pytest.fixture(scope="module")
def digits():
    (x_train, _), _ = data_lib.load_mnist()  # $AELIB_MNIST, defaulted by conftest.py
    return x_train[:512]


def test_list_models_is_the_tutorials_seven():
    assert aelib.list_models() == NAMES


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown model 'pca'.*dense, sparse, deep"):
        aelib.build_model("pca")


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="Unknown option.*'filterz'.*Valid options"):
        aelib.build_model("denoise", filterz=3)


def test_defaults_follow_the_tutorial():
    assert aelib.build_model("dense").encoder.output_shape == (None, 32)
    deep = aelib.build_model("deep")
    widths = [
        layer.units
        for layer in deep.encoder.layers + deep.decoder.layers
        if isinstance(layer, keras.layers.Dense)
    ]
    assert widths == [128, 64, 32, 64, 128, 784]
    assert aelib.build_model("conv").encoder.output_shape == (None, 4, 4, 8)
    denoise = aelib.build_model("denoise")
    assert denoise.encoder.compute_output_shape((None, 28, 28, 1)) == (None, 7, 7, 32)
    assert aelib.build_model("seq2seq").autoencoder.input_shape == (None, 28, 28)
    assert aelib.build_model("vae").encoder.output_shape == (None, 2)


def test_overrides_change_the_model():
    assert aelib.build_model("dense", encoding_dim=64).encoder.output_shape == (None, 64)
    assert aelib.build_model("vae", latent_dim=3).encoder.output_shape == (None, 3)
    sparse = aelib.build_model("sparse", l1=1e-3)
    assert sparse.encoder.get_layer("code_l1").l1 == 1e-3
    deep = aelib.build_model("deep", hidden_units=(256,))
    widths = [
        layer.units
        for layer in deep.encoder.layers + deep.decoder.layers
        if isinstance(layer, keras.layers.Dense)
    ]
    assert widths == [256, 32, 256, 784]  # one hidden layer each side, mirrored
    # Keras's sizes take an int or one per dimension
    conv = aelib.build_model("conv", kernel_size=(3, 5))
    assert conv.encoder.get_layer("enc_conv_0").kernel_size == (3, 5)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("conv", {"filters": 5}, "Option filters of model 'conv' must be a tuple like (16, 8, 8)"),
        ("deep", {"hidden_units": 128}, "Option hidden_units of model 'deep' must be a tuple"),
        ("sparse", {"l1": "abc"}, "Option l1 of model 'sparse' must be a number"),
        ("denoise", {"skips": "yes"}, "Option skips of model 'denoise' must be a bool"),
        ("dense", {"encoding_dim": 2.5}, "Option encoding_dim of model 'dense' must be an int"),
        ("conv", {"filters": (16, 8)}, "with filters=(16, 8): filters must be 3 numbers, one per"),
        # A tuple of ints is one size per dimension only for Keras's sizes (kernel_size).
        ("denoise", {"filters": (32,)}, "Option filters of model 'denoise' must be an int. "),
        ("denoise", {"kernel_size": (3, "x")}, "must be an int (or a tuple of ints)"),
    ],
)
def test_options_of_another_type_or_that_cannot_build_are_named(name, options, message):
    with pytest.raises(ValueError) as e:
        aelib.build_model(name, **options)
    assert message in str(e.value)


def test_denoise_is_fully_convolutional():
    model = aelib.build_model("denoise")
    x = np.random.default_rng(0).random((2, 64, 48, 1)).astype("float32")
    assert model.autoencoder.predict(x, verbose=0).shape == (2, 64, 48, 1)


def test_denoise_transposed_upsampling_is_learned_and_keeps_shapes(tmp_path):
    model = aelib.build_model("denoise", depth=1, convs_per_stage=2, upsample="transpose")
    ups = [layer for layer in model.decoder.layers if layer.name.startswith("dec_up_")]
    assert [type(layer).__name__ for layer in ups] == ["Conv2DTranspose"]
    assert ups[0].count_params() == 32 * 32 * 9 + 32
    x = np.random.default_rng(0).random((2, 30, 44, 1)).astype("float32")
    assert model.autoencoder.predict(x, verbose=0).shape == (2, 30, 44, 1)
    path = aelib.save(model, tmp_path / "d.keras")
    reloaded = aelib.load(path)
    assert reloaded.config["upsample"] == "transpose"
    np.testing.assert_allclose(
        reloaded.autoencoder.predict(x, verbose=0), model.autoencoder.predict(x, verbose=0)
    )
    with pytest.raises(ValueError, match="upsample must be"):
        aelib.build_model("denoise", upsample="bilinear")


def test_denoise_skips_pass_encoder_features_to_the_decoder(digits, tmp_path):
    model = aelib.build_model("denoise", depth=2, skips=True, upsample="transpose")
    x = data_lib.add_noise(data_lib.prepare(digits[:8], "image"), 0.5, seed=0)
    code, *skips = model.encoder.predict(x, verbose=0)
    assert code.shape == (8, 7, 7, 32)
    assert [s.shape for s in skips] == [(8, 14, 14, 32), (8, 28, 28, 32)]  # deepest first
    out = model.autoencoder.predict(x, verbose=0)
    np.testing.assert_allclose(model.decoder.predict([code, *skips], verbose=0), out, atol=1e-5)
    # The skips carry information: zeroing them changes the output.
    zeroed = model.decoder.predict([code, *(np.zeros_like(s) for s in skips)], verbose=0)
    assert np.abs(zeroed - out).max() > 1e-3
    big = np.random.default_rng(0).random((2, 32, 44, 1)).astype("float32")
    assert model.autoencoder.predict(big, verbose=0).shape == (2, 32, 44, 1)
    reloaded = aelib.load(aelib.save(model, tmp_path / "skips.keras"))
    assert reloaded.config["skips"] is True
    np.testing.assert_allclose(reloaded.autoencoder.predict(x, verbose=0), out, atol=1e-6)
    splits = Splits(x, x, x, x, x, x, labels_test=np.zeros(len(x), "int64"))
    figures = plots.tutorial_figures(reloaded, splits, {"loss": [1.0]}, tmp_path / "fig")
    assert figures["codes"].is_file()
    assert {p.stem.removeprefix("denoise_") for p in figures.values()} <= set(FIGURE_FILES)


def test_figures_of_many_models_in_one_process_trace_nothing(digits, tmp_path):
    """A sweep's driver draws every variant's figures in one process: through
    Model.predict, TensorFlow warned of "excessive" tf.function retracing after the
    second variant. The figures call the models as they are."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("tensorflow").addHandler(handler)
    try:
        for name in ("dense", "sparse", "deep", "vae"):
            x = data_lib.prepare(digits[:40], "flat")
            splits = Splits(x, x, x, x, x, x, labels_test=np.arange(40) % 10)
            plots.tutorial_figures(aelib.build_model(name), splits, {"loss": [1.0]}, tmp_path)
    finally:
        logging.getLogger("tensorflow").removeHandler(handler)
    assert not [r.getMessage() for r in records if "retracing" in r.getMessage()]


def test_a_vae_of_more_than_two_latent_dimensions_gets_a_latent_figure(digits, tmp_path):
    """The tutorial's latent plane and manifold are of a 2-D latent space; a VAE of more
    (the sweep searches latent_dim 4 and 8) gets a t-SNE map of its z_mean instead of
    no latent figure at all."""
    from PIL import Image

    x = data_lib.prepare(digits[:40], "flat")
    splits = Splits(x, x, x, x, x, x, labels_test=np.arange(40) % 10)
    latent = {"latent_plane", "manifold", "latent_tsne", "latent_1d"}
    for latent_dim, expected in (
        (2, {"latent_plane", "manifold"}),
        (4, {"latent_tsne"}),
        (1, {"latent_1d"}),  # (t-SNE's PCA start of one value failed after the training)
    ):
        model = aelib.build_model("vae", latent_dim=latent_dim)
        figures = plots.tutorial_figures(model, splits, {"loss": [1.0]}, tmp_path / str(latent_dim))
        assert latent & set(figures) == expected
        for path in figures.values():
            assert Image.open(path).size[0] > 100
            # (what a later run into the folder removes if it does not draw it again)
            assert path.stem.removeprefix("vae_") in FIGURE_FILES, path


def test_maps_name_their_axes_and_their_titles_fit(digits, tmp_path, monkeypatch):
    """The t-SNE maps labelled their axes z[0] and z[1], as the latent plane does, and a
    VAE's t-SNE title ran off the figure's left edge. Each figure is measured as drawn,
    then saved."""
    seen = {}
    save = plots._save

    def measured(fig, path):
        fig.canvas.draw()
        ax = fig.axes[0]
        title = ax.title.get_window_extent(fig.canvas.get_renderer())
        inside = 0 <= title.x0 and title.x1 <= fig.bbox.x1 and title.y1 <= fig.bbox.y1
        seen[path.name] = (ax.get_xlabel(), ax.get_ylabel(), inside)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", measured)
    x = data_lib.prepare(digits[:40], "flat")
    splits = Splits(x, x, x, x, x, x, labels_test=np.arange(40) % 10)
    for name, options in (("vae", {"latent_dim": 3}), ("vae", {"latent_dim": 1}), ("dense", {})):
        model = aelib.build_model(name, **options)
        plots.tutorial_figures(model, splits, {"loss": [1.0]}, tmp_path / name)
    dead = np.zeros((40, 32), "float32")  # (the longest title: all the same, unlabelled)
    plots.tsne_codes(dead, np.full(40, -1), tmp_path / "dead.png")
    assert seen["vae_latent_tsne.png"] == ("t-SNE 1", "t-SNE 2", True)
    assert seen["vae_latent_1d.png"] == ("z_mean", "digit", True)
    assert seen["dense_codes_tsne.png"] == ("t-SNE 1", "t-SNE 2", True)
    assert seen["dead.png"] == ("t-SNE 1", "t-SNE 2", True)


def test_the_manifold_draws_a_decoder_s_pixels_as_they_are(tmp_path):
    """A decoder whose digits are faint (an undertrained VAE: 0.4-0.6 everywhere) gives
    a grey manifold, not one stretched to black and white."""
    from PIL import Image

    class Faint:
        def __call__(self, z, training=False):
            ramp = np.linspace(0.4, 0.6, 28 * 28, dtype="float32").reshape(28, 28)
            return np.broadcast_to(ramp, (len(z), 28, 28)).copy()

    # (and the latent plane and t-SNE titles say digits of MNIST, images of one's own, and
    # of one, "1 test digit": it said "1 test digits")
    said = [plots._test_items(n, labels) for n, labels in ((3, np.arange(3)), (1, [7]))]
    said += [plots._test_items(2000, np.full(2000, -1)), plots._test_items(1, [-1])]
    assert said == ["3 test digits", "1 test digit", "2,000 test images", "1 test image"]
    path = plots.digit_manifold(Faint(), tmp_path / "manifold.png")
    gray = np.asarray(Image.open(path).convert("L"), float)
    h, w = gray.shape
    centre = gray[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]  # (inside the grid)
    assert 80 < centre.min() and centre.max() < 220, (centre.min(), centre.max())  # (not 0, 255)


def test_code_maps_of_a_few_test_digits(digits, tmp_path):
    """A t-SNE map of 2 or 3 codes (--test-limit 2) is drawn (scikit-learn refused a
    perplexity of 2 after the whole sweep); of one code, none is drawn. Codes of one
    value (encoding_dim=1) are drawn as they are, by digit: t-SNE's PCA start failed on
    them after the whole training (and t-SNE itself, from a random start, is drawn)."""
    model = aelib.build_model("dense")
    for count in (1, 2, 3):
        x = data_lib.prepare(digits[:count], "flat")
        splits = Splits(x, x, x, x, x, x, labels_test=np.arange(count) % 10)
        figures = plots.tutorial_figures(model, splits, {"loss": [1.0]}, tmp_path / str(count))
        assert ("tsne" in figures) is (count > 1)
    for name in ("dense", "sparse", "deep"):
        model = aelib.build_model(name, encoding_dim=1)
        for count in (1, 40):
            x = data_lib.prepare(digits[:count], "flat")
            splits = Splits(x, x, x, x, x, x, labels_test=np.arange(count) % 10)
            out = tmp_path / f"{name}_1d_{count}"
            figures = plots.tutorial_figures(model, splits, {"loss": [1.0]}, out)
            assert "tsne" not in figures and figures["codes_1d"].is_file()
            assert figures["codes_1d"].stem.removeprefix(f"{name}_") in FIGURE_FILES
    one = np.random.default_rng(0).random((20, 1)).astype("float32")
    assert plots.tsne_codes(one, np.arange(20) % 10, tmp_path / "one.png").is_file()
    assert plots.code_values(one, np.full(20, -1), tmp_path / "own.png").is_file()
    # Codes all the same (a dead encoder) or nearly (a saturated one): drawn (the PCA
    # start crashed the process).
    tiny = np.random.default_rng(0).random((20, 32)) * 1e-25
    for name, codes in (("dead", np.zeros((20, 32))), ("saturated", tiny)):
        path = plots.tsne_codes(
            codes.astype("float32"), np.arange(20) % 10, tmp_path / f"{name}.png"
        )
        assert path.is_file()


def test_figure_functions_name_the_input_that_does_not_fit(tmp_path):
    """Called with arrays of the wrong shape or count, the figure functions failed in
    Matplotlib, NumPy or Keras, naming no input (n=0: gridspec's words; 3-D points: a
    plot of their first two values, no error); a suffix Matplotlib cannot write, in its
    words. No file is left, nor a figure open."""
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    z, labels = np.zeros((5, 2)), np.arange(5)
    cases = [
        (
            lambda: plots.image_rows({"a": np.zeros((2, 28, 28))}, tmp_path / "r.png", n=0),
            "n must be an int >= 1. Received: n=0",
        ),
        (lambda: plots.image_rows({}, tmp_path / "r.png"), "rows must name at least one row"),
        (
            lambda: plots.conv_codes(np.zeros((2, 16)), tmp_path / "c.png"),
            "codes must be (N, h, w, c) conv codes. Received shape (2, 16)",
        ),
        (
            lambda: plots.latent_plane(np.zeros((5, 3)), labels, tmp_path / "l.png"),
            "z must be (N, 2) points. Received shape (5, 3)",
        ),
        (
            lambda: plots.latent_plane(z, labels[:4], tmp_path / "l.png"),
            "z and labels must be as many: 5 z, 4 labels",
        ),
        (
            lambda: plots.code_values(np.zeros((5, 2)), labels, tmp_path / "v.png"),
            "codes must be (N,) values, one each. Received shape (5, 2)",
        ),
        (
            lambda: plots.digit_manifold(aelib.build_model("vae").decoder, tmp_path / "m.png", n=0),
            "n must be an int >= 1. Received: n=0",
        ),
        (
            lambda: plots.digit_manifold(aelib.build_model("deep").decoder, tmp_path / "m.png"),
            "the decoder must take 2 values. Received a decoder of inputs (32,)",
        ),
        (
            lambda: plots.latent_plane(z, labels, tmp_path / "l.v1"),
            "Matplotlib writes no '.v1' files. Use .png",
        ),
    ]
    for draw, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            draw()
    assert plt.get_fignums() == before
    assert list(tmp_path.iterdir()) == []
    assert plots.latent_plane(z, labels, tmp_path / "l.PNG").is_file()  # (any case)


def test_own_images_figures_have_no_empty_boxes_and_name_images(tmp_path, monkeypatch, request):
    """A folder of own images with 3 test images drew 10 columns (7 empty boxes), and
    their conv codes' title said "each digit's" of images without digits."""
    import matplotlib.pyplot as plt

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    request.addfinalizer(lambda: plt.close("all"))  # (the stand-in _save leaves them open)
    plots.image_rows({"a": np.zeros((3, 28, 28)), "b": np.zeros((3, 28, 28))}, tmp_path / "r")
    assert len(drawn[0].axes) == 6
    drawn.clear()
    with warnings.catch_warnings():  # (one image: "Tight layout not applied", labels cut)
        warnings.simplefilter("error")
        for label in ("reconstructed", "noisy (0.5)", "a much longer row label"):
            plots.image_rows({label: np.zeros((1, 28, 28)), "x": np.zeros((1, 28, 28))}, tmp_path)
    for fig in drawn:  # (one image's figure cut "reconstructed" to "econstructed")
        fig.canvas.draw()
        lefts = [ax.yaxis.label.get_window_extent().x0 for ax in fig.axes]
        assert min(lefts) >= 0, (fig.axes[0].get_ylabel(), lefts)
    drawn.clear()
    codes = np.zeros((3, 4, 4, 8))
    plots.conv_codes(codes, tmp_path / "c", labels=np.full(3, -1))
    plots.conv_codes(codes, tmp_path / "c", labels=np.arange(3))
    titles = [fig._suptitle.get_text() for fig in drawn]
    assert "each image's 8 channel maps" in titles[0] and "each digit's" in titles[1]


def test_figures_are_closed_when_drawn_and_when_drawing_fails(digits, tmp_path, monkeypatch):
    """pyplot keeps every figure open until closed: one whose drawing raised (rows too
    short to be images, a folder where the file goes) stayed open for the process's life."""
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    model = aelib.build_model("conv")
    x = data_lib.prepare(digits[:4], "image")
    splits = Splits(x, x, x, x, x, x, labels_test=np.arange(4))
    assert plots.tutorial_figures(model, splits, {"loss": [1.0]}, tmp_path / "ok")
    (tmp_path / "taken.png").mkdir()
    with pytest.raises(OSError):
        plots.learning_curves({"loss": [1.0, 0.5]}, tmp_path / "taken.png")
    with pytest.raises(ValueError):
        plots.image_rows({"flat": np.zeros((3, 10))}, tmp_path / "rows.png")
    assert plt.get_fignums() == before
    # 8-bit digits are drawn as their floats are (vmax=1 drew every lit pixel white)
    raw = plots.image_rows({"digits": digits[:3]}, tmp_path / "raw.png")
    scaled = plots.image_rows({"digits": data_lib.scale(digits[:3])}, tmp_path / "scaled.png")
    assert raw.read_bytes() == scaled.read_bytes()
    # Whole epochs only on the x axis (a 2-epoch run had ticks at 1.25, 1.5, ...)
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    plots.learning_curves({"loss": [1.0, 0.5], "val_psnr": [9.0, 12.0]}, tmp_path / "c.png")
    for ax in drawn[0].axes:
        assert [t for t in ax.get_xticks() if 1 <= t <= 2] == [1, 2]
    # ... and one epoch is one tick (MaxNLocator gave 0.945, 0.96, ... 1.05), many a few
    plots.learning_curves({"loss": [1.0], "val_loss": [1.1]}, tmp_path / "one.png")
    assert list(drawn[1].axes[0].get_xticks()) == [1]
    plots.learning_curves({"loss": list(np.linspace(1, 0, 50))}, tmp_path / "many.png")
    ticks = [t for t in drawn[2].axes[0].get_xticks() if 1 <= t <= 50]
    assert 3 <= len(ticks) <= 11 and all(t == int(t) for t in ticks), ticks

    # The VAE's figures say where in z they are (the manifold had no axes at all).
    class Decoder:
        def __call__(self, z, training=False):
            return np.zeros((len(z), 28, 28), "float32")

    plots.digit_manifold(Decoder(), tmp_path / "manifold.png")
    ax = drawn[3].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["-1.64", "0.00", "1.64"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1.64", "0.00", "-1.64"]  # (up)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("z[0]", "z[1]")
    plots.latent_plane(np.zeros((3, 2)), np.arange(3), tmp_path / "plane.png")
    assert (drawn[4].axes[0].get_xlabel(), drawn[4].axes[0].get_ylabel()) == ("z[0]", "z[1]")
    # Its colour bar names every digit (Matplotlib's own ticks were 0, 2, 4, 6, 8).
    assert list(drawn[4].axes[1].get_yticks()) == list(range(10))
    # A denoiser's curves say the noise of each (a sweep trains at one and scores at 0.5,
    # and its val_loss above its loss read as overfitting); the axis names the loss.
    model = aelib.build_model("denoise", depth=1)
    splits = Splits(x, x, x, x, x, x, labels_test=np.arange(4), noise=(0.3, 0.5))
    history = {"loss": [1.0], "val_loss": [1.1], "val_psnr": [12.0]}
    plots.tutorial_figures(model, splits, history, tmp_path / "denoise")
    curves = drawn[5].axes
    assert [t.get_text() for t in curves[0].get_legend().get_texts()] == [
        "loss (noise 0.3)",
        "val_loss (noise 0.5)",
    ]
    assert curves[0].get_ylabel() == "loss (BCE)"
    assert curves[1].get_legend().get_texts()[0].get_text() == "val_psnr (noise 0.5)"
    assert drawn[6].axes[0].get_ylabel() == "noisy (0.5)"  # (the row of inputs shown)
    assert [ax.get_title() for ax in drawn[7].axes if ax.images] == [f"digit {d}" for d in range(4)]
    vae = aelib.build_model("vae")
    flat = data_lib.prepare(digits[:4], "flat")
    plots.tutorial_figures(vae, Splits(*[flat] * 6, labels_test=np.arange(4)), history, tmp_path)
    assert drawn[8].axes[0].get_ylabel() == "loss (BCE + KL / 784)"
    # Conv codes five digits a row (ten 7x7x32 codes of a denoiser were a 2240x224 strip),
    # and one digit's figure wide enough for its title.
    codes = np.random.default_rng(0).random((10, 7, 7, 32))
    plots.conv_codes(codes, tmp_path / "codes.png", labels=np.array([7, 2, 1, 0, 4, 1] + [-1] * 4))
    rows = {round(ax.get_position().y0, 3) for ax in drawn[-1].axes if ax.images}
    assert len([ax for ax in drawn[-1].axes if ax.images]) == 10 and len(rows) == 2
    # Each code says its digit (one without a label, -1, says nothing).
    titles = [ax.get_title() for ax in drawn[-1].axes if ax.images]
    assert titles == ["digit 7", "digit 2", "digit 1", "digit 0", "digit 4", "digit 1"] + [""] * 4
    # Labels past 9 (EMNIST's letters) further on: "label", as the t-SNE map says.
    plots.conv_codes(codes[:2], tmp_path / "codes.png", labels=np.array([3, 1] + [26] * 50))
    assert [ax.get_title() for ax in drawn[-1].axes if ax.images] == ["label 3", "label 1"]
    assert drawn[-1].get_size_inches()[0] < 20
    plots.conv_codes(np.random.default_rng(0).random((1, 4, 4, 8)), tmp_path / "one.png")
    assert drawn[-1].get_size_inches()[0] >= 0.09 * len(drawn[-1]._suptitle.get_text())
    for fig in drawn:
        plt.close(fig)


@pytest.mark.parametrize("name", NAMES)
def test_variant_trains_splits_and_round_trips(name, digits, tmp_path):
    model = aelib.build_model(name)
    x = data_lib.prepare(digits, model.input_kind)
    target = x
    if name == "denoise":
        x = data_lib.add_noise(x, 0.5, seed=0)
    compile_model(model, learning_rate=3e-3)
    keras.utils.set_random_seed(0)
    before = model.autoencoder.evaluate(x, target, batch_size=128, verbose=0)
    model.autoencoder.fit(x, target, epochs=3, batch_size=64, verbose=0)
    after = model.autoencoder.evaluate(x, target, batch_size=128, verbose=0)
    assert after < before, f"{name}: loss did not fall ({before:.4f} -> {after:.4f})"

    # decoder(encoder(x)) is the autoencoder, for every variant.
    out = model.autoencoder.predict(x[:16], verbose=0)
    via_code = model.decoder.predict(model.encoder.predict(x[:16], verbose=0), verbose=0)
    np.testing.assert_allclose(via_code, out, atol=1e-5)

    path = aelib.save(model, tmp_path / f"{name}.keras", {"note": "test"})
    reloaded = keras.models.load_model(path)  # safe_mode stays on
    np.testing.assert_allclose(reloaded.predict(x[:16], verbose=0), out, atol=1e-6)
    # the loss too: it holds the sparse code's L1 penalty and the VAE's KL term, whose
    # settings predict never uses
    loss = model.autoencoder.evaluate(x[:64], target[:64], batch_size=64, verbose=0)
    reloaded_loss = reloaded.evaluate(x[:64], target[:64], batch_size=64, verbose=0)
    assert reloaded_loss == pytest.approx(loss, rel=1e-5)
    bundle = aelib.load(path)
    assert bundle.name == name and bundle.info["note"] == "test"
    assert bundle.config == bundle.info["model_config"] == model.config
    # ... and builds again from it; saved again, it keeps the record it is given, one
    # level deep (the whole record was stored as model_config, nested again each time)
    assert aelib.build_model(name, **bundle.config).config == model.config
    again = aelib.load(aelib.save(bundle, tmp_path / "again.keras", {**bundle.info, "more": 1}))
    assert again.config == model.config and again.info["note"] == "test"
    assert again.info["more"] == 1 and "model_config" not in again.info["model_config"]
    assert "note" not in aelib.load(aelib.save(bundle, tmp_path / "bare.keras")).info
    np.testing.assert_allclose(
        bundle.decoder.predict(bundle.encoder.predict(x[:16], verbose=0), verbose=0),
        out,
        atol=1e-5,
    )


def test_splits_refuse_to_leave_no_training_images(digits):
    """aelib.train (the CLI's and every sweep trial's path) fails before training when
    the validation split takes every training image, instead of training on none."""
    arrays = ((digits, np.zeros(len(digits))), (digits[:10], np.zeros(10)))
    for limit, val_split in ((2, 0.9), (3, 0.9)):
        config = TrainConfig(model="dense", limit=limit, val_split=val_split)
        with pytest.raises(ValueError, match=f"no training images left: limit={limit} with"):
            make_splits(config, arrays, "flat")
    images = TrainConfig(model="dense", val_split=0.9)  # no limit: all (here 1) images
    with pytest.raises(ValueError, match="val_split=0.9 leaves 0 of the 1 images for training"):
        make_splits(images, ((digits[:1], np.zeros(1)), arrays[1]), "flat")
    splits = make_splits(TrainConfig(model="dense", limit=2, val_split=0.5), arrays, "flat")
    assert len(splits.x_train) == len(splits.x_val) == 1


def test_denoise_is_scored_at_eval_noise_factor_and_trained_at_noise_factor(digits):
    """eval_noise_factor sets the noise of the validation and test splits only (a sweep
    that searches noise_factor scores every trial on one task); the training split, and
    all three without it, get noise_factor. Noise 0 is refused for a denoiser."""
    from aelib.data import add_noise, prepare

    arrays = ((digits[:20], np.zeros(20)), (digits[20:30], np.zeros(10)))
    clean = prepare(digits[:30], "image")

    def noise_std(noisy, clean):
        return float(np.std(noisy - clean))

    fixed = TrainConfig(model="denoise", noise_factor=0.3, eval_noise_factor=0.6, val_split=0.5)
    same = TrainConfig(model="denoise", noise_factor=0.3, val_split=0.5)
    a, b = make_splits(fixed, arrays, "image"), make_splits(same, arrays, "image")
    np.testing.assert_array_equal(a.x_train, b.x_train)  # training noise: noise_factor
    np.testing.assert_array_equal(a.x_train, add_noise(clean[:10], 0.3, seed=0))
    np.testing.assert_array_equal(a.x_val, add_noise(clean[10:20], 0.6, seed=1))
    np.testing.assert_array_equal(a.x_test, add_noise(clean[20:30], 0.6, seed=2))
    np.testing.assert_array_equal(b.x_test, add_noise(clean[20:30], 0.3, seed=2))
    assert noise_std(a.x_test, a.y_test) > noise_std(b.x_test, b.y_test)
    with pytest.raises(ValueError, match="noise_factor must be > 0 for denoise"):
        TrainConfig(model="denoise", noise_factor=0)
    with pytest.raises(ValueError, match=r"eval_noise_factor must be in \(0, 1\] or None"):
        TrainConfig(model="denoise", eval_noise_factor=1.5)
    TrainConfig(model="dense", noise_factor=0)  # (no noise but the denoiser's)


@pytest.mark.parametrize(
    "layer", [ActivityL1(l1=3e-4, name="a"), Sampling(kl_weight=0.5, seed=7, name="s")]
)
def test_custom_layer_config_round_trips(layer):
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    # (each setting itself: one left out of get_config is left out of both sides above,
    # and a reloaded sparse model trained on with the layer's default penalty)
    settings = {"l1": 3e-4} if isinstance(layer, ActivityL1) else {"kl_weight": 0.5, "seed": 7}
    assert {k: getattr(clone, k) for k in settings} == settings


@pytest.mark.parametrize(
    "make, message",
    [  # (a string: "'<=' not supported"; a negative weight and a seed beyond PyTorch's
        # int32 were taken, the seed failing later in PyTorch's words)
        (lambda: ActivityL1(l1="x"), "l1 must be >= 0 and finite. Received: l1=x"),
        (lambda: Sampling(kl_weight=-1.0), "kl_weight must be >= 0 and finite"),
        (lambda: Sampling(kl_weight="1"), "kl_weight must be >= 0 and finite"),
        (lambda: Sampling(seed=2**31 + 5), "seed must be None or an int in [0, 2**31 - 1]"),
    ],
)
def test_custom_layers_refuse_bad_settings(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_maps_of_own_images_colour_no_digits(tmp_path, monkeypatch):
    """train --images has no labels (-1): its t-SNE and latent maps drew every point as
    digit 0 under a 0-9 digit colour bar."""
    import matplotlib.figure

    bars = []
    real = matplotlib.figure.Figure.colorbar

    def spy(self, *args, **kwargs):
        bars.append(kwargs.get("label"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "colorbar", spy)
    z = np.random.default_rng(0).random((20, 2))
    assert plots.latent_plane(z, np.arange(20) % 10, tmp_path / "digits.png").is_file()
    assert plots.latent_plane(z, np.full(20, -1), tmp_path / "own.png").is_file()
    assert bars == ["digit"]
    arrays = load_arrays(TrainConfig(model="dense", images=str(own_images(tmp_path))))
    assert set(arrays[1][1]) == {-1}


def test_maps_of_partly_labelled_images_draw_the_unlabelled_apart(tmp_path, monkeypatch):
    """Labels of -1 among digits (aelib.train's arrays may have -1 where an image has no
    label): the latent plane and t-SNE maps drew those points in digit 0's colour, and
    the 1-D codes in a row -1, in digit 0's colour too."""
    import matplotlib.axes

    drawn = []
    real = matplotlib.axes.Axes.scatter

    def spy(self, x, y, *args, **kwargs):
        drawn.append((np.asarray(x), kwargs.get("c"), kwargs.get("cmap")))
        return real(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", spy)
    labels = np.array([3, -1] * 10)
    z = np.random.default_rng(0).random((20, 2))
    assert plots.latent_plane(z, labels, tmp_path / "plane.png").is_file()
    assert plots.code_values(z[:, :1], labels, tmp_path / "codes.png").is_file()
    by_digit = [c for _, c, cmap in drawn if cmap == "tab10"]
    assert len(by_digit) == 2 and all(np.all(np.asarray(c) == 3) for c in by_digit)
    apart = [x for x, c, cmap in drawn if cmap is None]
    assert [len(x) for x in apart] == [10, 10]


def test_maps_of_labels_past_9_give_each_label_its_colour(tmp_path, monkeypatch):
    """aelib.train takes any integer labels (EMNIST's letters, 1-26): tab10's 0-9 range
    drew every label from 9 up in one colour, 9's, under a colour bar of digits."""
    import matplotlib.axes
    import matplotlib.figure

    drawn, bars, titles = [], [], []
    real_scatter, real_bar = matplotlib.axes.Axes.scatter, matplotlib.figure.Figure.colorbar
    real_title = matplotlib.axes.Axes.set_title

    def scatter(self, x, y, *args, **kwargs):
        drawn.append(kwargs)
        return real_scatter(self, x, y, *args, **kwargs)

    def colorbar(self, *args, **kwargs):
        bars.append(kwargs.get("label"))
        return real_bar(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", scatter)

    def set_title(self, text, *args, **kwargs):
        titles.append(text.replace("\n", " "))
        return real_title(self, text, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "colorbar", colorbar)
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", set_title)
    labels = np.arange(52) % 26 + 1
    z = np.random.default_rng(0).random((52, 2))
    assert plots.latent_plane(z, labels, tmp_path / "plane.png").is_file()
    assert plots.code_values(z[:, :1], labels, tmp_path / "codes.png").is_file()
    by_label = [kw for kw in drawn if kw.get("cmap")]
    assert len(by_label) == 2 and bars == ["label"]
    for kw in by_label:  # (every label inside the colour range: none clipped to its end)
        assert kw["vmin"] < 1 and kw["vmax"] > 26
    # ... and the titles call them images, not digits (as the colour bar says 'label')
    assert titles == [
        "VAE latent plane (z_mean of 52 test images)",
        "The 1-D codes of 52 test images",
    ]
    plots.latent_plane(z, labels % 10, tmp_path / "digits.png")  # (digits: as before)
    assert drawn[-1]["cmap"] == "tab10" and bars[-1] == "digit" and "digits" in titles[-1]
    # Unlabelled ones among 26 labels: too many rows for a tick each, so no tick says
    # "no label" of their gray row: a legend does.
    legends = []
    monkeypatch.setattr(matplotlib.axes.Axes, "legend", lambda self, *a, **k: legends.append(1))
    labels[::4] = -1
    assert plots.code_values(z[:, :1], labels, tmp_path / "some.png").is_file()
    assert legends and drawn[-2]["label"] == "no label"


def own_images(folder):
    """Ten small PNGs of noise, as a user's folder of images."""
    from PIL import Image

    rng = np.random.default_rng(1)
    (folder / "own").mkdir()
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(
            folder / f"own/{i}.png"
        )
    return folder / "own"


def test_activity_l1_is_batch_size_invariant():
    row = np.ones((1, 4), "float32")
    for batch in (1, 8):
        model = keras.Sequential([keras.Input((4,)), ActivityL1(l1=0.1)])
        model.compile(loss="mse")
        loss = model.evaluate(np.repeat(row, batch, 0), np.repeat(row, batch, 0), verbose=0)
        assert loss == pytest.approx(0.1 * 4), batch


def test_vae_samples_only_while_training():
    model = aelib.build_model("vae", seed=1)
    x = np.random.default_rng(0).random((4, 784)).astype("float32")
    z_mean = keras.Model(model.encoder.inputs, model.encoder.get_layer("z_mean").output)
    np.testing.assert_allclose(model.encoder.predict(x, verbose=0), z_mean.predict(x, verbose=0))
    sampled = model.encoder(x, training=True)
    assert not np.allclose(keras.ops.convert_to_numpy(sampled), z_mean.predict(x, verbose=0))


def test_a_save_that_fails_keeps_the_earlier_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    """save writes beside the target and renames: a save cut short (a full disk, a kill
    between the two) leaves the earlier model whole under its name."""
    from aelib import saving

    model = aelib.build_model("dense", encoding_dim=4)
    path = aelib.save(model, tmp_path / "m.keras", {"run": 1})
    before = path.read_bytes()

    def cut_short(src, dst, info=None):
        dst.write_bytes(src.read_bytes()[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(saving, "_copy_portable", cut_short)
    with pytest.raises(OSError, match="No space left"):
        aelib.save(model, path, {"run": 2})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["m.keras"]
    assert path.read_bytes() == before and aelib.load(path).info["run"] == 1
    # a folder in the path that is a file is named as such (mkdir's FileExistsError)
    for inside in (path / "x.keras", path / "sub" / "x.keras"):
        with pytest.raises(NotADirectoryError, match=f"Cannot save {inside}: {path} is a file"):
            aelib.save(model, inside)


def test_a_file_of_an_earlier_version_from_another_backend_loads_with_its_state(tmp_path):
    """Files written before save made them portable hold the saving backend's compile
    config (PyTorch's Adam class, which TensorFlow's fit fails on; a jit_compile).
    aelib.load reads them through a portable copy: they train on here, Adam's state
    and step count kept."""
    import zipfile

    model = aelib.build_model("dense")
    compile_model(model, 1e-3)
    x = np.random.default_rng(0).random((64, 784)).astype("float32")
    model.autoencoder.fit(x, x, batch_size=16, epochs=1, verbose=0)
    path = aelib.save(model, tmp_path / "new.keras")
    old = tmp_path / "old.keras"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(old, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                config["compile_config"]["jit_compile"] = True
                optimizer = config["compile_config"]["optimizer"]
                optimizer["module"] = "keras.src.backend.torch.optimizers.torch_adam"
                data = json.dumps(config)
            zout.writestr(item, data)
    bundle = aelib.load(old)
    assert int(bundle.autoencoder.optimizer.iterations) == 4
    moments = [np.asarray(v) for v in bundle.autoencoder.optimizer.variables[1:]]
    assert moments and all(
        np.array_equal(a, np.asarray(b))
        for a, b in zip(moments, model.autoencoder.optimizer.variables[1:], strict=True)
    )
    bundle.autoencoder.fit(x, x, batch_size=16, epochs=1, verbose=0)
    assert int(bundle.autoencoder.optimizer.iterations) == 8
    assert bundle.autoencoder.jit_compile == model.autoencoder.jit_compile
    assert not list(tmp_path.glob(".*"))  # no temp files left beside


def test_load_refuses_plain_keras_file(tmp_path):
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    plain.save(tmp_path / "plain.keras")
    assert aelib.read_info(tmp_path / "plain.keras") == {}
    with pytest.raises(ValueError, match="not saved by aelib.save"):
        aelib.load(tmp_path / "plain.keras")


def test_load_refuses_non_zip_and_missing(tmp_path):
    bad = tmp_path / "bad.keras"
    bad.write_text("not a zip")
    with pytest.raises(ValueError, match="bad.keras is not a readable .keras file"):
        aelib.read_info(bad)
    with pytest.raises(FileNotFoundError, match="Model file not found"):
        aelib.load(tmp_path / "missing.keras")


def test_load_names_the_file_and_what_is_damaged(tmp_path):
    """A damaged weights member gave zipfile's BadZipFile (no path, no ValueError); a
    damaged record JSON's error; a record that is no object was said to be missing."""
    import zipfile

    good = aelib.save(aelib.build_model("dense"), tmp_path / "good.keras")
    with zipfile.ZipFile(good) as zin:
        members = {i.filename: zin.read(i) for i in zin.infolist()}

    def variant(name, **changed):
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as zout:
            for member, data in {**members, **changed}.items():
                zout.writestr(member, data)
        return path

    raw = bytearray(good.read_bytes())  # (Keras stores the weights uncompressed)
    at = raw.find(members["model.weights.h5"][:64])
    assert at > 0
    raw[at + len(members["model.weights.h5"]) // 2] ^= 0xFF  # (its CRC no longer matches)
    (tmp_path / "flipped.keras").write_bytes(bytes(raw))
    assert aelib.read_info(tmp_path / "flipped.keras")["name"] == "dense"
    with pytest.raises(ValueError, match="flipped.keras is not a readable .keras file.*CRC"):
        aelib.load(tmp_path / "flipped.keras")
    for name, record, said in (
        ("json.keras", b"{bad", "json.keras: its aelib.json cannot be read"),
        ("list.keras", b"[1, 2]", "list.keras: its aelib.json is not aelib's record"),
        ("kind.keras", b'{"name": "dense"}', "kind.keras: its aelib.json lacks input_kind"),
        # a record edited, or of another file: believed, the jobs failed far from the cause
        (
            "banana.keras",
            b'{"name": "dense", "input_kind": "banana"}',
            "banana.keras: its aelib.json says input_kind 'banana'; expected one of "
            + re.escape("('flat', 'image', 'sequence')"),
        ),
        (
            "image.keras",
            b'{"name": "conv", "input_kind": "image"}',
            "image.keras: its aelib.json says input_kind 'image', which takes input of 4 "
            + re.escape("dimensions, but its model takes (None, 784): the record is not"),
        ),
    ):
        with pytest.raises(ValueError, match=said):
            aelib.load(variant(name, **{"aelib.json": record}))


@pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")  # (other.keras)
def test_load_names_the_file_keras_cannot_read(tmp_path):
    """A damaged or missing config.json or weights member, and the config of another
    model, failed with Keras's, JSON's or h5py's error (JSONDecodeError, KeyError,
    OSError), naming no file."""
    import zipfile

    good = aelib.save(aelib.build_model("dense"), tmp_path / "good.keras")
    conv = aelib.save(aelib.build_model("conv"), tmp_path / "conv.keras")
    with zipfile.ZipFile(good) as zin:
        members = {i.filename: zin.read(i) for i in zin.infolist()}
    with zipfile.ZipFile(conv) as zin:
        conv_config = zin.read("config.json")
    for name, changed, said in (
        ("json.keras", {"config.json": b"{bad"}, "JSONDecodeError"),
        ("noconfig.keras", {"config.json": None}, "KeyError"),
        ("noweights.keras", {"model.weights.h5": None}, "ValueError"),
        ("garbage.keras", {"model.weights.h5": b"garbage" * 10}, "OSError"),
        ("other.keras", {"config.json": conv_config}, "ValueError"),
    ):
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as zout:
            for member, data in {**members, **changed}.items():
                if data is not None:
                    zout.writestr(member, data)
        with pytest.raises(ValueError, match=f"{name} is not a readable .keras file: {said}"):
            aelib.load(path)
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    plain.save(tmp_path / "plain.keras")  # (an aelib record, but no encoder in it)
    with zipfile.ZipFile(tmp_path / "plain.keras", "a") as zout:
        zout.writestr("aelib.json", members["aelib.json"])
    with pytest.raises(ValueError, match="plain.keras is not a model aelib.save wrote"):
        aelib.load(tmp_path / "plain.keras")


def test_counts_and_seeds_beyond_what_every_backend_takes_are_refused():
    """Epochs or a batch size beyond int64 failed inside fit (TensorFlow's OverflowError
    or TypeError traceback); a VAE seed out of int32 under JAX (OverflowError) or PyTorch,
    and a negative one under JAX, while TensorFlow took them (and saved files that the
    other backends could not load)."""
    for field in ("epochs", "batch_size"):
        with pytest.raises(ValueError, match=re.escape(f"{field} must be at most 2**31 - 1")):
            TrainConfig(**{field: 2**63})
    for seed in (-1, 2**31, True, 1.0):
        with pytest.raises(ValueError, match=re.escape("seed must be None or an int in [0, 2")):
            aelib.build_model("vae", seed=seed)
    assert aelib.build_model("vae", seed=2**31 - 1).config["seed"] == 2**31 - 1


def test_save_wants_keras_suffix(tmp_path):
    with pytest.raises(ValueError, match="must end in .keras"):
        aelib.save(aelib.build_model("dense"), tmp_path / "model.h5")


def test_save_of_a_keras_model_says_what_it_takes(tmp_path):
    """aelib.save(model.autoencoder, ...) failed with "'Functional' object has no
    attribute 'input_kind'"."""
    model = aelib.build_model("dense")
    for wrong, name in ((model.autoencoder, "Functional"), ("dense", "str")):
        with pytest.raises(TypeError, match=f"save\\(\\) takes an aelib model.*Received: {name}"):
            aelib.save(wrong, tmp_path / "m.keras")
    assert not (tmp_path / "m.keras").exists()


def test_sparse_penalty_makes_codes_sparser_than_dense():
    from aelib.train import TrainConfig, train

    arrays = data_lib.load_mnist()
    means = {}
    for name, options in (("dense", {}), ("sparse", {"l1": 1e-3})):
        config = TrainConfig(
            model=name,
            model_options=options,
            epochs=3,
            limit=2000,
            test_limit=200,
            learning_rate=3e-3,
        )
        means[name] = train(config, data=arrays, figures=False, verbose=0).metrics["code_mean"]
    assert means["sparse"] < 0.7 * means["dense"], means


def test_cosine_lr_schedule_decays_to_zero_over_the_run():
    config = aelib.TrainConfig(
        model="dense", epochs=2, limit=600, test_limit=100, lr_schedule="cosine", batch_size=100
    )
    result = aelib.train(config, figures=False, verbose=0)
    optimizer = result.model.autoencoder.optimizer
    steps = int(optimizer.iterations.numpy())
    assert steps == 2 * 6  # 540 training digits in batches of 100, twice
    assert float(optimizer.learning_rate.numpy()) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="lr_schedule"):
        aelib.TrainConfig(lr_schedule="step")
    # A whole-number learning rate (--set dense.learning_rate=1 in a sweep) trains:
    # Keras's Adam refused the int, in every trial, after the driver's checks passed.
    for schedule in ("constant", "cosine"):
        config = aelib.TrainConfig(
            model="dense", epochs=1, limit=64, test_limit=16, learning_rate=1, lr_schedule=schedule
        )
        assert aelib.train(config, figures=False, verbose=0).history["loss"]


AUTOTUNE_SCRIPT = r"""
import importlib, json, sys
import numpy as np
import aelib
from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

def autotune():
    x = np.zeros((10, 4), np.float32)
    return ArrayDataAdapter(x, x, batch_size=4).get_tf_dataset().options().autotune.enabled

config = aelib.TrainConfig(model="dense", epochs=2, limit=600, test_limit=50, batch_size=64)
before = autotune()
module = importlib.import_module("aelib.train")
applied = module.tf_data_autotune_off
module.tf_data_autotune_off = lambda: False  # TensorFlow's default pipeline first
with_autotune = aelib.train(config, figures=False, verbose=0).history["loss"]
module.tf_data_autotune_off = applied
without = aelib.train(config, figures=False, verbose=0).history["loss"]
print("REPORT" + json.dumps({"before": before, "after": autotune(), "with": with_autotune,
                             "without": without, "again": module.tf_data_autotune_off()}))
"""


def test_train_turns_tf_data_autotuning_off_without_changing_the_losses():
    """Under TensorFlow, aelib.train turns off tf.data autotuning in Keras's NumPy
    pipelines (its thread stalled each epoch's end: see tf_data_autotune_off); the
    data and its order stay the same, so the losses do too."""
    proc = subprocess.run(
        [sys.executable, "-c", AUTOTUNE_SCRIPT],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT"))
    report = json.loads(line[len("REPORT") :])
    assert report["before"] in (None, True)  # TensorFlow's default: unset, meaning on
    assert report["after"] is False
    assert report["again"] is True  # applied once; a second call is a no-op that says so
    np.testing.assert_allclose(report["without"], report["with"], rtol=1e-5)


def test_import_aelib_leaves_scikit_image_for_later():
    """`import aelib` (to load a model, or in a Ray worker) does not import scikit-image
    and SciPy's statistics (~0.6 s); the metrics import them when they first run. (The
    jobs also keep out scikit-learn, which Keras imports optionally, as here.)"""
    code = (
        "import sys, numpy as np\n"
        "sys.modules['sklearn'] = None\n"
        "import aelib\n"
        "del sys.modules['sklearn']\n"
        "print(sorted(m for m in ('skimage', 'scipy.stats') if m in sys.modules))\n"
        "from aelib import metrics\n"
        "x = np.zeros((1, 8, 8))\n"
        "print(metrics.psnr(x, x + 0.1)[0].round(1), 'skimage' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:2] == ["[]", "20.0 True"]


def test_metrics_match_scikit_image_and_refuse_integer_images():
    """PSNR/SSIM are scikit-image's, per image: of gray images in any of the layouts the
    models use, of color images (SSIM over their channels), and never of integer pixels
    read against data_range=1 (uint8 digits gave -18.9 dB where the truth is ~29 dB)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from aelib import metrics

    rng = np.random.default_rng(0)
    ref = rng.random((3, 28, 28))
    img = np.clip(ref + rng.normal(0, 0.1, ref.shape), 0, 1)
    want_psnr = [
        peak_signal_noise_ratio(r, i, data_range=1.0) for r, i in zip(ref, img, strict=True)
    ]
    want_ssim = [structural_similarity(r, i, data_range=1.0) for r, i in zip(ref, img, strict=True)]
    for shape in [(3, 28, 28), (3, 28, 28, 1), (3, 784)]:
        np.testing.assert_allclose(metrics.psnr(ref.reshape(shape), img.reshape(shape)), want_psnr)
        np.testing.assert_allclose(metrics.ssim(ref.reshape(shape), img.reshape(shape)), want_ssim)

    rgb_ref, rgb = rng.random((2, 32, 32, 3)), rng.random((2, 32, 32, 3))
    got = metrics.ssim(rgb_ref, rgb)
    want = [
        structural_similarity(r, i, data_range=1.0, channel_axis=-1)
        for r, i in zip(rgb_ref, rgb, strict=True)
    ]
    np.testing.assert_allclose(got, want)

    digits, noisy = (ref * 255).astype(np.uint8), (img * 255).astype(np.uint8)
    np.testing.assert_allclose(  # 8-bit images with their own range
        metrics.psnr(digits, noisy, data_range=255),
        [peak_signal_noise_ratio(r, i, data_range=255) for r, i in zip(digits, noisy, strict=True)],
    )
    for metric in (metrics.psnr, metrics.ssim):
        for wrong in (digits, digits.astype(np.float32), ref - 0.5):  # 0..255, or below 0
            with pytest.raises(ValueError, match=r"must have values in \[0, data_range=1.0\]"):
                metric(wrong, wrong)


def test_test_psnr_and_ssim_cover_every_test_image_as_the_loss_does():
    """The test PSNR/SSIM are means over every test image, as test_loss, test_bce and
    test_images are: they were of the first 10,000 only, so a test split of more (own
    images or arrays, 100,000 and up: their last tenth) reported the loss of all and the
    PSNR of part, under the same `test_images`."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from aelib.registry import Autoencoder
    from aelib.train import evaluate

    inputs = keras.Input((8, 8, 1))
    encoder = keras.Model(inputs, keras.layers.Identity()(inputs), name="encoder")
    code = keras.Input((8, 8, 1))
    decoder = keras.Model(code, keras.layers.Identity()(code), name="decoder")
    model = Autoencoder.from_autoencoder(
        keras.Model(inputs, decoder(encoder(inputs))), "conv", "image", {}
    )
    compile_model(model, 1e-3)
    rng = np.random.default_rng(0)
    n = 10_001
    clean = rng.uniform(0.2, 0.8, (n, 8, 8, 1)).astype("float32")
    shown = np.clip(clean + rng.normal(0, 0.01, clean.shape), 0, 1).astype("float32")
    shown[-1] = 1.0 - clean[-1]  # the image past the 10,000th: far from its target
    splits = Splits(shown, clean, shown, clean, shown, clean, np.full(n, -1))
    got = evaluate(model, splits, batch_size=4096)
    pairs = list(
        zip(clean[..., 0].astype(np.float64), shown[..., 0].astype(np.float64), strict=True)
    )
    assert got["test_images"] == n
    assert got["test_psnr"] == pytest.approx(
        np.mean([peak_signal_noise_ratio(c, s, data_range=1.0) for c, s in pairs]), rel=1e-9
    )
    assert got["test_ssim"] == pytest.approx(
        np.mean([structural_similarity(c, s, data_range=1.0) for c, s in pairs]), rel=1e-9
    )


def test_options_and_records_a_library_user_can_trip_on(tmp_path, monkeypatch):
    """NumPy numbers as options (a TypeError of json), conv's unpadded layer at another
    kernel_size (a 24x24 output), a record whose `info` overrode aelib's own fields
    (`{**model.info, ...}` from another backend kept its versions), a NumPy array in
    `info`, folders where files belong, and `~`."""
    deep = aelib.build_model("deep", encoding_dim=np.int64(16), hidden_units=(np.int32(64),))
    assert deep.config["encoding_dim"] == 16 and type(deep.config["encoding_dim"]) is int
    for kernel_size in (1, 5):
        conv = aelib.build_model("conv", kernel_size=kernel_size)
        assert conv.autoencoder.output_shape == (None, 28, 28, 1), kernel_size
    for name, options, message in (
        ("vae", {"input_dim": 0}, "input_dim must be >= 1"),
        ("sparse", {"l1": float("nan")}, "l1 must be >= 0 and finite"),
        ("sparse", {"l1": float("inf")}, "l1 must be >= 0 and finite"),
    ):
        with pytest.raises(ValueError, match=message):
            aelib.build_model(name, **options)

    dense = aelib.build_model("dense")
    info = {"name": "vae", "versions": {"backend": "jax"}, "arr": np.arange(3), "n": np.int64(2)}
    saved = aelib.read_info(aelib.save(dense, tmp_path / "d.keras", info))
    assert saved["name"] == "dense" and saved["versions"]["backend"] == keras.backend.backend()
    assert saved["arr"] == [0, 1, 2] and saved["n"] == 2
    (tmp_path / "dir.keras").mkdir()
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        aelib.save(dense, tmp_path / "dir.keras")
    with pytest.raises(IsADirectoryError, match="is a folder; expected a .keras file"):
        aelib.load(tmp_path / "dir.keras")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert aelib.save(dense, "~/home.keras") == tmp_path / "home.keras"
    assert aelib.load("~/home.keras").name == "dense"
    figure = plots.learning_curves({"loss": [1.0, 0.5]}, "~/curves")
    assert figure == tmp_path / "curves.png" and figure.is_file()
    with pytest.raises(ValueError, match="size must be"):
        data_lib.load_image_folder(tmp_path, size=(0, 0))
    (tmp_path / "images").mkdir()
    for i in range(2):
        plots.image_rows({"x": np.zeros((1, 28, 28))}, tmp_path / "images" / f"{i}.png")
    assert data_lib.load_image_folder("~/images", size=np.array([8, 8])).shape == (2, 8, 8)


def test_train_refuses_before_training_what_would_fail_after_it(tmp_path, monkeypatch):
    """Arrays of the wrong structure or range, a flat model of non-square images, images
    under 7x7, a metrics_limit below 1 and an initial_epoch past the epochs failed after
    training (or never, or reported a run of no epochs as NaN); a VAE of 32x32 images crashed
    in its manifold figure, and one without labels in its latent plane. Arrays passed
    to train() are recorded as such."""
    rng = np.random.default_rng(0)

    def arrays(shape, n=60, dtype=np.uint8, top=256):
        labels = np.arange(n) % 10
        x = rng.integers(0, top, (n, *shape)).astype(dtype)
        return (x, labels), (x[:20], labels[:20])

    config = TrainConfig(model="dense", epochs=1, batch_size=16)
    (x_train, _), (x_test, _) = arrays((28, 28))
    bad = [
        ((x_train, x_test), "data must be ((x_train, y_train), (x_test, y_test))"),
        (arrays((28, 28), dtype=np.int16, top=300), "training images holds int16 values in"),
        (arrays((28, 32)), "the data's 28x32 images are not square"),
        (arrays((28, 32, 1)), "the data's 28x32 images are not square"),
        (arrays((896,)), "the data's 896-value images are not square"),
        (((x_train, np.zeros(3)), (x_test, None)), "data has 3 training labels for 60 training"),
        (  # (one-hot labels: after training, Matplotlib's "'c' argument has 200 elements")
            ((x_train, None), (x_test, np.eye(10)[np.arange(20) % 10])),
            "data's test labels are float64 values of shape (20, 10); expected a 1-D array",
        ),
    ]
    for data, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            aelib.train(config, data=data, figures=False, verbose=0)
    # Flat test images (one size with 28x28, as dense reads both) of a model of images or
    # sequences: Keras's shape error traceback in the evaluation, after the training.
    flat = ((x_train, None), (x_test.reshape(len(x_test), 784), None))
    for name in ("conv", "denoise", "seq2seq"):
        with pytest.raises(ValueError, match=f"Model '{name}' reads .*data's test images are not"):
            aelib.train(TrainConfig(model=name, epochs=1), data=flat, figures=False, verbose=0)
    # Flat training images too (MNIST as other loaders give it): NumPy's "not enough
    # values to unpack", naming no input.
    flat = ((x_train.reshape(len(x_train), 784), None), (x_test.reshape(len(x_test), 784), None))
    for name, reads in (("conv", "HxW images"), ("seq2seq", "H time steps of W values")):
        said = f"Model '{name}' reads {reads}, and the data's training images are not (N, H, W)"
        with pytest.raises(ValueError, match=re.escape(said) + r".*shape \(60, 784\).*reshape"):
            aelib.train(TrainConfig(model=name, epochs=1), data=flat, figures=False, verbose=0)
    # (and colour ones, where the sweep's driver checks its trials' settings: as_images's
    # words, naming neither split nor the data's shape)
    from aelib.train import build_checked

    rgb = np.zeros((4, 28, 28, 3), np.uint8)
    with pytest.raises(
        ValueError, match=r"training images are not .*shape \(4, 28, 28, 3\)\. .*gray"
    ):
        build_checked(TrainConfig(model="conv"), ((rgb, None), (rgb, None)))
    # Images under SSIM's 7x7 window: dense failed in the test metrics after training,
    # denoise in its val_ssim at the end of epoch 1.
    for name, options, shape in (("dense", {"input_dim": 36}, (6, 6)), ("denoise", {}, (4, 4))):
        small = TrainConfig(model=name, model_options=options, epochs=1, batch_size=16)
        with pytest.raises(ValueError, match=f"data's {shape[0]}x{shape[1]} images are too small"):
            aelib.train(small, data=arrays(shape), figures=False, verbose=0)
    with pytest.raises(ValueError, match=r"initial_epoch must be in \[0, epochs=1\)"):
        aelib.train(config, data=arrays((28, 28)), initial_epoch=1, verbose=0)
    with pytest.raises(ValueError, match="metrics_limit must be >= 1"):
        TrainConfig(model="denoise", metrics_limit=0)

    # NumPy ints (a loop over np.arange): the seed's failed in Keras, after the checks.
    vae = TrainConfig(
        model="vae", epochs=np.int64(1), seed=np.int64(3), model_options={"input_dim": 1024}
    )
    monkeypatch.setenv("HOME", str(tmp_path))
    (x, _), (x_test, _) = arrays((32, 32))  # and no labels (None: the figures had none)
    result = aelib.train(vae, data=((x, None), (x_test, None)), out_dir="~/vae", verbose=0)
    assert result.paths["figure_manifold"] == str(tmp_path / "vae/figures/vae_manifold.png")
    assert (tmp_path / "vae/figures/vae_latent_plane.png").is_file()
    record = json.loads((tmp_path / "vae" / "metrics.json").read_text())
    assert record["train_config"]["epochs"] == 1 and isinstance(
        record["train_config"]["epochs"], int
    )
    assert record["data_settings"]["source"] == "arrays passed to train()"
    TrainConfig.from_dict(record["train_config"])  # (1.0 was refused as an int)
    # The trained model carries that record ({} before: saving it as the README shows,
    # save(m, path, {**m.info, ...}), dropped its training config and metrics).
    info = result.model.info
    for key in ("train_config", "data_settings", "history"):
        assert info[key] == record[key], key
    assert info["metrics"]["test_bce"] == record["metrics"]["test_bce"]
    assert info["metrics"] is not result.metrics  # (a copy: editing one changed both)
    again = tmp_path / "again.keras"
    aelib.save(result.model, again, {**result.model.info, "note": "kept"})
    assert aelib.read_info(again)["metrics"]["test_bce"] == record["metrics"]["test_bce"]


def test_a_bad_option_value_is_refused_before_the_data_is_read(tmp_path):
    """A model option of the wrong value was found only after the data was loaded: a
    missing MNIST (no --data, no $AELIB_MNIST, offline) hid it behind the download's
    error."""
    missing = tmp_path / "no" / "mnist.npz"
    config = TrainConfig(model="vae", epochs=1, model_options={"latent_dim": "x"}, data=missing)
    with pytest.raises(ValueError, match="latent_dim of model 'vae' must be an int"):
        aelib.train(config, figures=False, verbose=0)


def test_values_of_the_wrong_type_are_named_and_lists_are_taken_as_arrays():
    """model_options=None, train("dense") and arrays passed as lists failed with a
    TypeError or an AttributeError naming no input; a number for data or images, and a
    string for invert, were accepted (and failed, or did the wrong thing, later)."""
    for field, value, message in (
        ("model_options", None, "model_options must be a dict of build_model options"),
        ("data", 123, "data must be a path or None. Received: data=123"),
        ("images", 7, "images must be a path or None. Received: images=7"),
        ("data", " ", "data must be the path of an mnist.npz, or None ($AELIB_MNIST"),
        ("invert", "yes", "invert must be True or False. Received: invert='yes'"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            TrainConfig(**{field: value})
    with pytest.raises(TypeError, match=re.escape("train() takes a TrainConfig")):
        aelib.train("dense")
    # train()'s own arguments (figures="no" drew figures; a lone callback failed in fit)
    small = TrainConfig(model="dense", epochs=1, data="/nonexistent/mnist.npz")
    for kwargs, error, message in (
        ({"figures": "no"}, TypeError, "figures must be True or False. Received: figures='no'"),
        ({"resume": "yes"}, TypeError, "resume must be True or False. Received: resume='yes'"),
        ({"callbacks": keras.callbacks.History()}, TypeError, "callbacks must be a list (or"),
        ({"callbacks": [print]}, TypeError, "callbacks must be a list (or tuple) of Keras"),
        ({"resume": True}, ValueError, "resume=True goes on from the checkpoint a stopped"),
    ):
        with pytest.raises(error, match=re.escape(message)):
            aelib.train(small, **kwargs)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 28, 28)).astype(np.uint8)
    labels = np.arange(40) % 10
    data = ((x.tolist(), labels.tolist()), (x[:10].tolist(), labels[:10].tolist()))
    config = TrainConfig(model="dense", epochs=1, batch_size=16, val_split=0)
    result = aelib.train(config, data=data, figures=False, verbose=0)
    assert np.isfinite(result.metrics["test_loss"])


def test_the_library_functions_name_what_they_take(tmp_path):
    """build_model(["dense"]), load(5) and save(..., info=[...]) failed with Python's
    words naming no argument ("unhashable type: 'list'", pathlib's TypeError, "'list'
    object is not a mapping"); scale() and flatten() of a list with an AttributeError."""
    from aelib import data

    with pytest.raises(ValueError, match=re.escape("Unknown model ['dense']. Valid names")):
        aelib.build_model(["dense"])
    for fn, arg in ((aelib.load, 5), (aelib.read_info, None)):
        with pytest.raises(TypeError, match=r"\(\) takes a path to a \.keras file. Received"):
            fn(arg)
    model = aelib.build_model("dense", encoding_dim=2)
    with pytest.raises(TypeError, match=re.escape("save() takes info as a dict")):
        aelib.save(model, tmp_path / "m.keras", info=[1, 2])
    assert not (tmp_path / "m.keras").exists()
    pixels = [[[0, 255], [255, 0]]]
    assert data.scale(pixels).tolist() == [[[0.0, 1.0], [1.0, 0.0]]]
    assert data.flatten(pixels).shape == (1, 4)
    assert data.as_images(pixels).shape == (1, 2, 2, 1)
    assert data.as_sequences(pixels).shape == (1, 2, 2)
    assert data.unflatten([[0, 1, 2, 3]]).shape == (1, 2, 2)


class StopAfter(keras.callbacks.Callback):
    """Ctrl-C after epoch `epochs` (after its checkpoint: aelib's callbacks run first)."""

    def __init__(self, epochs: int = 2):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            raise KeyboardInterrupt


class LogsEpoch(keras.callbacks.Callback):
    """Logs the epoch's number, as a caller's callback adds its own keys."""

    def on_epoch_end(self, epoch, logs=None):
        logs["epoch_no"] = epoch + 1


def record_of(out) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_train_goes_on_from_the_checkpoint_a_stopped_run_left(tmp_path):
    """A run with out_dir saves a checkpoint after every epoch but the last; resume=True
    goes on from it with its weights, its optimizer's state (Adam's step count, which the
    cosine schedule reads) and its history, and the ended run removes it. A checkpoint
    of other settings is not gone on from, and says why."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (100, 28, 28)).astype(np.uint8)
    data = ((x, np.arange(100) % 10), (x[:20], np.arange(20) % 10))
    config = TrainConfig(model="dense", epochs=3, batch_size=32, lr_schedule="cosine")
    steps = 3  # (90 training images after val_split 0.1, in batches of 32)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        aelib.train(config, data, out, callbacks=[StopAfter(2)], figures=False, verbose=0)
    state, why_not = stopped_run(out, "dense", resume_settings(config, data))
    assert why_not == "" and state["epochs_done"] == 2 and len(state["history"]["loss"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["dense.checkpoint.keras"]
    saved = aelib.load(checkpoint_path(out, "dense"))
    assert int(saved.autoencoder.optimizer.iterations) == 2 * steps

    other = TrainConfig.from_dict({**config.to_dict(), "epochs": 4, "seed": 1})
    assert stopped_run(out, "dense", resume_settings(other, data)) == (
        None,
        "dense.checkpoint.keras is of a run with other settings: epochs=3 (now 4), seed=0 (now 1)",
    )
    # The images themselves, not the path they were read from, and options as built
    # (a relative --data read another file in another folder; an option given at its
    # default, or the test split's size, made another run).
    same = {"data": "elsewhere/mnist.npz", "test_limit": 10, "model_options": {"encoding_dim": 32}}
    assert stopped_run(
        out, "dense", resume_settings(TrainConfig.from_dict({**config.to_dict(), **same}), data)
    )[0]
    flipped = ((255 - x, data[0][1]), data[1])
    assert stopped_run(out, "dense", resume_settings(config, flipped))[1] == (
        "dense.checkpoint.keras is of a run with other settings: other training images"
    )
    assert stopped_run(tmp_path / "none", "dense", resume_settings(config, data)) == (None, "")

    # A kill -9 while saving leaves temp files: the next save removes those of runs gone.
    stale = [".dense.checkpoint.4194304.tmp.keras", ".dense.4194303.keras-tmp.keras"]
    stale.append(".metrics.4194304.tmp.json")
    live = f".dense.checkpoint.{os.getppid()}.tmp.keras"  # (a process that runs)
    for name in [*stale, live]:
        (out / name).write_bytes(b"half a file")
    result = aelib.train(
        config, data, out, callbacks=[LogsEpoch()], figures=False, verbose=0, resume=True
    )
    (out / live).unlink()  # (kept: its process runs)
    assert result.metrics["resumed_after_epoch"] == 2 and result.metrics["epochs_run"] == 3
    assert result.history["loss"][:2] == state["history"]["loss"]
    # A key a caller's callback logs (in the resumed epochs only: the checkpoint is saved
    # before it runs) is None in the epochs before, not shifted to the first epochs.
    assert result.history.pop("epoch_no") == [None, None, 3.0]
    assert record_of(out)["history"]["epoch_no"] == [None, None, 3.0]
    if keras.backend.backend() == "tensorflow":  # (see test_a_resumed_run_sees_the_orders_...)
        unstopped = aelib.train(config, data, figures=False, verbose=0)
        assert result.history == unstopped.history  # to the bit
    assert len(result.history["val_loss"]) == 3
    assert int(result.model.autoencoder.optimizer.iterations) == 3 * steps
    assert result.metrics["train_seconds"] > state["train_seconds"]
    assert sorted(p.name for p in out.iterdir()) == ["dense.keras", "metrics.json"]
    record = json.loads((out / "metrics.json").read_text())
    assert len(record["history"]["loss"]) == 3
    with pytest.raises(KeyboardInterrupt):  # (resume=False: from epoch 1, not the end)
        aelib.train(config, data, out, callbacks=[StopAfter(2)], verbose=0)
    with pytest.raises(ValueError, match="initial_epoch and resume=True both say where"):
        aelib.train(config, data, out, initial_epoch=1, resume=True, verbose=0)
    # An out_dir that is a file is refused before training (after it, before), and an
    # empty image folder path (the working folder's images were read).
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="afile is a file; expected a folder"):
        aelib.train(config, data, tmp_path / "afile" / "o", verbose=0)
    with pytest.raises(ValueError, match="images must be a folder's path, or None"):
        TrainConfig.from_dict({**config.to_dict(), "images": ""})
    # Stopped after its last epoch (in its evaluation): the rerun trains no epoch, and its
    # time to train is the stopped run's (fit, which only restored the weights, added ~1 s).
    with pytest.raises(KeyboardInterrupt):
        aelib.train(config, data, tmp_path / "end", callbacks=[StopAfter(3)], verbose=0)
    state, _ = stopped_run(tmp_path / "end", "dense", resume_settings(config, data))
    result = aelib.train(config, data, tmp_path / "end", figures=False, verbose=0, resume=True)
    assert result.metrics["resumed_after_epoch"] == 3 and result.metrics["epochs_run"] == 3
    assert result.metrics["train_seconds"] == state["train_seconds"]
    # A checkpoint resume=True cannot go on from is said, not passed over in silence.
    with pytest.warns(UserWarning, match="other settings: other training images; training"):
        result = aelib.train(config, flipped, out, figures=False, verbose=0, resume=True)
    assert "resumed_after_epoch" not in result.metrics


def test_a_resumed_vae_draws_the_noise_an_unstopped_one_drew(tmp_path):
    """The VAE samples its code with a random generator whose state is no weight: a run
    resumed after epoch 2 drew epoch 1's noise again, and its losses differed from an
    unstopped run's (in the fourth digit of val_loss). Its checkpoint keeps the state.
    With val_split 0 the epochs validate on the test split: test_limit is then a setting
    a run resumes with."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (100, 28, 28)).astype(np.uint8)
    data = ((x, np.arange(100) % 10), (x[:20], np.arange(20) % 10))
    config = TrainConfig(model="vae", epochs=3, batch_size=32)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        aelib.train(config, data, out, callbacks=[StopAfter(2)], figures=False, verbose=0)
    recorded = aelib.read_info(checkpoint_path(out, "vae"))["seed_states"]
    assert len(recorded) == 1 and recorded[0][1] > 0  # (a seed and a counter, moved on)
    resumed = aelib.train(config, data, out, figures=False, verbose=0, resume=True)
    unstopped = aelib.train(config, data, figures=False, verbose=0)
    assert resumed.metrics["resumed_after_epoch"] == 2

    def states(result):
        model = result.model.autoencoder
        return [keras.ops.convert_to_numpy(v).tolist() for v in seed_states(model)]

    assert states(resumed) == states(unstopped)
    if keras.backend.backend() == "tensorflow":  # (see test_a_resumed_run_sees_the_orders_...)
        assert resumed.history == unstopped.history  # to the bit

    on_test = TrainConfig(model="dense", epochs=3, batch_size=32, val_split=0, test_limit=10)
    other = TrainConfig.from_dict({**on_test.to_dict(), "test_limit": 20})
    assert resume_settings(on_test, data) != resume_settings(other, data)
    held = TrainConfig.from_dict({**other.to_dict(), "val_split": 0.1})
    assert resume_settings(held, data) == resume_settings(
        TrainConfig.from_dict({**held.to_dict(), "test_limit": 10}), data
    )
    # A checkpoint of a version before it (no test_limit in its settings): its config's.
    old = tmp_path / "old"
    with pytest.raises(KeyboardInterrupt):
        aelib.train(on_test, data, old, callbacks=[StopAfter(2)], figures=False, verbose=0)
    path = checkpoint_path(old, "dense")
    record = aelib.read_info(path)
    del record["checkpoint"]["settings"]["test_limit"]
    aelib.save(aelib.load(path), path, record)
    assert stopped_run(old, "dense", resume_settings(on_test, data))[0]
    said = stopped_run(old, "dense", resume_settings(other, data))[1]
    assert said.endswith("other settings: test_limit=10 (now 20)"), said


def test_own_images_test_split_holds_whole_images(tmp_path):
    """The test split of an image folder is its last whole images, those closest to a
    tenth of the arrays: in patch mode it was the last tenth of the patches, so the last
    image's other patches were trained on and its test scores flattered the model."""
    from PIL import Image

    rng = np.random.default_rng(0)
    scans = [rng.integers(0, 255, (56, 84), dtype=np.uint8) for _ in range(7)]
    for i, scan in enumerate(scans):  # (6 patches each: 42, of which a tenth is 4)
        Image.fromarray(scan).save(tmp_path / f"scan{i}.png")
    config = TrainConfig(model="denoise", images=str(tmp_path), image_mode="patch")
    (x_train, _), (x_test, _) = load_arrays(config)
    last = scans[-1].reshape(2, 28, 3, 28).transpose(0, 2, 1, 3).reshape(6, 28, 28)
    assert np.array_equal(x_test, last) and len(x_train) == 36
    assert not any((x_train == patch).all(axis=(1, 2)).any() for patch in last)

    assert tail_for_test(np.ones(30, int)) == (3, True)  # (resize mode: a tenth, as before)
    assert tail_for_test(np.array([100, 100, 40, 40])) == (40, True)
    assert tail_for_test(np.array([500, 5, 5, 5])) == (15, True)
    # (an image of over half, or the only one: a tenth of the patches, not whole images)
    assert tail_for_test(np.array([10, 1000])) == (101, False)
    assert tail_for_test(np.array([50])) == (5, False)
    big = rng.integers(0, 255, (280, 280), dtype=np.uint8)  # (100 patches of 142)
    Image.fromarray(big).save(tmp_path / "scan9.png")
    with pytest.warns(UserWarning, match="ends in an image of over half the patches: the test"):
        (x_train, _), (x_test, _) = load_arrays(config)
    assert len(x_train) == 128 and len(x_test) == 14
    (tmp_path / "scan9.png").unlink()
    far = tmp_path / "far"  # (60 patches, then 1 and 1: the nearest whole tail is 2 of 62)
    far.mkdir()
    Image.fromarray(rng.integers(0, 255, (168, 280), dtype=np.uint8)).save(far / "a.png")
    for name in ("b.png", "c.png"):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(far / name)
    with pytest.warns(UserWarning, match="the test split holds 2 of the 62 patches"):
        load_arrays(TrainConfig.from_dict({**config.to_dict(), "images": str(far)}))
    for made in far.iterdir():
        made.unlink()
    far.rmdir()
    for extra in tmp_path.glob("scan[1-6].png"):
        extra.unlink()
    with pytest.warns(UserWarning, match="holds one image: the test split is the last tenth"):
        (x_train, _), (x_test, _) = load_arrays(config)
    assert len(x_train) == 5 and len(x_test) == 1


@pytest.mark.parametrize("when", ["epoch_begin", "last_batch"])
def test_a_run_that_diverges_keeps_its_last_finite_epoch(tmp_path, when):
    """A run whose loss turns NaN saves the NaN model as it was, and keeps the checkpoint
    of its last epoch with finite weights as NAME.last_finite.keras (it removed it, and
    with it every epoch trained before). A last batch's step that makes the weights NaN
    leaves that epoch's loss finite but not its validation loss: it is not kept."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (100, 28, 28)).astype(np.uint8)
    data = ((x, np.arange(100) % 10), (x[:20], np.arange(20) % 10))
    config = TrainConfig(model="dense", epochs=5, batch_size=32)
    steps = 3  # (90 training images after val_split 0.1, in batches of 32)

    class Diverge(keras.callbacks.Callback):  # (what a too-large step does to weights)
        def poison(self):
            for weight in self.model.trainable_weights:
                weight.assign(np.full(weight.shape, np.nan, "float32"))

        def on_epoch_begin(self, epoch, logs=None):
            if when == "epoch_begin" and epoch == 2:
                self.poison()

        def on_train_batch_end(self, batch, logs=None):
            if when == "last_batch" and batch == steps - 1 and self.model.optimizer.iterations == 6:
                self.poison()

    out = tmp_path / "run"
    result = aelib.train(config, data, out, callbacks=[Diverge()], figures=False, verbose=0)
    assert result.metrics["nan"] and result.metrics["epochs_run"] == 3
    last = out / "dense.last_finite.keras"
    assert result.paths["last_finite_model"] == str(last)
    assert sorted(p.name for p in out.iterdir()) == [
        "dense.keras",
        "dense.last_finite.keras",
        "metrics.json",
    ]
    assert not np.isfinite(aelib.load(out / "dense.keras").autoencoder.get_weights()[0]).all()
    kept = aelib.load(last)
    assert all(np.isfinite(w).all() for w in kept.autoencoder.get_weights())
    epochs = 2 if when == "epoch_begin" else 1  # (epoch 2's weights were NaN at its end)
    assert int(kept.autoencoder.optimizer.iterations) == epochs * steps
    assert kept.info["checkpoint"]["epochs_done"] == epochs
    # A later run into the folder removes it: it is of another run than the model beside it.
    aelib.train(TrainConfig(model="dense", epochs=1, batch_size=32), data, out, verbose=0)
    assert not last.exists() and not checkpoint_path(out, "dense").exists()


def _batch_orders(seed=0, epochs=3, initial_epoch=0, batch_size=8) -> list[list[float]]:
    """What aelib.train does (set_random_seed, then fit given training_data's batches),
    on 40 numbers: an identity model and a learning rate of 0, so each batch's running
    mean absolute value shows which numbers the epoch's batches held."""
    keras.utils.set_random_seed(seed)
    x = np.arange(40, dtype="float32").reshape(40, 1)
    identity = keras.layers.Dense(1, kernel_initializer="ones", use_bias=False)
    model = keras.Sequential([keras.Input((1,)), identity])
    model.compile(keras.optimizers.SGD(0.0), "mae")
    orders: list[list[float]] = []

    class Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            orders.append([])

        def on_train_batch_end(self, batch, logs=None):
            orders[-1].append(round(float(logs["loss"]), 4))

    batches = training_data(x, np.zeros_like(x), batch_size, seed, initial_epoch)
    model.fit(**batches, epochs=epochs, initial_epoch=initial_epoch, verbose=0,
              callbacks=[Record()])  # fmt: skip
    return orders


def test_the_batch_order_probe_sees_every_number_once_an_epoch():
    """(So that the order tests below fail for their reason alone.)"""
    orders = _batch_orders()
    assert [len(order) for order in orders] == [5, 5, 5]
    assert [order[-1] for order in orders] == [19.5] * 3  # (the mean of 0..39)
    orders = _batch_orders(batch_size=12)  # (3 batches of 12 and one of 4 an epoch)
    assert [len(order) for order in orders] == [4, 4, 4]
    assert [order[-1] for order in orders] == [19.5] * 3
    assert len({tuple(order) for order in orders}) == 3, orders


def test_training_sees_its_batches_in_a_new_order_each_epoch():
    """Under TensorFlow, Keras's own shuffle=True gave every epoch the same order once
    set_random_seed had run (tensorflow/tensorflow#35682): training_data draws its own.
    The orders are the seed's: the same in a second run, others with another seed."""
    orders = _batch_orders()
    assert len({tuple(order) for order in orders}) == 3, orders
    assert _batch_orders() == orders
    assert _batch_orders(seed=1) != orders


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="JAX and PyTorch get Keras's shuffle, drawn from NumPy's generator as it stands",
)
def test_a_resumed_run_sees_the_orders_an_unstopped_one_saw():
    """Epoch e's order comes from (seed, e), not from how many epochs ran before it in
    this process: a run resumed after epoch 2 sees epochs 3 and 4 as a run of 4 did."""
    unstopped = _batch_orders(epochs=4)
    assert _batch_orders(epochs=4, initial_epoch=2) == unstopped[2:]
