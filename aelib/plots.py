"""The tutorial's figures, drawn with matplotlib's Agg backend into PNG files."""

from __future__ import annotations

import contextlib
import functools
import numbers
import os
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from aelib import data as data_lib  # noqa: E402
from aelib import process  # noqa: E402

if TYPE_CHECKING:
    from aelib.registry import Autoencoder
    from aelib.train import Splits


def _predict(model, x: np.ndarray, batch_size: int = 1024):
    """`model(x)` as NumPy, a batch at a time: the figures' few thousand digits at most.
    `Model.predict` traced a new function for each model and input size, and after a
    sweep's first few figures TensorFlow warned of "excessive" `tf.function` retracing.
    A model of several outputs (denoise's encoder with skips) gives a list."""
    import keras

    no_grad = contextlib.nullcontext()
    if keras.backend.backend() == "torch":  # (each batch's autograd graph kept otherwise)
        import torch

        no_grad = torch.no_grad()
    with no_grad:
        outs = [model(x[i : i + batch_size], training=False) for i in range(0, len(x), batch_size)]
    if isinstance(outs[0], list | tuple):
        return [
            np.concatenate([keras.ops.convert_to_numpy(o[k]) for o in outs])
            for k in range(len(outs[0]))
        ]
    return np.concatenate([keras.ops.convert_to_numpy(o) for o in outs])


def _closes_its_figure(draw):
    """A drawing that fails (bad arrays, a full disk) closes the figure it opened:
    pyplot keeps every open figure, and a long process (a sweep's driver, a notebook)
    would hold them all."""

    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        before = set(plt.get_fignums())
        try:
            return draw(*args, **kwargs)
        except BaseException:
            for number in set(plt.get_fignums()) - before:
                plt.close(number)
            raise

    return wrapper


def _as_hw(x: np.ndarray) -> np.ndarray:
    """Model arrays (flat, sequence or channels-last) -> (N, 28, 28)-like images."""
    x = np.asarray(x)
    if x.ndim == 4:
        return x[..., 0] if x.shape[-1] == 1 else x
    if x.ndim == 2:
        return data_lib.unflatten(x)
    return x


def _check_count(n, name: str = "n") -> None:
    """An int >= 1 (n=0 failed in Matplotlib's gridspec, or as an IndexError)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"{name} must be an int >= 1. Received: {name}={n!r}")


def _check_points(points: np.ndarray, labels: np.ndarray, what: str, shape: str) -> None:
    """`points` of one row per label: an IndexError, or a plot of the first two of 3-D
    points, before."""
    if len(points) != len(labels):
        raise ValueError(
            f"{what} and labels must be as many: {len(points)} {what}, {len(labels)} labels"
        )
    if shape == "(N, 2)" and (points.ndim != 2 or points.shape[1] != 2):
        raise ValueError(f"{what} must be {shape} points. Received shape {points.shape}")
    if shape == "(N,)" and points.size != len(points):
        raise ValueError(f"{what} must be {shape} values, one each. Received shape {points.shape}")


@_closes_its_figure
def image_rows(rows: dict[str, np.ndarray], path: str | os.PathLike, n: int = 10) -> Path:
    """Draws each array's first `n` images as one labelled row (originals over
    reconstructions, noisy over denoised, ...): floats in [0, 1], or 8-bit 0..255."""
    _check_count(n)
    if not rows:
        raise ValueError("rows must name at least one row of images. Received: {}")
    n = min(n, max(len(images) for images in rows.values())) or n  # (no empty boxes)
    # Room for the row labels beside a few columns (one image's figure cut them off)
    width = max(n * 1.2, 1.2 + 0.1 * max(len(str(label)) for label in rows))
    fig, axes = plt.subplots(len(rows), n, figsize=(width, len(rows) * 1.3), squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        images = _as_hw(images)
        top = 255 if np.issubdtype(images.dtype, np.integer) else 1  # (raw digits: all white)
        for c in range(n):
            ax = axes[r][c]
            if c < len(images):
                ax.imshow(images[c], cmap="gray", vmin=0, vmax=top)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center")
    fig.tight_layout()
    # Images keep their aspect and sit centred in their boxes, so a long label beside few
    # columns still reached past the left edge (one image's "reconstructed" lost its "r",
    # at the width above too): widen until every label is inside, measured as drawn.
    for _ in range(3):
        fig.canvas.draw()
        left = min(ax.yaxis.label.get_window_extent().x0 for ax in axes[:, 0]) / fig.dpi
        if left >= _LABEL_MARGIN_IN:
            break
        fig.set_figwidth(fig.get_figwidth() + 2 * (_LABEL_MARGIN_IN - left))
        fig.tight_layout()
    return _save(fig, path)


_LABEL_MARGIN_IN = 0.05  # (inches between image_rows' row labels and the figure's edge)


@_closes_its_figure
def conv_codes(
    codes: np.ndarray,
    path: str | os.PathLike,
    n: int = 10,
    note: str | None = None,
    labels: np.ndarray | None = None,
) -> Path:
    """Draws (N, h, w, c) conv codes: for each of the first `n` digits, its c channel
    maps of h x w on a grid, all on one gray scale (up to the largest value), so each
    code value is a block of pixels and digits compare. (The tutorial draws its
    (4, 4, 8) codes as 4x32 strips; a denoiser's (7, 7, 32) code drawn that way is a
    7x224 strip that a figure can only resample.) `note` is a second line of the title;
    `labels`, of these digits first (the test split's), name each code's digit above it
    (own images, labelled -1: none)."""
    _check_count(n)
    codes = np.asarray(codes, dtype=np.float32)[:n]
    if codes.ndim != 4:  # ("not enough values to unpack")
        raise ValueError(f"codes must be (N, h, w, c) conv codes. Received shape {codes.shape}")
    h, w, c = codes.shape[1:]
    cols = next(k for k in range(int(np.ceil(np.sqrt(c))), c + 1) if c % k == 0)  # 8 -> 4x2
    rows = c // cols
    low = min(0.0, float(codes.min(initial=0.0)))  # (codes of relu are >= 0)
    top = max(float(codes.max(initial=0.0)), low + 1e-6)
    grids = np.full((len(codes), rows * (h + 1) - 1, cols * (w + 1) - 1), np.nan, np.float32)
    for k in range(c):
        r, q = divmod(k, cols)
        grids[:, r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = codes[..., k]
    # Five digits a row: ten of a denoiser's 7x7x32 codes in one were a 2240x224 strip.
    across = min(5, len(grids))
    down = -(-len(grids) // across)
    width = min(3.2, 1.6 * max(1.0, cols * w / 16))  # (inches a digit; its grid's height)
    height = width * grids.shape[1] / grids.shape[2]
    labels = np.asarray([] if labels is None else labels)
    each = "image" if labels.size and _unlabelled(labels) else "digit"  # (own images: -1)
    title = f"codes ({h}x{w}x{c}): each {each}'s {c} channel maps, gray {low:.3g} to {top:.3g}"
    title_room = 0.7 if note else 0.45
    wide = max(across * width, 0.09 * max(len(title), len(note or "")))  # (a title in full)
    fig, axes = plt.subplots(
        down,
        across,
        figsize=(wide, down * (height * 1.3 + 0.2) + title_room),  # (+ its label)
        squeeze=False,
    )
    cmap = plt.get_cmap("gray").with_extremes(bad="white")  # (the gaps between channels)
    for ax in axes.flat:
        ax.axis("off")
    for ax, grid in zip(axes.flat, grids, strict=False):
        ax.imshow(grid, cmap=cmap, vmin=low, vmax=top, interpolation="nearest")
    # "digit", or "label" where any label passes 9 (all of them: as the t-SNE map says)
    noun = _by_label(labels[labels >= 0])[1]
    for ax, label in zip(axes.flat, labels[: len(grids)], strict=False):
        if label >= 0:  # (own images: -1, no label)
            ax.set_title(f"{noun} {int(label)}", fontsize=9)
    fig.suptitle(title + (f"\n{note}" if note else ""))
    fig.tight_layout()
    return _save(fig, path)


@_closes_its_figure
def learning_curves(
    history: dict[str, list[float]],
    path: str | os.PathLike,
    title: str | None = None,
    loss_label: str = "loss",
    legend: dict[str, str] | None = None,
) -> Path:
    """Each epoch's losses (and denoise's val_psnr, in dB, beside them). `loss_label`
    names the loss (its y axis); `legend` gives a curve's own label, by history key."""
    legend = legend or {}
    keys = [k for k in ("loss", "val_loss") if k in history]
    extra = [k for k in ("val_psnr",) if k in history]
    fig, axes = plt.subplots(
        1, 1 + bool(extra), figsize=(5 * (1 + bool(extra)), 3.5), squeeze=False
    )
    for k in keys:
        label = legend.get(k, k)
        axes[0][0].plot(range(1, len(history[k]) + 1), history[k], marker="o", label=label)
    axes[0][0].set_ylabel(loss_label)
    axes[0][0].legend()
    for k in extra:
        label = legend.get(k, k)
        axes[0][1].plot(range(1, len(history[k]) + 1), history[k], marker="o", label=label)
        axes[0][1].set_ylabel("dB")
        axes[0][1].legend()
    epochs = max(len(history[k]) for k in keys + extra) if keys + extra else 0
    for ax in axes[0]:
        ax.set_xlabel("epoch")
        if epochs <= 10:  # every epoch (MaxNLocator gave a 1-epoch run 0.95, 0.96, ... 1.05)
            ax.set_xticks(range(1, epochs + 1))
        else:  # (no epoch 1.5)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _fit(title: str, width: int = 50) -> str:
    """A map's title in lines that fit its 6-inch figure (a VAE's t-SNE title was cut
    off on the left): each line of `title` wrapped at `width` characters."""
    return "\n".join(textwrap.fill(line, width) for line in title.split("\n"))


# Points coloured by digit: one colour per digit 0-9, also where the labels shown lack some.
_BY_DIGIT = dict(cmap="tab10", vmin=-0.5, vmax=9.5, s=4)
_NO_LABEL = "silver"  # (points of images without a label, -1, where others have one)


def _by_label(labels: np.ndarray) -> tuple[dict, str]:
    """How to colour points by their labels, and what to call them: by digit (one colour
    per digit 0-9), or where labels pass 9 (aelib.train takes any integer labels: EMNIST's
    letters 1-26, say), a colour per label over their range, which tab10 drew as a 9."""
    labels = np.asarray(labels)
    if not labels.size or labels.max() <= 9:
        return _BY_DIGIT, "digit"
    low, high = int(labels.min()), int(labels.max())
    return dict(cmap="turbo", vmin=low - 0.5, vmax=high + 0.5, s=4), "label"


def _unlabelled(labels: np.ndarray) -> bool:
    """Own images (train --images, labels -1): no digits to colour."""
    return bool(np.all(np.asarray(labels) < 0))


def _test_items(n: int, labels: np.ndarray) -> str:
    """ "2,000 test digits", "1 test digit": what the test split holds, MNIST's labelled
    digits, or images: own ones (-1), or of labels past 9 (EMNIST's letters: coloured by
    'label', see _by_label)."""
    labels = np.asarray(labels)
    noun = "image" if _unlabelled(labels) or labels.max() > 9 else "digit"
    return f"{n:,} test {noun}{'' if n == 1 else 's'}"


@_closes_its_figure
def latent_plane(
    z: np.ndarray,
    labels: np.ndarray,
    path: str | os.PathLike,
    title: str | None = None,
    axis_labels: tuple[str, str] = ("z[0]", "z[1]"),
) -> Path:
    """A scatter of 2-D points (a VAE's z_mean, a t-SNE map of codes), coloured by digit;
    `axis_labels` name its x and y."""
    z, labels = np.asarray(z), np.asarray(labels)
    _check_points(z, labels, "z", "(N, 2)")
    title = title or f"VAE latent plane (z_mean of {_test_items(len(z), labels)})"
    fig, ax = plt.subplots(figsize=(6, 5))
    if _unlabelled(labels):
        ax.scatter(z[:, 0], z[:, 1], s=4)
        title += " (unlabelled)"
    else:
        labels = np.asarray(labels)
        none = labels < 0  # (-1: an image without a label; tab10 drew it as a 0)
        if none.any():
            ax.scatter(z[none, 0], z[none, 1], s=4, c=_NO_LABEL, label="no label")
            ax.legend(loc="best", markerscale=3)
        colours, noun = _by_label(labels[~none])
        sc = ax.scatter(z[~none, 0], z[~none, 1], c=labels[~none], **colours)
        ticks = range(10) if noun == "digit" else None  # (Matplotlib's: 0, 2, 4, 6, 8)
        fig.colorbar(sc, ax=ax, label=noun, ticks=ticks)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(_fit(title))
    fig.tight_layout()
    return _save(fig, path)


@_closes_its_figure
def code_values(
    codes: np.ndarray,
    labels: np.ndarray,
    path: str | os.PathLike,
    title: str | None = None,
    value_label: str = "code value",
) -> Path:
    """1-D codes (encoding_dim=1, a VAE's latent_dim=1), which t-SNE has no plane to map
    (its PCA start failed after the whole training): each test digit's code value, in a
    row per digit (spread a little up and down, so that the points are seen); of own
    images (no labels), a histogram of the values."""
    codes, labels = np.asarray(codes, dtype=np.float64), np.asarray(labels)
    _check_points(codes, labels, "codes", "(N,)")  # (a reshape error before)
    values = codes.reshape(len(codes))
    title = title or f"The 1-D codes of {_test_items(len(values), labels)}"
    fig, ax = plt.subplots(figsize=(6, 5))
    if _unlabelled(labels):
        ax.hist(values, bins=min(50, max(1, len(values) // 4)))
        ax.set_ylabel("images")
        title += " (unlabelled)"
    else:
        spread = np.random.default_rng(0).uniform(-0.3, 0.3, len(values))
        none = labels < 0  # (-1: no label, drawn gray in a row of its own, not as a 0)
        ax.scatter(values[none], -1 + spread[none], s=4, c=_NO_LABEL, label="no label")
        colours, noun = _by_label(labels[~none])
        ax.scatter(values[~none], labels[~none] + spread[~none], c=labels[~none], **colours)
        rows = np.unique(np.where(none, -1, labels))
        if len(rows) <= 20:  # (a tick per digit; MaxNLocator named every other one)
            ax.set_yticks(rows, ["no label" if r < 0 else str(r) for r in rows])
        else:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            if none.any():  # (no tick names their row here: a legend does)
                ax.legend(loc="best", markerscale=3)
        ax.set_ylabel(noun)
    ax.set_xlabel(value_label)
    ax.set_title(_fit(title))
    fig.tight_layout()
    return _save(fig, path)


@_closes_its_figure
def digit_manifold(
    decoder, path: str | os.PathLike, n: int = 15, digit_size: int | None = None
) -> Path:
    """Decodes an n x n grid of the 2-D latent plane, spaced by the Gaussian's
    quantiles as in the tutorial: square images of the decoder's output size
    (`digit_size`, if given, must be it)."""
    from scipy.stats import norm

    _check_count(n)
    latent = tuple(decoder.inputs[0].shape[1:]) if getattr(decoder, "inputs", None) else None
    if latent is not None and latent != (2,):  # (Keras's input-spec error)
        raise ValueError(
            f"digit_manifold draws a 2-D latent plane: the decoder must take 2 values. "
            f"Received a decoder of inputs {latent}"
        )
    grid = norm.ppf(np.linspace(0.05, 0.95, n))
    z = np.array([[xi, yi] for yi in grid[::-1] for xi in grid], dtype="float32")
    decoded = _as_hw(_predict(decoder, z))
    height, width = decoded.shape[1:3]
    if digit_size is not None and digit_size != height:
        raise ValueError(f"digit_size={digit_size}, but the decoder gives {height}x{width} images")
    decoded = decoded.reshape(n, n, height, width)
    figure = decoded.transpose(0, 2, 1, 3).reshape(n * height, n * width)
    fig, ax = plt.subplots(figsize=(8, 8))
    ax.imshow(figure, cmap="Greys_r", vmin=0, vmax=1)  # (not stretched: a faint grid shows)
    # Where each image's z is, as on the latent plane (z[1] up): first, middle, last.
    marks = sorted({0, n // 2, n - 1})
    label = [f"{round(v, 2) + 0.0:.2f}" for v in grid]  # (+ 0.0: no "-0.00" at the middle)
    ax.set_xticks([(i + 0.5) * width - 0.5 for i in marks], [label[i] for i in marks])
    ax.set_yticks([(i + 0.5) * height - 0.5 for i in marks], [label[::-1][i] for i in marks])
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    ax.set_title(f"{n}x{n} digit manifold: the decoder at the Gaussian's 5-95% quantiles")
    fig.tight_layout()
    return _save(fig, path)


def tsne_codes(
    codes: np.ndarray,
    labels: np.ndarray,
    path: str | os.PathLike,
    limit: int = 1000,
    seed: int = 0,
    title: str | None = None,
) -> Path:
    """A t-SNE map (scikit-learn) of the codes of up to `limit` test digits (of 1-D codes
    too, from a random start; `code_values` draws those as they are)."""
    from sklearn.manifold import TSNE

    _check_count(limit, "limit")
    codes, labels = np.asarray(codes), np.asarray(labels)
    _check_points(codes, labels, "codes", "")
    codes, labels = codes[:limit].reshape(min(len(codes), limit), -1), labels[:limit]
    # (scikit-learn needs perplexity < the number of codes: a --test-limit of 2 too)
    perplexity = float(max(1, min(30, len(codes) // 4, len(codes) - 1)))
    title = title or (
        f"t-SNE of the {codes.shape[1]}-float codes of {_test_items(len(codes), labels)}"
    )
    # All codes the same (a dead encoder: a sparse one whose codes are all 0), or nearly
    # (a saturated one): the PCA start divides by their spread, zero in float32, and the
    # process died (SIGSEGV), report and all. A random start is fine.
    spread = float(np.ptp(codes.astype(np.float64), axis=0).max())
    if spread == 0:
        title += f": all {len(codes)} codes are the same"
    # (PCA to 2 components of 1-D codes: scikit-learn refuses it)
    init = "pca" if spread > 1e-10 and codes.shape[1] >= 2 else "random"
    tsne = TSNE(n_components=2, perplexity=perplexity, init=init, random_state=seed)
    mapped = tsne.fit_transform(codes)
    return latent_plane(mapped, labels, path, title=title, axis_labels=("t-SNE 1", "t-SNE 2"))


def _loss_name(model: Autoencoder) -> str:
    """What a variant's training loss is, as its learning curves' y axis says."""
    if model.name == "sparse":
        return "loss (BCE + L1 penalty)"
    if model.name == "vae":  # (aelib.models.vae: the KL term weighted 1 / input_dim)
        return f"loss (BCE + KL / {model.config.get('input_dim', 784)})"
    return "loss (BCE)"


def tutorial_figures(
    model: Autoencoder, splits: Splits, history: dict[str, list[float]], out_dir: str | os.PathLike
) -> dict[str, Path]:
    """Every figure the tutorial shows for this variant."""
    out_dir = Path(out_dir)
    name = model.name
    n = 10
    x, y = splits.x_test[:n], splits.y_test[:n]
    out = _predict(model.autoencoder, x)
    epochs = len(history.get("loss", []))
    legend, noisy = {}, "noisy"
    if splits.noise is not None:  # denoise: the noise of each curve, and of the inputs shown
        trained, scored = (f"{v:.3g}" for v in splits.noise)
        legend = {"loss": f"loss (noise {trained})", "val_loss": f"val_loss (noise {scored})"}
        legend["val_psnr"] = f"val_psnr (noise {scored})"
        noisy = f"noisy ({scored})"
    figures = {
        "learning_curves": learning_curves(
            history,
            out_dir / f"{name}_learning_curves.png",
            title=f"{name}: {epochs} epoch{'s' if epochs != 1 else ''}",
            loss_label=_loss_name(model),
            legend=legend,
        )
    }
    if name == "denoise":
        figures["denoised"] = image_rows(
            {noisy: x, "denoised": out, "clean": y}, out_dir / f"{name}_noisy_vs_denoised.png"
        )
    else:
        figures["reconstructions"] = image_rows(
            {"original": y, "reconstructed": out}, out_dir / f"{name}_reconstructions.png"
        )
    limit = min(len(splits.x_test), 2000)
    process.raise_if_stopped()  # (between figures: a stop process.defer_stops held)
    if name in ("conv", "denoise"):
        codes, note = _predict(model.encoder, x), None
        if isinstance(codes, list | tuple):  # denoise(skips=True): the code comes first
            codes, note = codes[0], "the deepest features: skip connections pass others on"
        if codes.ndim == 4:
            figures["codes"] = conv_codes(
                codes, out_dir / f"{name}_codes.png", note=note, labels=splits.labels_test
            )
    if name in ("dense", "sparse", "deep"):
        codes = _predict(model.encoder, splits.x_test[:limit])
        process.raise_if_stopped()  # (before t-SNE: seconds)
        if codes.shape[1] == 1:  # (encoding_dim=1: no t-SNE map, its values as they are)
            figures["codes_1d"] = code_values(
                codes, splits.labels_test[:limit], out_dir / f"{name}_codes_1d.png"
            )
        elif limit >= 2:  # (no map of one point)
            figures["tsne"] = tsne_codes(
                codes, splits.labels_test[:limit], out_dir / f"{name}_codes_tsne.png"
            )
    if name == "vae":
        import keras

        z_mean = keras.Model(model.encoder.input, model.encoder.get_layer("z_mean").output)
        z = _predict(z_mean, splits.x_test[:limit])
        process.raise_if_stopped()
        if z.shape[1] == 2:
            figures["latent_plane"] = latent_plane(
                z, splits.labels_test[:limit], out_dir / f"{name}_latent_plane.png"
            )
            figures["manifold"] = digit_manifold(model.decoder, out_dir / f"{name}_manifold.png")
        elif z.shape[1] == 1:
            figures["latent_1d"] = code_values(
                z,
                splits.labels_test[:limit],
                out_dir / f"{name}_latent_1d.png",
                title=f"The 1-D z_mean of {_test_items(len(z), splits.labels_test[:limit])}\n"
                "(latent plane and manifold: latent_dim=2 only)",
                value_label="z_mean",
            )
        elif limit >= 2:  # the plane and its manifold are the tutorial's 2-D latent space's
            figures["latent_tsne"] = tsne_codes(
                z,
                splits.labels_test[:limit],
                out_dir / f"{name}_latent_tsne.png",
                title=f"t-SNE of the {z.shape[1]}-D z_mean\n(latent plane and manifold: "
                "latent_dim=2 only)",
            )
    return figures


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.suffix:  # (Matplotlib adds ".png" itself: the path returned must say it)
        path = path.with_suffix(".png")
    kinds = fig.canvas.get_supported_filetypes()
    if path.suffix[1:].lower() not in kinds:  # (Matplotlib's words named no path)
        raise ValueError(
            f"Cannot draw {path}: Matplotlib writes no {path.suffix!r} files. Use .png (or "
            f"one of: {', '.join('.' + k for k in sorted(kinds))})."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with process.replaced(path) as tmp:  # (a stop while it saved left half a PNG)
        fig.savefig(tmp, dpi=80, format=path.suffix[1:] or "png")
    plt.close(fig)
    return path
