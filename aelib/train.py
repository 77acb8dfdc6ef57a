"""The one training path: the CLI and every Ray Tune trial call `train`."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import keras
import numpy as np

from aelib import data as data_lib
from aelib import metrics as metrics_lib
from aelib import process
from aelib.registry import (
    Autoencoder,
    build_model,
    finite,
    is_int,
    is_number,
    json_default,
    list_models,
    model_defaults,
    options_text,
    plain_message,
)
from aelib.saving import remove_stale_temp_files, save

MnistArrays = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
MAX_COUNT = 2**31 - 1  # the most epochs, and the largest batch size, a run takes


@dataclasses.dataclass
class TrainConfig:
    """Everything that decides a training run; saved with every model."""

    model: str = "dense"  # a name from aelib.list_models()
    model_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # build_model overrides
    # The same for every variant here; the command line applies the tutorial's own per
    # variant (aelib.tutorial: 100 epochs for sparse, deep and denoise; batch 128 for conv
    # and denoise, 100 for vae).
    epochs: int = 50
    batch_size: int = 256
    learning_rate: float = 1e-3  # Adam
    lr_schedule: str = "constant"  # or "cosine": decays to 0 over the run's epochs
    noise_factor: float = 0.5  # std of the Gaussian noise the denoiser is trained to remove
    # Of `denoise`'s validation and test splits (None: noise_factor). A sweep that
    # searches noise_factor fixes it, so that its trials are scored on one task: a
    # denoiser's loss and PSNR gain move with the noise level it is scored at.
    eval_noise_factor: float | None = None
    limit: int | None = None  # use the first N training images (None: all 60,000)
    val_split: float = 0.1  # last fraction of the training images held out for validation
    test_limit: int | None = None  # evaluate on the first N test images (None: all 10,000)
    metrics_limit: int = 1000  # images used for the per-epoch PSNR/SSIM of `denoise`
    seed: int = 0
    data: str | None = None  # path to mnist.npz (None: $AELIB_MNIST, then Keras's download)
    images: str | None = None  # train on a folder of your own images instead of MNIST
    image_mode: str = "resize"  # how own images become 28x28: "resize" or "patch"
    invert: bool = False  # own images dark-on-light: invert to MNIST's light-on-dark
    # own images: leave the unreadable ones out, with a warning naming them (default: fail,
    # naming them, before any training)
    skip_unreadable: bool = False

    def __post_init__(self):
        _check(  # (None failed with "'NoneType' object is not iterable")
            isinstance(self.model_options, dict),
            "model_options must be a dict of build_model options. "
            f"Received: model_options={self.model_options!r}",
        )
        for name in ("data", "images"):  # (a number was accepted, and failed at the load)
            value = getattr(self, name)
            _check(
                value is None or isinstance(value, (str, os.PathLike)),
                f"{name} must be a path or None. Received: {name}={value!r}",
            )
        for name in ("invert", "skip_unreadable"):
            value = getattr(self, name)
            _check(
                isinstance(value, bool), f"{name} must be True or False. Received: {name}={value!r}"
            )
        _check(  # ("" read the working folder's images, and was recorded as MNIST)
            self.images is None or str(self.images).strip() != "",
            f"images must be a folder's path, or None for MNIST. Received: images={self.images!r}",
        )
        _check(  # ("" fell back to $AELIB_MNIST, then Keras's download, without a word)
            self.data is None or str(self.data).strip() != "",
            f"data must be the path of an mnist.npz, or None ($AELIB_MNIST, then Keras's "
            f"download). Received: data={self.data!r}",
        )
        _check(
            self.image_mode in ("resize", "patch"),
            f"image_mode must be 'resize' or 'patch'. Received: {self.image_mode!r}",
        )
        if self.model not in list_models():
            raise ValueError(
                f"Unknown model {self.model!r}. Valid names: {', '.join(list_models())}"
            )
        unknown = sorted(set(self.model_options) - set(model_defaults(self.model)))
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for model {self.model!r}. "
                f"Valid options: {sorted(model_defaults(self.model))}"
            )
        for name in ("epochs", "batch_size", "limit", "test_limit", "metrics_limit", "seed"):
            value = getattr(self, name)
            _check(
                value is None and name in ("limit", "test_limit") or is_int(value),
                f"{name} must be an int. Received: {name}={value!r}",
            )
            if value is not None:  # (NumPy's as Python's: Keras's set_random_seed took
                setattr(self, name, int(value))  # no np.int64 seed, after the checks)
        for name in ("learning_rate", "noise_factor", "val_split"):
            value = getattr(self, name)
            _check(is_number(value), f"{name} must be a number. Received: {name}={value!r}")
        _check(self.epochs >= 1, f"epochs must be >= 1. Received: epochs={self.epochs}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1. Received: {self.batch_size}")
        for name in ("epochs", "batch_size"):  # (beyond int64: TensorFlow's OverflowError or
            value = getattr(self, name)  # TypeError traceback, in fit, after the data load)
            _check(
                value <= MAX_COUNT,
                f"{name} must be at most 2**31 - 1. Received: {name}={value}",
            )
        _check(
            self.metrics_limit >= 1,
            f"metrics_limit must be >= 1. Received: metrics_limit={self.metrics_limit}",
        )
        _check(
            0 < self.learning_rate < math.inf,
            f"learning_rate must be > 0 and finite. Received: {self.learning_rate}",
        )
        _check(
            0 <= self.seed < 2**32,
            f"seed must be in [0, 2**32 - 1]. Received: seed={self.seed}",
        )
        _check(
            self.model_options.get("channels", 1) == 1,
            "train() reads grayscale images (MNIST, or an image folder converted to gray): "
            f"channels must be 1. Received: channels={self.model_options.get('channels')} (a "
            "model of more channels is aelib.build_model's, for data of your own)",
        )
        _check(
            self.lr_schedule in ("constant", "cosine"),
            f"lr_schedule must be 'constant' or 'cosine'. Received: {self.lr_schedule!r}",
        )
        _check(
            0.0 <= self.noise_factor <= 1.0,
            f"noise_factor must be in [0, 1]. Received: noise_factor={self.noise_factor}",
        )
        _check(  # (the noisy inputs' PSNR would be infinite, and its mean with it)
            self.model != "denoise" or self.noise_factor > 0,
            "noise_factor must be > 0 for denoise: at 0 there is no noise to remove. "
            f"Received: noise_factor={self.noise_factor}",
        )
        _check(
            self.eval_noise_factor is None
            or is_number(self.eval_noise_factor)
            and 0.0 < self.eval_noise_factor <= 1.0,
            f"eval_noise_factor must be in (0, 1] or None. Received: {self.eval_noise_factor!r}",
        )
        _check(
            self.limit is None or self.limit >= 2,
            f"limit must be >= 2 (or None for all). Received: limit={self.limit}",
        )
        _check(
            0.0 <= self.val_split < 1.0,
            f"val_split must be in [0, 1). Received: val_split={self.val_split}",
        )
        _check(
            self.test_limit is None or self.test_limit >= 1,
            f"test_limit must be >= 1. Received: test_limit={self.test_limit}",
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown TrainConfig field(s) {unknown}. Valid: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TrainResult:
    model: Autoencoder
    metrics: dict[str, float]  # final test metrics (see `evaluate`)
    history: dict[str, list[float]]  # per-epoch Keras logs
    config: TrainConfig
    paths: dict[str, str]  # what was written under out_dir
    splits: Splits  # the arrays it trained, validated and was tested on


@dataclasses.dataclass
class Splits:
    """Model-ready arrays: inputs and targets differ only for `denoise`."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels_test: np.ndarray
    # What scaling the images to [0, 1] did (data.describe_scaling; None: not said)
    scaling: str | None = None
    # denoise: the noise factor of its training inputs and of its validation and test
    # inputs (the figures say which is which: a sweep trains at one and scores at another)
    noise: tuple[float, float] | None = None


def load_arrays(config: TrainConfig) -> MnistArrays:
    """MNIST (by path), or the user's image folder as 28x28 digits-like arrays with
    its last tenth as the test split (whole images: see `tail_for_test`) and no labels (-1:
    the figures colour no digits)."""
    if config.images is None:
        return data_lib.load_mnist(config.data)
    x, counts = data_lib.load_image_folder(
        config.images,
        size=(28, 28),
        mode=config.image_mode,
        invert=config.invert,
        on_error="skip" if config.skip_unreadable else "raise",
        return_counts=True,
    )
    if len(x) < 3:
        raise ValueError(f"{config.images} gives {len(x)} images; training needs at least 3.")
    n_test, whole = tail_for_test(counts)
    total, target = len(x), max(1, len(x) // 10)
    if not whole:
        one = "holds one image" if len(counts) == 1 else "ends in an image of over half the patches"
        warnings.warn(
            f"{config.images} {one}: the test split is the last tenth of the patches, so the "
            "test scores are of an image whose other patches are trained on (with more "
            "images, none of them over half, it holds whole images)",
            data_lib.AelibWarning,
            2,
        )
    elif not target / 2 <= n_test <= 2 * target:
        warnings.warn(
            f"{config.images}: the test split holds {n_test} of the {total} patches (whole "
            "images: of the last ones, the number of patches nearest a tenth)",
            data_lib.AelibWarning,
            2,
        )
    labels = np.full(len(x), -1, np.int16)
    return (x[:-n_test], labels[:-n_test]), (x[-n_test:], labels[-n_test:])


def tail_for_test(counts: np.ndarray) -> tuple[int, bool]:
    """How many arrays at the end make the test split, of images that gave `counts`
    arrays each, in order, and whether they are whole images: the last whole images whose
    arrays come closest to a tenth of all, at most half of them (the test split was the
    last tenth of the patches, so an image's patches were both trained on and scored).
    Where even the last image holds over half (or is the only one): the last tenth of the
    arrays (at least one), not whole images."""
    total = int(np.sum(counts))
    target = max(1, total // 10)
    tails = np.cumsum(counts[::-1])[:-1]  # (the arrays of the last 1, 2, ... n - 1 images)
    tails = tails[tails <= total / 2]
    if not len(tails):
        return target, False
    return int(tails[np.argmin(np.abs(tails - target))]), True


def check_out_dir(out_dir: str | os.PathLike, images: str | os.PathLike | None, names=None):
    """Refuses an output folder in the image folder a run trains on: the figures it
    writes there (PNGs) were read as training (and test) images by the next run on that
    folder, without a word. `names`: what to call the two in the message (the CLI's
    flags)."""
    if images is None:
        return
    out_name, images_name = names or ("out_dir", "images")
    out, root = (Path(p).expanduser().resolve() for p in (out_dir, images))
    if out == root or root in out.parents:
        raise ValueError(
            f"{out_name} {out_dir} is inside {images_name} {images}: its figures would be read "
            f"as images by the next run on {images}. Choose an {out_name} outside it."
        )


def make_splits(config: TrainConfig, arrays: MnistArrays, input_kind: str) -> Splits:
    """Limits, scales, reshapes and (for `denoise`) adds noise, reproducibly."""
    (x_train, _), (x_test, labels_test) = arrays
    if labels_test is None:  # (train(data=...) without labels: as own images have none)
        labels_test = np.full(len(x_test), -1, np.int16)
    if config.limit is not None:
        x_train = x_train[: config.limit]
    if config.test_limit is not None:
        x_test, labels_test = x_test[: config.test_limit], labels_test[: config.test_limit]
    scaling = data_lib.describe_scaling(x_train.dtype)  # (for the run's record)
    if x_test.dtype != x_train.dtype:
        scaling += f"; test images: {data_lib.describe_scaling(x_test.dtype)}"
    clean_train = data_lib.prepare(x_train, input_kind)
    clean_test = data_lib.prepare(x_test, input_kind)
    n_val = data_lib.held_out(len(clean_train), config.val_split)
    if n_val >= len(clean_train):  # Keras would train on no image and report NaN
        limit = "" if config.limit is None else f"limit={config.limit} with "
        raise ValueError(
            f"no training images left: {limit}val_split={config.val_split} leaves 0 of the "
            f"{len(clean_train)} images for training ({n_val} held out for validation). "
            "Use more images or a smaller val_split."
        )
    if n_val:
        clean_train, clean_val = clean_train[:-n_val], clean_train[-n_val:]
    else:  # the tutorial's choice: validate on the test split
        clean_val = clean_test
    if config.model == "denoise":
        # Distinct seeds per split so no split's noise repeats another's.
        scored = config.eval_noise_factor
        scored = config.noise_factor if scored is None else scored  # (val and test)
        noisy = [
            data_lib.add_noise(x, factor, seed=config.seed + i)
            for i, (x, factor) in enumerate(
                ((clean_train, config.noise_factor), (clean_val, scored), (clean_test, scored))
            )
        ]
        return Splits(
            *(noisy[0], clean_train, noisy[1], clean_val, noisy[2], clean_test, labels_test),
            scaling,
            noise=(config.noise_factor, scored),
        )
    return Splits(
        clean_train, clean_train, clean_val, clean_val, clean_test, clean_test, labels_test, scaling
    )


class StopOnNaN(keras.callbacks.Callback):
    """Stops training at the end of an epoch whose loss is NaN or infinite.

    Keras's TerminateOnNaN checks every batch, which makes `fit` wait for each
    step's loss instead of dispatching steps asynchronously (measurably slower for
    small models). Once the weights hold NaN every later loss does too, so checking
    once per epoch costs at most the rest of that epoch.
    """

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.model.stop_training = True


class DenoiseMetrics(keras.callbacks.Callback):
    """Adds `val_psnr` and `val_ssim` (on up to `limit` validation images) to the epoch logs,
    so every later callback (Tune's reporter, TensorBoard, History) sees them."""

    def __init__(
        self, x_val: np.ndarray, y_val: np.ndarray, limit: int = 1000, batch_size: int = 256
    ):
        super().__init__()
        self.x_val, self.y_val = x_val[:limit], y_val[:limit]
        self.batch_size = batch_size

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        out = self.model.predict(self.x_val, batch_size=self.batch_size, verbose=0)
        logs["val_psnr"] = float(np.mean(metrics_lib.psnr(self.y_val, out)))
        logs["val_ssim"] = float(np.mean(metrics_lib.ssim(self.y_val, out)))


def restore_training_state(model: keras.Model, path: str | os.PathLike) -> None:
    """Sets `model`'s weights and its optimizer's state (Adam's moments and step count,
    which a learning-rate schedule reads) to those saved in `path` with the same model
    compiled: a run continued from it trains on as if it had never stopped. Call it
    after `compile`, before the first step (a callback's `on_train_begin`)."""
    from aelib.saving import load, read_info

    saved = load(path, compile=True).autoencoder
    model.set_weights(saved.get_weights())
    states = read_info(path).get(SEED_STATES)
    if states is not None:  # (None: a checkpoint of a version before them)
        generators = seed_states(model)
        if len(states) != len(generators):
            raise ValueError(
                f"{path} holds {len(states)} random generators' states; this model has "
                f"{len(generators)}"
            )
        for variable, value in zip(generators, states, strict=True):
            variable.assign(np.asarray(value).astype(variable.dtype))
    state = saved.optimizer.variables if saved.optimizer else []
    if not model.optimizer.built:  # (TensorFlow builds it at the first step)
        model.optimizer.build(model.trainable_variables)
    own = model.optimizer.variables
    if [v.shape for v in state] != [v.shape for v in own]:
        raise ValueError(
            f"the optimizer state in {path} ({len(state)} variables) does not fit this "
            f"model's optimizer ({len(own)})"
        )
    for mine, theirs in zip(own, state, strict=True):
        mine.assign(theirs)


def seed_states(model: keras.Model) -> list:
    """The state variables of `model`'s random generators (the VAE's sampling noise):
    neither `get_weights()` nor a `.keras` file holds them, so a resumed run drew the
    noise of its first epochs again. A checkpoint's record keeps their values since
    (`SEED_STATES`: `seed_state_values`), which `restore_training_state` puts back."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


SEED_STATES = "seed_states"  # (the key of their values in a checkpoint's aelib record)


def seed_state_values(model: keras.Model) -> list:
    """The values of `seed_states(model)`, for a checkpoint's record."""
    return [keras.ops.convert_to_numpy(v).tolist() for v in seed_states(model)]


class CheckpointUnusable(ValueError):
    """A checkpoint that `train(resume=True)` was to go on from cannot be restored."""


class RestoreState(keras.callbacks.Callback):
    """Restores a checkpoint's weights and optimizer state as training begins."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = path

    def on_train_begin(self, logs=None):
        try:
            restore_training_state(self.model, self.path)
        except Exception as e:  # (a damaged file; a model aelib now builds otherwise)
            raise CheckpointUnusable(
                f"cannot go on from {self.path}: {plain_message(e)}. --restart (or removing "
                "the file) trains from epoch 1"
            ) from e


def checkpoint_path(out_dir: str | os.PathLike, model: str) -> Path:
    """Where `train(out_dir=...)` keeps the checkpoint of a run that has not ended."""
    return Path(out_dir).expanduser() / f"{model}.checkpoint.keras"


def last_finite_path(out_dir: str | os.PathLike, model: str) -> Path:
    """Where a run whose loss turned NaN keeps its checkpoint of the last epoch whose loss
    and validation loss were finite (the model it saves is of the NaN epoch, with NaN
    weights)."""
    return Path(out_dir).expanduser() / f"{model}.last_finite.keras"


CHECKPOINT = "checkpoint"  # (the key of a checkpoint's state in its aelib record)


class EpochCheckpoint(keras.callbacks.Callback):
    """At the end of every epoch, saves the model with its optimizer state and the run's
    history so far to `path` (atomically: a run stopped while it saves keeps the epoch
    before), for `train(resume=True)` to go on from: the last epoch's too, so that a run
    stopped in its evaluation, figures or writing goes on without training again. An
    epoch whose loss or validation loss is NaN is not saved: its weights are NaN too (a
    last batch's step can make them NaN after the batches' mean loss was finite), and the
    checkpoint of the epoch before is what a diverged run keeps (see `last_finite_path`)."""

    def __init__(
        self, path: Path, model: Autoencoder, config: TrainConfig, past: dict, settings: dict
    ):
        super().__init__()
        self.path, self.bundle, self.config, self.settings = path, model, config, settings
        self.history = {k: list(v) for k, v in past["history"].items()}
        self.past_seconds = past["train_seconds"]
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        for k, v in logs.items():
            self.history.setdefault(k, []).append(v)
        done = epoch + 1  # (fit counts on from the checkpoint's epochs)
        if not all(math.isfinite(logs.get(k, 0.0)) for k in ("loss", "val_loss")):
            return
        state = {
            "epochs_done": done,
            "settings": self.settings,
            "history": self.history,
            "train_seconds": self.past_seconds + time.perf_counter() - self.start,
        }
        record = {"train_config": self.config.to_dict(), CHECKPOINT: state}
        save(self.bundle, self.path, {**record, SEED_STATES: seed_state_values(self.model)})


def resume_settings(config: TrainConfig, arrays: MnistArrays) -> dict[str, Any]:
    """What a run must share with a stopped one to go on from its checkpoint: its
    config, with the model's options as built (an option given at its default is the
    same run), the training images themselves (by a hash of their bytes, not by the
    path given: a relative --data read another file from another folder, and the same
    file given another way was another run), and not what only the final evaluation
    reads (test_limit, unless val_split is 0: the epochs then validate on the test split,
    and a resumed run's history mixed the losses of two validation sets)."""
    values = config.to_dict()
    # (skip_unreadable: which images it read is in their hash; a run stopped before the
    # field was recorded goes on)
    for name in ("data", "images", "skip_unreadable"):
        values.pop(name)
    if config.val_split:
        values.pop("test_limit")
    values["model_options"] = {**model_defaults(config.model), **config.model_options}
    x_train = np.ascontiguousarray(arrays[0][0][: config.limit])
    digest = hashlib.blake2b(memoryview(x_train).cast("B"), digest_size=16).hexdigest()
    values["training_images"] = f"{len(x_train)} of {x_train.dtype} {digest}"
    return json.loads(json.dumps(values, default=json_default))


def stopped_run(
    out_dir: str | os.PathLike, model: str, settings: dict[str, Any]
) -> tuple[dict | None, str]:
    """The state a stopped run of variant `model` with these `settings` (see
    resume_settings) left in `out_dir` (its epochs done, history and training seconds),
    or None and why there is none to go on from: "" where no checkpoint is there, else
    what keeps it from this run (other settings, a damaged file)."""
    from aelib.saving import read_info

    path = checkpoint_path(out_dir, model)
    if not path.exists():
        return None, ""
    try:
        info = read_info(path)
    except (OSError, ValueError) as e:
        return None, f"{path.name} cannot be read ({plain_message(e)})"
    state = info.get(CHECKPOINT)
    if not isinstance(state, dict) or not isinstance(state.get("settings"), dict):
        return None, f"{path.name} is not a checkpoint of aelib train"
    theirs, ours = state["settings"], settings
    if "test_limit" in ours and "test_limit" not in theirs:  # (a version before it was one)
        theirs = {**theirs, "test_limit": (info.get("train_config") or {}).get("test_limit")}
    differ = sorted(k for k in {*ours, *theirs} if ours.get(k) != theirs.get(k))
    if differ:
        were = ", ".join(
            "other training images" if k == "training_images"
            else f"{k}={theirs.get(k)!r} (now {ours.get(k)!r})"
            for k in differ
        )  # fmt: skip
        return None, f"{path.name} is of a run with other settings: {were}"
    return state, ""


def merge_history(a: dict[str, list], b: dict[str, list]) -> dict[str, list]:
    """Two runs' per-epoch logs, one after the other, aligned by epoch: a key one of them
    lacks is None in its epochs. (A key a caller's callback adds is one: the checkpoint
    a stopped run goes on from is saved before those callbacks run, so that a stop they
    raise keeps the epoch; its lists, joined as they were, put the resumed run's values
    at the first epochs.)"""
    epochs_a, epochs_b = (max(map(len, h.values()), default=0) for h in (a, b))
    return {
        k: list(a.get(k, [None] * epochs_a)) + list(b.get(k, [None] * epochs_b))
        for k in dict.fromkeys([*a, *b])
    }


def tf_data_autotune_off() -> bool:
    """Under TensorFlow, turns off tf.data autotuning in the pipelines Keras builds
    from NumPy arrays (fit's validation, evaluate, predict; the training batches come
    from training_data, whose pipeline has it off too); returns whether it did.

    Keras feeds NumPy arrays to TensorFlow through a tf.data pipeline, with a new
    iterator each epoch. With autotuning on, each iterator has a thread that
    re-tunes it on a growing period, and when an epoch ends, the old iterator's
    teardown can wait for that thread: with two trainings side by side on 2 cores,
    a process sat idle for 2-3 s at a time (gdb: `RootDataset::Iterator::~Iterator`
    waiting on `Model::OptimizeLoop`). `python jobs/bench_tf_data.py --data
    mnist.npz` measures it: conv and seq2seq side by side, 4 epochs, one thread
    each, were 86-97% busy with autotuning and 98-99% without, and took 32.9 s
    instead of 37.3 s and 28.9 s instead of 31.9 s, with identical losses (measured
    while Keras's pipeline still fed the training batches too, up to ffe3f6d). Keras's
    own PyDataset adapter turns autotuning off the same way when it prefetches.

    JAX and PyTorch get NumPy batches without tf.data: nothing to do. Keras's
    adapter is internal API; if it moves, this does nothing and training runs as
    before."""
    if keras.backend.backend() != "tensorflow":
        return False
    try:
        from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter
    except ImportError:
        return False
    build = ArrayDataAdapter.get_tf_dataset
    if getattr(build, "_aelib_autotune_off", False):
        return True
    import tensorflow as tf

    def get_tf_dataset(self, *args, **kwargs):
        options = tf.data.Options()
        options.autotune.enabled = False
        return build(self, *args, **kwargs).with_options(options)

    get_tf_dataset._aelib_autotune_off = True
    ArrayDataAdapter.get_tf_dataset = get_tf_dataset
    return True


def training_data(
    x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, initial_epoch: int = 0
) -> dict[str, Any]:
    """The training set as `fit` is given it (its `x`, `y`, `batch_size`, `shuffle` or
    `steps_per_epoch`): batches of `batch_size` in a new order each epoch.

    JAX and PyTorch get the arrays with shuffle=True: Keras draws each epoch's order
    with NumPy's generator under JAX, and with torch's (a RandomSampler) under
    PyTorch, both of which keras.utils.set_random_seed seeds.

    TensorFlow gets a tf.data pipeline of its own, because there Keras's shuffle=True
    gives every epoch the same order once set_random_seed has set TensorFlow's global
    seed: Keras draws its permutation with tf.random.shuffle in a new iterator each
    epoch, and each new iterator draws the same one (tensorflow/tensorflow#35682).
    Here epoch `e`'s order is `stateless_shuffle` of 0..n-1 with the seed (seed, e):
    new each epoch, the same in every run with the seed, and a run resumed at
    `initial_epoch` sees the orders an unstopped one saw. The pipeline runs on, epoch
    after epoch, in one iterator (`steps_per_epoch` batches an epoch, none crossing
    an epoch's end), with tf.data's autotuning off as in tf_data_autotune_off."""
    if keras.backend.backend() != "tensorflow":
        return {"x": x, "y": y, "batch_size": batch_size, "shuffle": True}
    import tensorflow as tf

    n = len(x)
    with tf.device("/cpu:0"):  # (tf.data runs on the host: no copy of the set on a GPU)
        xs = tf.constant(x)
        ys = xs if y is x else tf.constant(y)  # (an autoencoder's target is its input)
    seed = tf.constant(seed, tf.int64)

    full = n // batch_size  # (batches of indices sliced from a [full, batch_size] tensor,
    # as Keras's own pipeline does: .batch() over one index at a time took ~0.5 s an epoch)

    def epoch_batches(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([seed, epoch])
        )
        whole = tf.reshape(order[: full * batch_size], [full, batch_size])
        batches = tf.data.Dataset.from_tensor_slices(whole)
        if n % batch_size:  # (the epoch's last, smaller batch)
            batches = batches.concatenate(tf.data.Dataset.from_tensors(order[full * batch_size :]))
        return batches

    # Options as Keras's own pipeline has them: its default graph rewrites off (on, they
    # made the pipeline 2-3x slower on 2 cores: `vae`'s 540 batches took 0.7-1.0 s an
    # epoch instead of 0.25-0.3 s), and autotuning off as in tf_data_autotune_off.
    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.apply_default_optimizations = False
    batches = (
        tf.data.Dataset.counter(start=initial_epoch)
        .flat_map(epoch_batches)
        .map(lambda i: (tf.gather(xs, i), tf.gather(ys, i)), num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(2)
        .with_options(options)
    )
    # (shuffle=False: the order is the pipeline's; Keras warns of its default, True)
    return {"x": batches, "steps_per_epoch": math.ceil(n / batch_size), "shuffle": False}


def compile_model(model: Autoencoder, learning_rate: float, decay_steps: int | None = None) -> None:
    """Adam on binary cross-entropy; with `decay_steps`, a cosine decay of the
    learning rate to 0 over that many steps."""
    learning_rate = float(learning_rate)  # (Keras refuses an int: every trial of --set lr=1)
    if decay_steps:
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps)
    model.autoencoder.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="binary_crossentropy",
    )


def compute_device() -> str:
    """Where Keras's backend computes in this process: "CPU", or "GPU (<name>)" of its
    first GPU. A sweep's trials and a training run record it, so a run on a GPU machine
    shows whether the backend saw the GPU (a CPU-only build of TensorFlow or JAX runs,
    slowly, on the CPU)."""
    backend = keras.backend.backend()
    name = None
    if backend == "jax":
        import jax

        if jax.default_backend() != "cpu":
            name = jax.devices()[0].device_kind
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "")
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
    if name is None:
        return "CPU"
    return f"GPU ({name})" if name else "GPU"


def evaluate(model: Autoencoder, splits: Splits, batch_size: int = 256) -> dict[str, float]:
    """Test metrics: `test_loss` (what training minimises: BCE plus any penalty),
    `test_bce` (pure reconstruction BCE, comparable across variants), and per variant
    PSNR/SSIM of input and output, mean code activation, ..."""
    model_out = model.autoencoder.predict(splits.x_test, batch_size=batch_size, verbose=0)
    results = {
        "test_loss": float(
            model.autoencoder.evaluate(
                splits.x_test, splits.y_test, batch_size=batch_size, verbose=0
            )
        ),
        "test_bce": metrics_lib.binary_crossentropy(splits.y_test, model_out),
        "test_images": len(splits.x_test),
    }
    # Over every test image, as the loss and `test_images` are (they were of the first
    # 10,000 only: a bigger test split, own images' last tenth, reported part of it).
    results["test_psnr"] = float(np.mean(metrics_lib.psnr(splits.y_test, model_out)))
    results["test_ssim"] = float(np.mean(metrics_lib.ssim(splits.y_test, model_out)))
    if model.name == "denoise":
        results["noisy_psnr"] = float(np.mean(metrics_lib.psnr(splits.y_test, splits.x_test)))
        results["noisy_ssim"] = float(np.mean(metrics_lib.ssim(splits.y_test, splits.x_test)))
        results["psnr_gain"] = results["test_psnr"] - results["noisy_psnr"]
    if model.name in ("dense", "sparse", "deep"):
        codes = model.encoder.predict(splits.x_test, batch_size=batch_size, verbose=0)
        results["code_mean"] = float(np.mean(codes))
        results["code_active_fraction"] = float(np.mean(codes > 0))
    return results


def train(
    config: TrainConfig | dict[str, Any],
    data: MnistArrays | None = None,
    out_dir: str | os.PathLike | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    tensorboard_dir: str | os.PathLike | None = None,
    figures: bool = True,
    verbose: str | int = "auto",
    initial_epoch: int = 0,
    data_source: str | None = None,
    resume: bool = False,
) -> TrainResult:
    """Builds, trains and evaluates one variant; optionally saves it with its figures.

    Args:
        config: a `TrainConfig` (or a dict of its fields).
        data: MNIST as `load_mnist` returns it; loaded from `config.data` if None
            (Ray trials pass it from the object store instead).
        out_dir: if set, writes `NAME.keras`, `metrics.json` and `figures/*.png` there.
        callbacks: extra Keras callbacks, run after aelib's own (so they see
            `val_psnr`/`val_ssim` for `denoise`; the epoch's checkpoint is saved
            before them, so a key they add to the logs is None in a resumed run's
            history for the epochs before it).
        tensorboard_dir: if set, Keras's TensorBoard callback logs there.
        figures: draw the tutorial's figures into out_dir.
        verbose: Keras's fit verbosity ("auto": a progress bar on a terminal).
        initial_epoch: epochs already done (a resumed run, whose weights and optimizer
            state a callback restores in `on_train_begin`): trains epochs
            `initial_epoch + 1` to `config.epochs`, with the learning-rate schedule of
            the whole run.
        data_source: what `data` is, for the saved record (default: the config's MNIST
            file or image folder when `data` is None, else "arrays passed to train()").
        resume: with `out_dir`, go on from the checkpoint a stopped run of this same
            config left there (see `stopped_run`): from the epoch after its last, with
            its weights, optimizer state and history (after all its epochs: to the
            evaluation and outputs, training none). A run with `out_dir` saves one after
            every epoch, and removes it once it has ended.

    Returns:
        A `TrainResult`. Training stops at the end of the epoch where the loss
        turns NaN; then `metrics["nan"]` is True.
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    if not isinstance(config, TrainConfig):  # (train("dense") was an AttributeError)
        raise TypeError(
            "train() takes a TrainConfig (or a dict of its fields), e.g. "
            f"aelib.TrainConfig(model='dense'). Received: {config!r}"
        )
    if not (is_int(initial_epoch) and 0 <= initial_epoch < config.epochs):
        raise ValueError(
            f"initial_epoch must be in [0, epochs={config.epochs}): the epochs already done. "
            f"Received: initial_epoch={initial_epoch!r}"
        )
    # (figures="no" drew figures, callbacks=History() failed after the data load, and
    # resume=True without out_dir, where no checkpoint can be, was ignored)
    for name, value in (("figures", figures), ("resume", resume)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False. Received: {name}={value!r}")
    if callbacks is not None and not (
        isinstance(callbacks, (list, tuple))
        and all(isinstance(c, keras.callbacks.Callback) for c in callbacks)
    ):
        raise TypeError(
            "callbacks must be a list (or tuple) of Keras callbacks (keras.callbacks.Callback). "
            f"Received: callbacks={callbacks!r}"
        )
    if resume and out_dir is None:
        raise ValueError(
            "resume=True goes on from the checkpoint a stopped run left in out_dir: give "
            "out_dir, or leave resume False."
        )
    if out_dir is not None:  # (found after the training and evaluation before)
        if data is None:  # (the images are read from config.images, if it names them)
            check_out_dir(out_dir, config.images)
        folder = Path(out_dir).expanduser()
        blocker = next((p for p in (folder, *folder.parents) if p.is_file()), None)
        if blocker is not None:
            raise NotADirectoryError(
                f"out_dir {out_dir}: {blocker} is a file; expected a folder (or none yet)."
            )
    if data is not None:
        data = data_lib.check_arrays(data)  # (as arrays: lists failed after the checks)
        data_source = data_source or "arrays passed to train()"
    tf_data_autotune_off()
    keras.utils.set_random_seed(config.seed)
    model = built(config)  # (its options' values checked before the data is read)
    arrays = data if data is not None else load_arrays(config)
    past = {"epochs_done": 0, "history": {}, "train_seconds": 0.0}
    checkpoint = None if out_dir is None else checkpoint_path(out_dir, config.model)
    settings = resume_settings(config, arrays) if checkpoint else {}
    state, why_not = None, ""
    if resume and checkpoint:
        state, why_not = stopped_run(out_dir, config.model, settings)
    if why_not:  # (the CLI says so itself and asks for resume only where it goes on)
        warnings.warn(
            f"resume=True: {why_not}; training from epoch 1 (the checkpoint is replaced)",
            stacklevel=2,
        )
    resumed = state is not None
    if resumed:
        if initial_epoch:
            raise ValueError("initial_epoch and resume=True both say where to start: give one")
        past, initial_epoch = state, state["epochs_done"]
    build_checked(config, arrays, model)
    splits = make_splits(config, arrays, model.input_kind)
    decay_steps = None
    if config.lr_schedule == "cosine":
        decay_steps = config.epochs * math.ceil(len(splits.x_train) / config.batch_size)
    compile_model(model, config.learning_rate, decay_steps)

    own: list[keras.callbacks.Callback] = [StopOnNaN()]
    if config.model == "denoise":
        own.append(
            DenoiseMetrics(splits.x_val, splits.y_val, config.metrics_limit, config.batch_size)
        )
    if resumed:
        own.append(RestoreState(checkpoint))
    if tensorboard_dir is not None:
        own.append(keras.callbacks.TensorBoard(log_dir=str(tensorboard_dir)))
    if checkpoint is not None:
        own.append(EpochCheckpoint(checkpoint, model, config, past, settings))
    start = time.perf_counter()
    batches = training_data(
        splits.x_train, splits.y_train, config.batch_size, config.seed, initial_epoch
    )
    history = model.autoencoder.fit(
        **batches,
        epochs=config.epochs,
        validation_data=(splits.x_val, splits.y_val),
        validation_batch_size=config.batch_size,  # (not 32, where batches holds no batch_size)
        callbacks=own + list(callbacks or []),
        verbose=verbose,
        initial_epoch=initial_epoch,
    )
    process.raise_if_stopped()  # (here and below: a stop that process.defer_stops held)
    # (fit's own time where it trained: a rerun of a run stopped after its last epoch
    # trains none, and its fit, which only restores the checkpoint, added a second)
    trained = time.perf_counter() - start if history.epoch else 0.0
    train_seconds = past["train_seconds"] + trained
    hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    hist = merge_history(past["history"], hist)
    last_loss = hist.get("loss", [math.nan])[-1]
    metrics: dict[str, Any] = {
        "train_loss": last_loss,
        "val_loss": hist.get("val_loss", [math.nan])[-1],
        "epochs_run": len(hist.get("loss", [])),
        "train_seconds": train_seconds,
        "device": compute_device(),
        "nan": not math.isfinite(last_loss),
    }
    if resumed:  # (the epochs before it ran in a run that stopped)
        metrics["resumed_after_epoch"] = past["epochs_done"]
    if not metrics["nan"]:
        metrics.update(evaluate(model, splits, config.batch_size))
        process.raise_if_stopped()

    # The trained model's record, as aelib.save writes it with it (it was {}: a
    # save(result.model, path, result.model.info) kept no training config or metrics).
    n_train, n_val = len(splits.x_train), len(splits.x_val)
    record = run_record(config, metrics, hist, n_train, n_val, data_source, splits.scaling)
    model.info = copy.deepcopy(record)  # (not result.metrics itself: one edit changed both)
    paths: dict[str, str] = {}
    if out_dir is not None:
        out_dir = Path(out_dir).expanduser()
        paths = write_outputs(model, config, metrics, hist, splits, out_dir, figures, data_source)
        # The run has ended (metrics.json says so): its checkpoint goes, unless the loss
        # turned NaN after a finite epoch, whose weights it holds; an earlier run's such
        # file goes too (it is of another run than the model beside it).
        last_finite = last_finite_path(out_dir, config.model)
        if metrics["nan"] and checkpoint.exists():
            os.replace(checkpoint, last_finite)
            paths["last_finite_model"] = str(last_finite)
        else:
            checkpoint.unlink(missing_ok=True)
            last_finite.unlink(missing_ok=True)
        remove_stale_temp_files(checkpoint)
    return TrainResult(model, metrics, hist, config, paths, splits)


def run_record(
    config: TrainConfig,
    metrics: dict[str, Any],
    history: dict[str, list[float]],
    n_train: int,
    n_val: int,
    source: str | None = None,
    scaling: str | None = None,
) -> dict[str, Any]:
    """What gets stored with a model: config, data settings, metrics, history.
    `source`: where the data came from (default: the config's, see config_source);
    `scaling`: what scaling its images to [0, 1] did (Splits.scaling)."""
    return {
        "train_config": config.to_dict(),
        "data_settings": {
            "source": source or config_source(config),
            "train_images": n_train,
            "val_images": n_val,
            "noise_factor": config.noise_factor if config.model == "denoise" else None,
            "eval_noise_factor": (config.eval_noise_factor if config.model == "denoise" else None),
            "scaling": scaling,  # (it said uint8 / 255 of float images too)
        },
        "metrics": metrics,
        "history": history,
    }


def config_source(config: TrainConfig) -> str:
    """Where `config` reads its data: its image folder or MNIST file, as an absolute path
    (a relative `--data mnist.npz` was recorded as it was given, which names no file once
    read from another folder), or Keras's download."""
    path = config.images or data_lib.resolve_mnist_path(config.data)
    return "keras.datasets.mnist" if path is None else os.path.abspath(Path(path).expanduser())


# The files plots.tutorial_figures writes, as NAME_<one of these>.png: an earlier run's
# that a later run into the same folder does not draw again are removed (write_outputs).
# Here, not in plots: a run without figures (every sweep trial) imports no Matplotlib.
FIGURE_FILES = (
    "learning_curves",
    "noisy_vs_denoised",
    "reconstructions",
    "codes",
    "codes_tsne",
    "codes_1d",
    "latent_plane",
    "manifold",
    "latent_tsne",
    "latent_1d",
)


def write_outputs(
    model: Autoencoder,
    config: TrainConfig,
    metrics: dict[str, Any],
    history: dict[str, list[float]],
    splits: Splits,
    out_dir: Path,
    figures: bool,
    source: str | None = None,
) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    n_train, n_val = len(splits.x_train), len(splits.x_val)
    record = run_record(config, metrics, history, n_train, n_val, source, splits.scaling)
    metrics_path = out_dir / "metrics.json"
    # An earlier run's record goes first: until this one's is written last, the folder
    # holds a run that did not end (a new model beside the old record, if stopped).
    metrics_path.unlink(missing_ok=True)
    paths = {"model": str(save(model, out_dir / f"{config.model}.keras", record))}
    if figures and not metrics["nan"]:
        from aelib import plots

        process.raise_if_stopped()  # (a stop that process.defer_stops held)

        for name, path in plots.tutorial_figures(
            model, splits, history, out_dir / "figures"
        ).items():
            paths[f"figure_{name}"] = str(path)
    # An earlier run's figures of this variant that this run did not draw again
    # (--no-figures, a NaN run, a VAE no longer 2-D) would show another model.
    drawn = {Path(p) for k, p in paths.items() if k.startswith("figure_")}
    for name in FIGURE_FILES:
        stale = out_dir / "figures" / f"{config.model}_{name}.png"
        if stale not in drawn:
            with contextlib.suppress(OSError):  # (none there; or kept, as a run is no
                stale.unlink()  # failure for a figure it could not remove)
    # ... nor the temp files of its figures that a kill -9 left while they were saved.
    pattern = rf"\.{re.escape(config.model)}_[a-z_]+\.(\d+)\.tmp\.png"
    process.remove_dead_temp_files(out_dir / "figures", pattern)
    # Last: the record of a run that ended (the CLI refuses to replace it without
    # --overwrite; a model without it is a stopped run's).
    process.raise_if_stopped()
    text = json.dumps(finite({"model": config.model, **record}), indent=2, default=json_default)
    with process.replaced(metrics_path) as tmp:
        tmp.write_text(text)
    paths["metrics"] = str(metrics_path)
    return paths


def built(config: TrainConfig) -> Autoencoder:
    """The config's model, built: a bad option value is refused here, before any data is
    read (train() builds it first, so that a missing MNIST did not hide it)."""
    try:
        return build_model(config.model, **config.model_options)
    except Exception as e:  # (TensorFlow's ResourceExhaustedError: a traceback before)
        text = f"{type(e).__name__}: {e}"  # (TensorFlow's, JAX's, PyTorch's words)
        marks = ("ResourceExhausted", "RESOURCE_EXHAUSTED", "OutOfMemory", "out of memory")
        marks += ("can't allocate memory",)  # (PyTorch's CPU allocator, C++ words and all)
        if not isinstance(e, MemoryError) and not any(m in text for m in marks):
            raise
        raise ValueError(
            f"Model {config.model!r} ({options_text(config.model_options)}) does not fit in "
            f"memory: its weights could not be allocated ({type(e).__name__}). Use smaller "
            "options."
        ) from None


def build_checked(
    config: TrainConfig, arrays: MnistArrays, model: Autoencoder | None = None
) -> Autoencoder:
    """Builds the config's model (or takes `model`, built from it by built()) and checks,
    without training, that it takes the arrays' images (as its input kind reads them)
    and gives back their shape: what train() checks first, for callers that want a bad
    option refused before any work (the sweep's driver, before its trials)."""
    model = model or built(config)
    for part, x in (("training", arrays[0][0]), ("test", arrays[1][0])):
        shape = np.shape(x)
        gray = len(shape) == 3 or len(shape) == 4 and shape[-1] == 1
        if model.input_kind != "flat" and not gray:  # (NumPy's unpacking error, flat ones)
            reads = "H time steps of W values" if model.input_kind == "sequence" else "HxW images"
            fix = (
                "Give them their height and width (flat MNIST: x.reshape(-1, 28, 28)), or use "
                "a flat variant (dense, sparse, deep)."
                if len(shape) < 3
                else "Give them as gray images, one channel, last."
            )
            raise ValueError(
                f"Model {model.name!r} reads {reads}, and the data's {part} images are not "
                f"(N, H, W) or (N, H, W, 1) arrays: shape {shape}. {fix}"
            )
    first = np.asarray(arrays[0][0][:1])
    image = data_lib.prepare(first, model.input_kind)
    test = data_lib.prepare(np.asarray(arrays[1][0][:1]), model.input_kind)
    if test.shape[1:] != image.shape[1:]:  # (flat test images of conv or seq2seq: Keras's
        raise ValueError(  # shape error traceback in the evaluation, after the training)
            f"Model {model.name!r} reads the data's training images as {image.shape[1:]} "
            f"and its test images as {test.shape[1:]}: a model is trained and tested on "
            "images of one shape. Give the test images the training images' shape."
        )
    values = image.shape[-1]
    if model.input_kind == "flat" and (
        first.ndim >= 3 and first.shape[1] != first.shape[2] or math.isqrt(values) ** 2 != values
    ):
        shape = "x".join(map(str, first.shape[1:3])) if first.ndim >= 3 else f"{values}-value"
        raise ValueError(  # (after training, the metrics and figures failed on them)
            f"Model {model.name!r} reads images as flat vectors, and its metrics and figures "
            f"read them back as square images: the data's {shape} images are not square. "
            "Resize them, or use denoise (sides multiples of 2**depth)."
        )
    # The test SSIM (and denoise's val_ssim after each epoch) is scikit-image's, of a 7x7
    # window: smaller images failed in it, after the training (or its first epoch).
    flat = model.input_kind == "flat"
    height, width = (math.isqrt(values),) * 2 if flat else image.shape[1:3]
    if min(height, width) < 7:
        raise ValueError(
            f"The data's {height}x{width} images are too small: the SSIM of the test metrics "
            "(scikit-image's, of a 7x7 window; denoise's val_ssim too) needs images of at "
            "least 7x7."
        )
    _check_shapes(model, image.shape[1:], config.model_options)
    return model


def _check_shapes(model: Autoencoder, shape: tuple[int, ...], overrides: dict[str, Any]) -> None:
    """The model must take inputs of `shape` and give back that shape (`denoise` with
    depth=3 turns 28x28 into 32x32; a 14x14 npz is not the 784 inputs of `dense`)."""
    sample = (1, *shape)
    options = options_text(overrides)
    try:
        got = tuple(model.autoencoder.compute_output_shape(sample))
    except Exception as e:
        raise ValueError(
            f"Model {model.name!r} ({options}) cannot take the data's {sample[1:]} inputs: "
            f"{plain_message(e)}"
        ) from e
    if got != sample:
        raise ValueError(
            f"Model {model.name!r} ({options}) maps the data's {sample[1:]} inputs to "
            f"{got[1:]}: its output must have the input's shape (for denoise, sides that are "
            "multiples of 2**depth)"
        )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
