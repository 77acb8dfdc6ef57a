"""NumPy-only data helpers: MNIST by path, scaling, noise, reshaping, image folders."""

from __future__ import annotations

import math
import numbers
import os
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

MNIST_ENV = "AELIB_MNIST"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm")
_MNIST_KEYS = {"x_train": 3, "y_train": 1, "x_test": 3, "y_test": 1}

Split = tuple[np.ndarray, np.ndarray]


def resolve_mnist_path(path: str | os.PathLike | None = None) -> Path | None:
    """The MNIST file to use: `path`, else `$AELIB_MNIST`, else None (download)."""
    chosen = path if path not in (None, "") else os.environ.get(MNIST_ENV) or None
    return None if chosen is None else Path(chosen).expanduser()


def load_mnist(path: str | os.PathLike | None = None) -> tuple[Split, Split]:
    """Loads MNIST as `((x_train, y_train), (x_test, y_test))`, as the file stores it:
    uint8 0..255 (Keras's), or floats in [0, 1], which `scale` takes as they are.

    Looks at `path`, then the `AELIB_MNIST` environment variable, and only then
    falls back to `keras.datasets.mnist.load_data()` (which needs internet).

    Raises:
        FileNotFoundError: `path` (or `$AELIB_MNIST`) does not exist.
        ValueError: the file is not an `.npz` in Keras's MNIST layout.
        RuntimeError: no path is given and Keras's download fails (e.g. offline).
    """
    resolved = resolve_mnist_path(path)
    if resolved is None:
        import keras

        try:
            return keras.datasets.mnist.load_data()
        except Exception as e:  # offline: say what to do, not only the URL error
            raise RuntimeError(
                f"No MNIST path given (--data PATH or ${MNIST_ENV}) and Keras's download "
                f"failed: {e}. Point --data or ${MNIST_ENV} at a local mnist.npz."
            ) from e
    # (a stale $AELIB_MNIST is not a path the user typed this time: say where it came from)
    given = f"{resolved}" if path not in (None, "") else f"{resolved} (from ${MNIST_ENV})"
    if resolved.is_dir():
        raise ValueError(
            f"{given} is a folder; expected Keras's mnist.npz file (keys x_train, "
            "y_train, x_test, y_test)."
        )
    if resolved.exists() and not resolved.is_file():  # (/dev/null: "not found" misled)
        raise ValueError(
            f"{given} is not a regular file; expected Keras's mnist.npz (keys x_train, "
            "y_train, x_test, y_test)."
        )
    if not resolved.is_file():
        raise FileNotFoundError(
            f"MNIST file not found: {given}. Pass --data PATH or set ${MNIST_ENV} to "
            "Keras's mnist.npz (keys x_train, y_train, x_test, y_test)."
        )
    try:  # (is_zipfile takes any OSError for "not a zip": an unreadable file was "cut short")
        with open(resolved, "rb"):
            pass
    except OSError as e:
        raise ValueError(
            f"{given} cannot be read ({e.strerror or e}); expected Keras's mnist.npz (keys "
            "x_train, y_train, x_test, y_test)."
        ) from e
    if not zipfile.is_zipfile(resolved):  # (np.load would read a .npy, or try a pickle)
        raise ValueError(
            f"{given} is not an .npz (zip) archive (or it is cut short); expected "
            "Keras's mnist.npz (keys x_train, y_train, x_test, y_test)."
        )
    try:
        with np.load(resolved, allow_pickle=False) as f:
            arrays = {key: f[key] for key in _MNIST_KEYS if key in f.files}
            found = list(f.files)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as e:
        raise ValueError(f"{given} is not a readable .npz file: {e}") from e
    missing = [key for key in _MNIST_KEYS if key not in arrays]
    if missing:
        raise ValueError(
            f"{given} is not an MNIST .npz: missing keys {missing}. Found keys: {found}. "
            f"Expected {list(_MNIST_KEYS)}."
        )
    for key, ndim in _MNIST_KEYS.items():
        if not isinstance(arrays[key], np.ndarray):  # (a member that is no .npy: its bytes)
            raise ValueError(
                f"{given}: {key} is not a NumPy array (its {key}.npy member has no .npy "
                "header); expected Keras's mnist.npz."
            )
        if arrays[key].ndim != ndim:
            raise ValueError(
                f"{given}: {key} must have {ndim} dimensions. Received shape {arrays[key].shape}."
            )
    for split in ("train", "test"):
        if arrays[f"x_{split}"].shape[1:] != (28, 28):  # what every variant's input is
            raise ValueError(
                f"{given}: x_{split} must hold 28x28 images, as MNIST does. Received "
                f"shape {arrays[f'x_{split}'].shape}."
            )
        if len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
            raise ValueError(
                f"{given}: x_{split} and y_{split} differ in length "
                f"({len(arrays[f'x_{split}'])} != {len(arrays[f'y_{split}'])})."
            )
        _check_pixels(arrays[f"x_{split}"], f"{given}: x_{split}")
        _check_labels(arrays[f"y_{split}"], f"{given}: the labels y_{split}")
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


def _check_pixels(x: np.ndarray, name: str) -> None:
    """Digits `scale` takes: some, of 8-bit gray (0..255) or floats in [0, 1] (a file of
    floats 0..255 failed in every trial, after Ray had started)."""
    if not len(x):
        raise ValueError(f"{name} holds no images.")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{name} holds {x.dtype} values; expected 8-bit gray digits.")
    low, high = x.min(), x.max()
    top = 255 if np.issubdtype(x.dtype, np.integer) else 1.0
    if not (low >= 0 and high <= top):  # (NaN fails too)
        raise ValueError(
            f"{name} holds {x.dtype} values in [{low}, {high}]; expected 8-bit gray digits "
            "(integers 0..255) or floats in [0, 1]."
        )


def _check_labels(y: np.ndarray, name: str) -> None:
    """Labels the figures colour digits by: one integer per image, -1 where an image has
    none (labels of str, of floats or one-hot passed every check and broke the figures
    after the whole training). Bool is no label."""
    y = np.asarray(y)
    if y.ndim != 1 or y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
        found = "str" if y.dtype.kind in "US" else str(y.dtype)
        one_hot = ": of one-hot labels, pass their argmax" if y.ndim == 2 else ""
        raise ValueError(
            f"{name} are {found} values of shape {y.shape}; expected a 1-D array of "
            f"integer labels, one per image (-1 where an image has none){one_hot}."
        )


def check_arrays(arrays, name: str = "data") -> tuple[Split, Split]:
    """Arrays as `load_mnist` returns them, ((x_train, y_train), (x_test, y_test)), of
    pixels `scale` takes, with an integer label per image (or None): refused before any
    training (out of range values failed only in the metrics after it, or never; labels
    that are no integers, in the figures after it). Returns them as numpy arrays (lists
    passed in failed after the checks)."""
    try:
        (x_train, y_train), (x_test, y_test) = arrays
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be ((x_train, y_train), (x_test, y_test)), as aelib.data.load_mnist "
            "returns it (labels may be None, or -1 where there are none)"
        ) from None
    checked = []
    for x, y, part in ((x_train, y_train, "training"), (x_test, y_test, "test")):
        x = np.asarray(x)
        if x.ndim == 4 and x.shape[-1] != 1:  # (dense said "28x28 images are not square";
            shape = _shape(x.shape[1:])  # seq2seq failed in NumPy's reshape, naming no input)
            if x.shape[1] == 1:
                raise ValueError(
                    f"{name}'s {part} images are {shape}: channels first. aelib.train reads "
                    "(N, H, W) or (N, H, W, 1): move the channel axis last "
                    "(np.moveaxis(x, 1, -1)) or drop it."
                )
            raise ValueError(
                f"{name}'s {part} images are {shape}: {x.shape[-1]} channels. aelib.train "
                "reads grayscale images, (N, H, W) or (N, H, W, 1): convert them to gray first."
            )
        if x.dtype != bool:  # (bool images scale to 0 and 1)
            _check_pixels(x, f"{name}'s {part} images")
        if y is not None:
            y = np.asarray(y)
            if y.ndim and len(y) != len(x):
                raise ValueError(f"{name} has {len(y)} {part} labels for {len(x)} {part} images.")
            _check_labels(y, f"{name}'s {part} labels")
        checked.append((x, y))
    train_shape, test_shape = checked[0][0].shape[1:], checked[1][0].shape[1:]
    # After each split's own checks, whose hints (channels first, colour) say more.
    # (found by the test split, after all the training; 784 values and 28x28 are one size,
    # for the flat variants: build_checked refuses it for the others. Two image shapes of
    # one size are not one shape: 14x56 test images of a dense model trained on 28x28
    # were scored as 28x28 ones, their SSIM of scrambled pixels.)
    plain_train, plain_test = _gray_shape(train_shape), _gray_shape(test_shape)
    if math.prod(train_shape) != math.prod(test_shape) or (
        len(plain_train) > 1 and len(plain_test) > 1 and plain_train != plain_test
    ):
        raise ValueError(
            f"{name}'s training images are {_shape(train_shape)} and its test images "
            f"{_shape(test_shape)}: a model is trained and tested on images of one shape."
        )
    return checked[0], checked[1]


def _gray_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """An image shape without its one gray channel: (28, 28, 1) -> (28, 28)."""
    return tuple(shape[:-1]) if len(shape) == 3 and shape[-1] == 1 else tuple(shape)


def _shape(shape: tuple[int, ...]) -> str:
    if len(shape) == 1:
        return f"{shape[0]}-value vectors"
    return "x".join(map(str, shape)) or "single values"


def scale(x: np.ndarray) -> np.ndarray:
    """uint8 0..255 -> float32 0..1 (float input is checked, not rescaled; so are
    integers of wider types, which must hold 8-bit values)."""
    x = np.asarray(x)  # (a list: "'list' object has no attribute 'dtype'")
    if np.issubdtype(x.dtype, np.integer):
        # (16-bit values came back up to 257, negative ones below 0, without a word)
        if x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError(
                f"Integer images must hold 8-bit values, 0 to 255. Received {x.dtype} values "
                f"from {x.min()} to {x.max()}: scale them to [0, 1] floats first."
            )
        return x.astype("float32") / 255.0
    x = x.astype("float32", copy=False)
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(
            f"Float images must already lie in [0, 1]. Received range [{x.min()}, {x.max()}]."
        )
    return x


def held_out(n: int, val_split: float) -> int:
    """How many of `n` training images are held out for validation: the last `val_split`
    of them, at least one where `val_split` > 0 (a few would round to none, and the test
    split would then be validated on without a word)."""
    n_val = int(round(n * val_split))
    return max(1, n_val) if val_split > 0 else n_val


def describe_scaling(dtype) -> str:
    """What `scale` does to images of `dtype`, in the words a run's record keeps."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        return f"{dtype} / 255 -> [0, 1]"
    return f"{dtype} in [0, 1], as they are (not rescaled)"


def flatten(x: np.ndarray) -> np.ndarray:
    """(N, H, W[, 1]) -> (N, H * W)."""
    x = np.asarray(x)
    return x.reshape((len(x), -1))


def _check_gray(x: np.ndarray, name: str) -> None:
    """(N, H, W) or (N, H, W, 1): flat images passed through as_images unchanged, and
    failed later in the model, naming no input."""
    if x.ndim not in (3, 4) or x.ndim == 4 and x.shape[-1] != 1:
        raise ValueError(
            f"{name} expects (N, H, W) or (N, H, W, 1) images. Received shape {x.shape}"
            + (": flat images? Reshape them, e.g. x.reshape(-1, 28, 28)" if x.ndim == 2 else "")
        )


def as_images(x: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, H, W, 1), channels-last."""
    x = np.asarray(x)
    _check_gray(x, "as_images")
    return x.reshape((*x.shape[:3], 1)) if x.ndim == 3 else x


def unflatten(x: np.ndarray) -> np.ndarray:
    """(N, side * side) -> (N, side, side): flat images back as the square ones they
    were (ValueError if their length is no square)."""
    x = np.asarray(x)
    side = math.isqrt(x.shape[1])
    if side * side != x.shape[1]:
        raise ValueError(f"Flat images must be square. Received shape {x.shape}")
    return x.reshape(len(x), side, side)


def as_sequences(x: np.ndarray) -> np.ndarray:
    """(N, H, W[, 1]) -> (N, H, W): each image as H time steps of W features."""
    x = np.asarray(x)
    _check_gray(x, "as_sequences")
    return x.reshape(x.shape[:3])


def check_noise_factor(noise_factor: float) -> None:
    """Raises ValueError unless `noise_factor` is in [0, 1] (NaN is not)."""
    if not isinstance(noise_factor, numbers.Real) or isinstance(noise_factor, bool):
        raise ValueError(  # (a string: TypeError "'<=' not supported", naming nothing)
            f"noise_factor must be a number in [0, 1]. Received: noise_factor={noise_factor!r}"
        )
    if not 0.0 <= noise_factor <= 1.0:
        raise ValueError(f"noise_factor must be in [0, 1]. Received: noise_factor={noise_factor}")


def add_noise(x: np.ndarray, noise_factor: float = 0.5, seed: int | None = 0) -> np.ndarray:
    """The tutorial's synthetic noise: x + noise_factor * N(0, 1), clipped to [0, 1].

    Args:
        x: images scaled to [0, 1].
        noise_factor: standard deviation of the Gaussian noise, in [0, 1].
        seed: seed of the noise, so noisy sets are reproducible.
    """
    check_noise_factor(noise_factor)
    if seed is not None and (
        not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0
    ):  # (NumPy's "expected non-negative integer" named no argument)
        raise ValueError(f"seed must be None or an integer >= 0. Received: seed={seed!r}")
    x = np.asarray(x)
    # Raw uint8 digits were taken as they are: the clip to [0, 1] then left a fifth of
    # the pixels white and the rest noise, without a word.
    if x.dtype.kind != "f":
        raise ValueError(
            f"add_noise expects float images scaled to [0, 1]. Received {x.dtype}: scale "
            "8-bit images first (aelib.data.scale), convert others to float"
        )
    low, high = (float(np.min(x)), float(np.max(x))) if x.size else (0.0, 0.0)
    if not (low >= 0 and high <= 1):  # (NaN fails both)
        raise ValueError(
            f"add_noise expects images scaled to [0, 1]. Received {x.dtype} values from "
            f"{low:g} to {high:g}: scale them first (aelib.data.scale)"
        )
    rng = np.random.default_rng(seed)
    noisy = x + noise_factor * rng.standard_normal(x.shape, dtype="float32")
    return np.clip(noisy, 0.0, 1.0).astype("float32")


def prepare(x: np.ndarray, input_kind: str) -> np.ndarray:
    """Scales uint8 images (N, H, W) and shapes them for a variant's input kind."""
    x = scale(x)
    if input_kind == "flat":
        return flatten(x)
    if input_kind == "image":
        return as_images(x)
    if input_kind == "sequence":
        return as_sequences(x)
    raise ValueError(f"input_kind must be flat, image or sequence. Received: {input_kind!r}")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder`, recursively, sorted; not hidden ones (a name or a
    folder starting with ".": macOS's `._x.png` side files, `.git/`), as a shell's `*`.
    Entries of an image's name that are no regular file (a broken link, a pipe, a link
    to a device) are listed too: read_gray refuses them, naming them (they were left
    out without a word)."""
    root = Path(folder).expanduser()
    if root.is_file():
        raise ValueError(f"{root} is a file; expected a folder of images.")
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder not found: {root}")
    return sorted(
        p
        for p in root.rglob("*")
        if not p.is_dir()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """Reads one image file as a uint8 (H, W) grayscale array, turned as its EXIF
    orientation says (as viewers show it): 16-bit and 32-bit
    integer images scaled from 0..65535 (kept as they are where no value passes 255:
    8-bit values saved in a wider file), float images from [0, 1] (Pillow's own
    conversion would clip them to a few gray levels).

    Raises:
        ValueError: the file is missing, corrupt, truncated, not an image, too big for
            Pillow, or of float pixels outside [0, 1].
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not os.path.isfile(path):  # (a pipe: Pillow's open waited for a writer forever)
        if os.path.exists(path):
            what = "not a regular file"
        else:
            what = "a broken link" if os.path.islink(path) else "not a file"
        raise ValueError(f"Cannot read image {path}: {what}")
    try:
        with Image.open(path) as opened, warnings.catch_warnings():
            # (Pillow's "Palette images with Transparency expressed in bytes should be
            # converted to RGBA images", naming no file: the conversion below does it)
            warnings.filterwarnings("ignore", "Palette images with Transparency")
            opened.load()
            # Upright, as image viewers show it: a phone's photo is stored sideways with
            # an EXIF orientation tag (its patches and figures came out turned).
            img = ImageOps.exif_transpose(opened)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                wide = np.asarray(img, dtype=np.int64)
                low, high = (int(wide.min()), int(wide.max())) if wide.size else (0, 0)
                if low < 0 or high > 65535:
                    raise ValueError(f"integer pixels from {low} to {high}; expected 0 to 65535")
                if high <= 255:  # 8-bit values in a wider file (a uint16 array saved as is)
                    return wide.astype(np.uint8)
                return np.rint(wide / 257).astype(np.uint8)
            if img.mode == "F":
                real = np.asarray(img, dtype=np.float64)
                if real.size and (real.min() < 0 or real.max() > 1):
                    raise ValueError(
                        f"float pixels from {real.min():g} to {real.max():g}; expected [0, 1]"
                    )
                return np.rint(real * 255).astype(np.uint8)
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"Cannot read image {path}: {e}") from e
    except Image.DecompressionBombError as e:
        raise ValueError(f"Cannot read image {path}: {e}") from e


class AelibWarning(UserWarning):
    """aelib's own warnings (the unreadable images load_image_folder left out): the
    command line shows them as "aelib: warning:" lines."""


class UnreadableImages(ValueError):
    """An image folder holds files that cannot be read as images (load_image_folder's
    on_error="raise"): the message names them."""


def load_image_folder(
    folder: str | os.PathLike,
    size: tuple[int, int] = (28, 28),
    mode: str = "resize",
    invert: bool = False,
    on_error: str = "raise",
    return_counts: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Loads a folder of the user's own images as uint8 (N, H, W) grayscale.

    An autoencoder only works on data like its training data, so the images
    are brought to the model's input size: `mode="resize"` resizes each whole
    image, `mode="patch"` cuts it into non-overlapping `size` patches (an
    image smaller than a patch gives none).

    Args:
        folder: a folder, searched recursively for image files.
        size: (height, width) of the model's input.
        mode: "resize" or "patch".
        invert: turn dark-on-light images into MNIST's light-on-dark.
        on_error: "raise" if any file is unreadable (naming up to 100 of them, so
            that one run finds the broken files), or "skip" them with a warning naming them.
        return_counts: also return how many of the arrays each image gave, in order
            (1 each with mode="resize"), to split them by whole images.

    Raises:
        UnreadableImages: (on_error="raise") an unreadable file.
        ValueError: a bad argument, or no usable image.
    """
    from PIL import Image

    if mode not in ("resize", "patch"):
        raise ValueError(f"mode must be 'resize' or 'patch'. Received: mode={mode!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip'. Received: on_error={on_error!r}")
    if not (
        np.ndim(size) == 1
        and len(size) == 2
        and all(isinstance(s, int | np.integer) and s >= 1 for s in size)
    ):
        raise ValueError(f"size must be (height, width), each >= 1. Received: size={size!r}")
    height, width = size
    out, unreadable, small = [], [], []
    for path in list_images(folder):
        try:
            img = read_gray(path)
        except ValueError as e:
            unreadable.append(str(e))
            continue
        if mode == "resize":
            resized = Image.fromarray(img).resize((width, height), Image.Resampling.LANCZOS)
            out.append(np.asarray(resized)[None])
        else:
            rows, cols = img.shape[0] // height, img.shape[1] // width
            if rows and cols:
                tiles = img[: rows * height, : cols * width].reshape(rows, height, cols, width)
                out.append(tiles.transpose(0, 2, 1, 3).reshape(-1, height, width))
            else:
                small.append(f"{path} ({img.shape[1]}x{img.shape[0]})")
    if unreadable:
        shown = "\n  ".join(unreadable[:100])
        more = f"\n  ... and {len(unreadable) - 100} more" if len(unreadable) > 100 else ""
        if on_error == "skip":  # (left out without a word before)
            n = len(unreadable)
            what = "1 unreadable image" if n == 1 else f"{n} unreadable images"
            warnings.warn(f"{what} in {folder} left out:\n  {shown}{more}", AelibWarning, 2)
        elif len(unreadable) == 1:
            raise UnreadableImages(unreadable[0])
        else:
            raise UnreadableImages(
                f"{len(unreadable)} unreadable images in {folder}:\n  {shown}{more}"
            )
    if small and out:  # (left out without a word before)
        n = len(small)
        what = "1 image" if n == 1 else f"{n} images"
        give = "gives" if n == 1 else "give"
        warnings.warn(
            f"{what} in {folder} smaller than a {height}x{width} patch {give} no patch: left "
            f"out (e.g. {small[0]}, width x height; image mode 'resize' takes each whole)",
            AelibWarning,
            2,
        )
    if not out:
        what = "readable images" if mode == "resize" else f"images of at least {height}x{width}"
        raise ValueError(
            f"No {what} in {folder} (looked for {', '.join(IMAGE_SUFFIXES)}, hidden files "
            "left out)."
        )
    images = np.concatenate(out).astype(np.uint8)
    images = 255 - images if invert else images
    return (images, np.array([len(a) for a in out])) if return_counts else images
