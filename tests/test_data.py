"""aelib.data: MNIST by path, scaling, noise, shapes, image folders, clear errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aelib import data as data_lib
from helpers import MNIST


def test_load_mnist_by_path_and_env(monkeypatch):
    (x_train, y_train), (x_test, y_test) = data_lib.load_mnist(MNIST)
    assert x_train.shape == (60000, 28, 28) and x_train.dtype == np.uint8
    assert y_train.shape == (60000,) and x_test.shape == (10000, 28, 28)
    assert y_test.shape == (10000,)
    monkeypatch.setenv("AELIB_MNIST", str(MNIST))
    (x_env, _), _ = data_lib.load_mnist()
    assert np.array_equal(x_env[:5], x_train[:5])


def test_missing_file_names_the_path_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"nope\.npz\. Pass --data PATH or set \$AELI"):
        data_lib.load_mnist(tmp_path / "nope.npz")
    monkeypatch.setenv("AELIB_MNIST", str(tmp_path / "stale.npz"))  # not typed this time
    with pytest.raises(FileNotFoundError, match=r"stale\.npz \(from \$AELIB_MNIST\)\. Pass"):
        data_lib.load_mnist()


def test_corrupt_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "mnist.npz"
    bad.write_bytes(b"PK\x03\x04 truncated garbage")
    with pytest.raises(ValueError, match=r"not an \.npz \(zip\) archive \(or it is cut short\)"):
        data_lib.load_mnist(bad)


def test_a_damaged_member_is_a_clear_error(tmp_path):
    """A zip whose directory reads but whose compressed data is damaged (zlib's error,
    not the zip module's) names the file too."""
    arrays = {"x_train": np.arange(784 * 50, dtype=np.uint8).reshape(50, 28, 28)}
    np.savez_compressed(tmp_path / "ok.npz", **arrays)
    data = bytearray((tmp_path / "ok.npz").read_bytes())
    data[200:600] = bytes(400)  # inside x_train's deflate stream
    bad = tmp_path / "mnist.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"mnist\.npz is not a readable \.npz file"):
        data_lib.load_mnist(bad)


def test_wrong_keys_and_shapes_are_clear_errors(tmp_path, monkeypatch):
    wrong_keys = tmp_path / "keys.npz"
    np.savez(wrong_keys, images=np.zeros((2, 28, 28)))
    with pytest.raises(ValueError, match=r"missing keys \['x_train'.*Found keys: \['images'\]"):
        data_lib.load_mnist(wrong_keys)
    wrong_shape = tmp_path / "shape.npz"
    z = np.zeros((4, 28, 28), np.uint8)
    np.savez(
        wrong_shape, x_train=z.reshape(4, -1), y_train=np.zeros(4), x_test=z, y_test=np.zeros(4)
    )
    with pytest.raises(ValueError, match=r"x_train must have 3 dimensions.*\(4, 784\)"):
        data_lib.load_mnist(wrong_shape)
    # Pixels `scale` would refuse in every trial, and no test digits at all.
    y = np.zeros(4, np.uint8)
    for name, x_test, said in (
        ("floats.npz", np.full((4, 28, 28), 255.0), r"x_test holds float64 values in \[255"),
        ("wide.npz", np.full((4, 28, 28), 300, np.uint16), r"uint16 values in \[300, 300\]"),
        ("empty.npz", z[:0], "x_test holds no images"),
    ):
        np.savez(tmp_path / name, x_train=z, y_train=y, x_test=x_test, y_test=y[: len(x_test)])
        with pytest.raises(ValueError, match=said):
            data_lib.load_mnist(tmp_path / name)
    # Members that are no .npy files: NumPy gives their bytes (an AttributeError
    # traceback followed); and a stale $AELIB_MNIST is named as such.
    import zipfile

    with zipfile.ZipFile(tmp_path / "raw.npz", "w") as f:
        for key in ("x_train", "y_train", "x_test", "y_test"):
            f.writestr(f"{key}.npy", b"not an array")
    with pytest.raises(ValueError, match=r"raw\.npz: x_train is not a NumPy array"):
        data_lib.load_mnist(tmp_path / "raw.npz")
    monkeypatch.setenv("AELIB_MNIST", str(tmp_path / "keys.npz"))
    with pytest.raises(ValueError, match=r"keys\.npz \(from \$AELIB_MNIST\) is not an MNIST"):
        data_lib.load_mnist()


def test_arrays_of_two_image_shapes_are_refused():
    """Training images of one shape and test images of another failed after the whole
    training, in the test set's evaluation."""
    x = np.zeros((4, 28, 28), np.uint8)
    data_lib.check_arrays(((x, None), (x, None)))
    data_lib.check_arrays(((x.reshape(4, 784), None), (x, None)))  # (one size: flat models)
    for test, said in (
        (x[:, :20, :20], "28x28 and its test images 20x20"),
        (x[:, 0], "28x28 and its test images 28-value vectors"),
        # (one size, not one shape: a dense model scored them as 28x28, SSIM and all)
        (x.reshape(4, 14, 56), "28x28 and its test images 14x56"),
        (x.reshape(4, 14, 56, 1), "28x28 and its test images 14x56x1"),
    ):
        with pytest.raises(ValueError, match=f"training images are {said}"):
            data_lib.check_arrays(((x, None), (test, None)))


def test_colour_arrays_are_refused_naming_their_channels():
    """RGB arrays passed to aelib.train: dense said their 28x28 images were not square,
    seq2seq failed in NumPy's reshape naming no input, conv and denoise suggested other
    sizes. (N, H, W, 1) is gray, and taken."""
    gray = np.zeros((4, 28, 28, 1), np.uint8)
    data_lib.check_arrays(((gray, None), (gray, None)))
    rgb = np.zeros((4, 28, 28, 3), np.uint8)
    with pytest.raises(ValueError, match="data's training images are 28x28x3: 3 channels"):
        data_lib.check_arrays(((rgb, None), (rgb, None)))
    first = np.zeros((4, 1, 28, 28), np.uint8)  # (gray, channels first: not "28 channels")
    with pytest.raises(ValueError, match="images are 1x28x28: channels first. .* move the"):
        data_lib.check_arrays(((first, None), (first, None)))
    # ... also where only the test images are (they were "of another shape", no hint)
    with pytest.raises(ValueError, match="test images are 1x28x28: channels first. .* move the"):
        data_lib.check_arrays(((gray, None), (first, None)))


def test_labels_that_are_no_integers_are_refused(tmp_path):
    """Labels of str (an npz saved with y.astype(str)) or one-hot passed every check and
    broke the figures after the whole training: a UFuncTypeError traceback, and
    Matplotlib's "'c' argument has 20000 elements"."""
    x = np.zeros((4, 28, 28), np.uint8)
    for fine in (np.arange(4, dtype=np.uint8), np.arange(4, dtype=np.int16), np.full(4, -1)):
        data_lib.check_arrays(((x, fine), (x, fine)))
    for y, said in (
        (np.eye(10)[:4], "training labels are float64 values of shape (4, 10); expected a 1-D"),
        (np.arange(4).astype(str), "training labels are str values of shape (4,)"),
        (np.arange(4) % 2 == 0, "training labels are bool values of shape (4,)"),
        (np.arange(4.0), "training labels are float64 values of shape (4,)"),
    ):
        with pytest.raises(ValueError, match=re.escape(f"data's {said}")):
            data_lib.check_arrays(((x, y), (x, None)))
    with pytest.raises(ValueError, match="of one-hot labels, pass their argmax"):
        data_lib.check_arrays(((x, None), (x, np.eye(10)[:4])))
    labels = np.arange(4).astype(str)
    np.savez(tmp_path / "str.npz", x_train=x, y_train=labels, x_test=x, y_test=labels)
    with pytest.raises(ValueError, match=r"str\.npz: the labels y_train are str values of sh"):
        data_lib.load_mnist(tmp_path / "str.npz")


def test_scale_and_shapes():
    x = np.array([[[0, 255], [51, 102]]], np.uint8)
    scaled = data_lib.scale(x)
    assert scaled.dtype == np.float32 and scaled.max() == 1.0 and scaled[0, 1, 0] == 0.2
    assert data_lib.prepare(x, "flat").shape == (1, 4)
    assert data_lib.prepare(x, "image").shape == (1, 2, 2, 1)
    assert data_lib.prepare(x, "sequence").shape == (1, 2, 2)
    with pytest.raises(ValueError, match=r"must already lie in \[0, 1\]"):
        data_lib.scale(np.full((1, 2), 3.0))
    assert data_lib.scale(np.array([[0, 255]], np.int64)).max() == 1.0  # (8-bit values)
    for wide in (np.array([[0, 65535]], np.uint16), np.array([[-1, 255]], np.int16)):
        with pytest.raises(ValueError, match=r"must hold 8-bit values, 0 to 255. Received"):
            data_lib.scale(wide)  # (came back up to 257, or below 0)
    with pytest.raises(ValueError, match="input_kind"):
        data_lib.prepare(x, "video")


def test_add_noise_is_seeded_clipped_and_checked():
    x = np.full((100, 28, 28), 0.5, np.float32)
    a = data_lib.add_noise(x, 0.5, seed=3)
    assert np.array_equal(a, data_lib.add_noise(x, 0.5, seed=3))
    assert not np.array_equal(a, data_lib.add_noise(x, 0.5, seed=4))
    assert a.min() == 0.0 and a.max() == 1.0 and a.dtype == np.float32
    assert abs(float(np.std(data_lib.add_noise(x, 0.1, seed=0) - x)) - 0.1) < 0.005
    with pytest.raises(ValueError, match=r"noise_factor must be in \[0, 1\]. Received: noise"):
        data_lib.add_noise(x, 1.5)
    # raw digits (uint8, or their floats 0-255) are refused, not clipped to white
    raw = np.full((2, 28, 28), 200, np.uint8)
    with pytest.raises(ValueError, match=r"float images scaled to \[0, 1\]. Received uint8"):
        data_lib.add_noise(raw)
    with pytest.raises(ValueError, match="float32 values from 200 to 200: scale them first"):
        data_lib.add_noise(raw.astype(np.float32))
    with pytest.raises(ValueError, match="float64 values from nan to nan"):
        data_lib.add_noise(np.full((1, 2, 2), np.nan))
    assert data_lib.add_noise(data_lib.scale(raw)).shape == raw.shape
    # a noise factor or seed of the wrong kind: TypeError or NumPy's words, naming neither
    with pytest.raises(
        ValueError, match=r"noise_factor must be a number in \[0, 1\]. Received: noise_factor='0.5'"
    ):
        data_lib.add_noise(x, "0.5")
    with pytest.raises(
        ValueError, match=r"seed must be None or an integer >= 0. Received: seed=-1"
    ):
        data_lib.add_noise(x, 0.5, seed=-1)
    assert data_lib.add_noise(x, np.float32(0.5), seed=np.int64(3)).shape == x.shape


def test_images_and_sequences_take_gray_images_only():
    """Flat images went through as_images and as_sequences unchanged, and failed later
    in a model, naming no input."""
    x = np.zeros((2, 28, 28), np.float32)
    assert data_lib.as_images(x).shape == data_lib.as_images(x[..., None]).shape == (2, 28, 28, 1)
    assert data_lib.as_sequences(x[..., None]).shape == (2, 28, 28)
    for convert in (data_lib.as_images, data_lib.as_sequences):
        with pytest.raises(
            ValueError,
            match=r"\(N, H, W\) or \(N, H, W, 1\) images. Received shape \(2, 784\): flat",
        ):
            convert(x.reshape(2, 784))
        with pytest.raises(ValueError, match=r"Received shape \(2, 28, 28, 3\)$"):
            convert(np.zeros((2, 28, 28, 3), np.float32))


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_resize_patch_invert_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    _write(tmp_path / "a.png", rng.integers(0, 255, (56, 84), dtype=np.uint8))
    _write(tmp_path / "sub" / "b.jpg", rng.integers(0, 255, (30, 30), dtype=np.uint8))
    rgb = rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)
    _write(tmp_path / "sub" / "c.png", rgb)
    (tmp_path / "notes.txt").write_text("not an image")

    resized = data_lib.load_image_folder(tmp_path, size=(28, 28))
    assert resized.shape == (3, 28, 28) and resized.dtype == np.uint8
    patches = data_lib.load_image_folder(tmp_path, size=(28, 28), mode="patch")
    assert patches.shape == (2 * 3 + 1 + 1, 28, 28)
    a = np.asarray(Image.open(tmp_path / "a.png"))
    assert np.array_equal(patches[1], a[:28, 28:56])  # row-major tiles
    inverted = data_lib.load_image_folder(tmp_path, size=(28, 28), invert=True)
    assert np.array_equal(inverted, 255 - resized)

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(data_lib.UnreadableImages, match=r"Cannot read image .*broken\.png"):
        data_lib.load_image_folder(tmp_path)
    # skipped, and named in a warning (they were left out without a word)
    with pytest.warns(UserWarning, match=r"1 unreadable image in .* left out:\n  Cannot read"):
        assert len(data_lib.load_image_folder(tmp_path, on_error="skip")) == 3
    (tmp_path / "sub" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(ValueError, match=r"2 unreadable images in .*\n  Cannot read image .*"):
        data_lib.load_image_folder(tmp_path)  # every one named, not the first alone
    with pytest.warns(UserWarning, match=r"2 unreadable images in .* left out:\n  Cannot read"):
        assert len(data_lib.load_image_folder(tmp_path, on_error="skip")) == 3
    (tmp_path / "sub" / "cut.png").unlink()
    with pytest.raises(FileNotFoundError, match="Image folder not found"):
        data_lib.load_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="No images of at least 64x64"):
        data_lib.load_image_folder(tmp_path / "sub", size=(64, 64), mode="patch")
    with pytest.raises(ValueError, match="mode must be"):
        data_lib.load_image_folder(tmp_path, mode="crop")


def test_files_that_are_not_mnist_npz_say_what_they_are(tmp_path):
    """A .npy array or a text file named .npz is not 'pickled data' (NumPy's guess); a
    folder is not 'not found'; an npz of 14x14 images is not MNIST's layout."""
    np.save(tmp_path / "arr.npy", np.zeros(3))
    (tmp_path / "text.npz").write_text("hello")
    for name in ("arr.npy", "text.npz"):
        with pytest.raises(ValueError, match=rf"{name} is not an \.npz \(zip\) archive"):
            data_lib.load_mnist(tmp_path / name)
    with pytest.raises(ValueError, match="/dev/null is not a regular file; expected Keras's"):
        data_lib.load_mnist("/dev/null")  # (it exists: "not found" misled)
    with pytest.raises(ValueError, match="is a folder; expected Keras's mnist.npz"):
        data_lib.load_mnist(tmp_path)
    small = np.zeros((5, 14, 14), np.uint8)
    np.savez(
        tmp_path / "small.npz", x_train=small, y_train=np.zeros(5), x_test=small, y_test=[0] * 5
    )
    with pytest.raises(ValueError, match=r"x_train must hold 28x28 images.*\(5, 14, 14\)"):
        data_lib.load_mnist(tmp_path / "small.npz")


def _unreadable(path: Path) -> bool:
    try:
        path.open("rb").close()
    except PermissionError:
        return True
    return False


def test_an_npz_that_cannot_be_read_says_so(tmp_path):
    """A file the user may not read was "not an .npz (zip) archive (or it is cut short)":
    zipfile.is_zipfile takes its PermissionError for "not a zip"."""
    path = tmp_path / "mnist.npz"
    np.savez(path, x=np.zeros(3))
    path.chmod(0)
    if not _unreadable(path):  # (root reads it anyway: a file that even root may not read)
        path = Path("/proc/sys/vm/compact_memory")
        if not (path.is_file() and _unreadable(path)):
            pytest.skip("no file here that this user may not read")
    with pytest.raises(ValueError, match=rf"{path} cannot be read \(Permission denied\)"):
        data_lib.load_mnist(path)


def test_image_folders_keep_16_bit_and_float_gray_levels_and_skip_hidden_files(tmp_path):
    """Pillow's convert("L") clips 16-bit and float images (a 16-bit digit became a
    black-and-white mask); they are scaled instead, and hidden files (macOS's ._x.png)
    are not images."""
    digit = np.load(MNIST)["x_test"][0]
    Image.fromarray(digit.astype(np.uint16) * 257).save(tmp_path / "d16.png")
    Image.fromarray(digit.astype(np.float32) / 255).save(tmp_path / "f.tif")
    Image.fromarray(digit).save(tmp_path / "d8.png")
    (tmp_path / "._d8.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.png").write_bytes(b"")
    assert [p.name for p in data_lib.list_images(tmp_path)] == ["d16.png", "d8.png", "f.tif"]
    for name in ("d16.png", "f.tif"):
        assert np.array_equal(data_lib.read_gray(tmp_path / name), digit), name
    assert len(data_lib.load_image_folder(tmp_path)) == 3
    Image.fromarray(digit.astype(np.uint16)).save(tmp_path / "as16.png")  # 8-bit values, wide
    assert np.array_equal(data_lib.read_gray(tmp_path / "as16.png"), digit)
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / "i32.tif")
    with pytest.raises(ValueError, match=r"i32\.tif: integer pixels from 70000 to 70000"):
        data_lib.read_gray(tmp_path / "i32.tif")
    Image.fromarray(np.full((4, 4), 2.5, np.float32)).save(tmp_path / "hdr.tif")
    with pytest.raises(ValueError, match=r"hdr\.tif: float pixels from 2.5 to 2.5; expected"):
        data_lib.read_gray(tmp_path / "hdr.tif")
    with pytest.raises(ValueError, match="is a file; expected a folder of images"):
        data_lib.list_images(tmp_path / "d8.png")
    # A photo stored sideways with an EXIF orientation tag (6: turn 90 degrees clockwise to
    # show it) is read upright, as viewers show it.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(digit[:, :20]).save(tmp_path / "side.jpg", exif=exif, quality=100)
    upright = data_lib.read_gray(tmp_path / "side.jpg")
    assert upright.shape == (20, 28)
    assert np.abs(upright.astype(int) - np.rot90(digit[:, :20], -1)).mean() < 3


def test_entries_no_image_can_be_read_from_are_said_not_left_out(tmp_path):
    """A broken link, a pipe or a link to a device of an image's name was left out of an
    image folder without a word (a pipe, opened, waited forever); so were the images too
    small to give a patch. Now they are unreadable images, and the small ones a warning."""
    digit = np.load(MNIST)["x_test"][0]
    Image.fromarray(digit).save(tmp_path / "d8.png")
    Image.fromarray(digit[:10, :12]).save(tmp_path / "small.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    names = ["d8.png", "gone.png", "pipe.png", "small.png", "zero.png"]
    assert [p.name for p in data_lib.list_images(tmp_path)] == names
    with pytest.raises(data_lib.UnreadableImages) as e:
        data_lib.load_image_folder(tmp_path)
    assert f"{tmp_path / 'gone.png'}: a broken link" in str(e.value)
    assert f"{tmp_path / 'pipe.png'}: not a regular file" in str(e.value)
    assert f"{tmp_path / 'zero.png'}: not a regular file" in str(e.value)
    with pytest.warns(data_lib.AelibWarning) as said:
        images = data_lib.load_image_folder(tmp_path, mode="patch", on_error="skip")
    assert len(images) == 1  # (d8.png's one patch)
    assert "3 unreadable images" in str(said[0].message)
    assert f"1 image in {tmp_path} smaller than a 28x28 patch gives no patch" in str(
        said[1].message
    )
    assert f"(e.g. {tmp_path / 'small.png'} (12x10), width x height;" in str(said[1].message)


def test_an_image_too_big_for_pillow_is_named(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4,096 pixels: over twice that
    with pytest.raises(ValueError, match=r"Cannot read image .*big\.png: Image size"):
        data_lib.read_gray(tmp_path / "big.png")


def test_a_palette_image_with_transparency_reads_without_pillow_s_warning(tmp_path):
    """Pillow warned "Palette images with Transparency expressed in bytes should be
    converted to RGBA images" on stderr, naming no file, for each such image read."""
    import warnings

    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("P")
    image.info["transparency"] = bytes([0] * 10 + [255] * 246)
    image.save(tmp_path / "p.png", transparency=bytes([0] * 10 + [255] * 246))
    assert Image.open(tmp_path / "p.png").info.get("transparency") is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gray = data_lib.read_gray(tmp_path / "p.png")
    assert gray.shape == (8, 8)
