"""Saving a variant as one `.keras` file that carries what produced it.

The file is Keras's own format (reloads with `keras.models.load_model` after
`import aelib`, safe_mode on) plus one extra member, `aelib.json`, holding the
variant name, its input kind, the full training config, data settings, final
metrics and library versions. Keras ignores members it does not know.

A file reloads, and trains on, under any backend: Keras writes the compile config as
the saving backend has it (PyTorch's own Adam class, which TensorFlow and JAX cannot
train with; JAX's `jit_compile=True`, which sent PyTorch's fit through torch.compile and
failed; TensorFlow's `False`, which left JAX without jit), so `save` writes
Keras's public optimizer and lets each backend choose its own jit.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras

from aelib import process
from aelib.registry import INPUT_KINDS, Autoencoder, finite, json_default, plain_message

INFO_MEMBER = "aelib.json"
CONFIG_MEMBER = "config.json"  # Keras's: the model's config, and its compile config


def _as_path(path: Any, what: str) -> Path:
    """`path` as a Path; anything else named (load(5) was pathlib's TypeError)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what}() takes a path to a .keras file. Received: {path!r}")
    return Path(path).expanduser()


def save(model: Autoencoder, path: str | os.PathLike, info: dict[str, Any] | None = None) -> Path:
    """Writes `model.autoencoder` to `path` (.keras) atomically, with `info` (what
    produced it: training config, metrics, ...). A reloaded model's record is its
    `.info`; it is not carried over by itself, as training on would leave it stale:
    `save(model, path, {**model.info, ...})` keeps it (the variant, its options and the
    versions and backend saving it are always recorded anew).

    Returns:
        The path written.
    """
    if not isinstance(model, Autoencoder):  # (its Keras model: "'Functional' object has no
        raise TypeError(  # attribute 'input_kind'")
            "save() takes an aelib model, as aelib.build_model or aelib.load returns it (its "
            "Keras model is its .autoencoder; a plain Keras model saves with its own .save). "
            f"Received: {type(model).__name__}"
        )
    path = _as_path(path, "save")
    if info is not None and not isinstance(info, Mapping):  # ("'list' object is not a
        raise TypeError(  # mapping", naming no argument)
            f"save() takes info as a dict (the record to store). Received: {info!r}"
        )
    if path.suffix != ".keras":
        raise ValueError(f"Model path must end in .keras. Received: {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:  # (mkdir's words name no save)
        blocker = next((p for p in path.parents if p.is_file()), None)
        what = f"{blocker} is a file" if blocker else f"{e.filename} is not a folder"
        raise NotADirectoryError(f"Cannot save {path}: {what}.") from e
    if path.is_dir():
        raise IsADirectoryError(f"Cannot save {path}: it is a folder.")
    # Write beside the target, then rename: a crash never leaves half a file (and a
    # kill -9 leaves the temp files, which the next save of this name removes).
    remove_stale_temp_files(path)
    # aelib's own fields last: `info` may be a reloaded model's record, naming the
    # backend and versions it was saved with before.
    record = {
        **(info or {}),
        "name": model.name,
        "input_kind": model.input_kind,
        "model_config": model.config,
        "versions": {
            "aelib": _version(),
            "keras": keras.__version__,
            "backend": keras.backend.backend(),
        },
    }
    keras_tmp = path.with_name(f".{path.stem}.{os.getpid()}.keras-tmp.keras")
    try:
        with process.replaced(path, clean=False) as tmp:
            model.autoencoder.save(keras_tmp)
            _copy_portable(
                keras_tmp, tmp, json.dumps(finite(record), indent=2, default=json_default)
            )
    finally:
        keras_tmp.unlink(missing_ok=True)
    return path


def remove_stale_temp_files(path: str | os.PathLike) -> None:
    """Removes the temp files `save` left beside `path` in a process that no longer runs
    (killed while it saved)."""
    path = Path(path)
    pattern = rf"\.{re.escape(path.stem)}\.(\d+)\.(tmp|keras-tmp)\.keras"
    process.remove_dead_temp_files(path.parent, pattern)


def _copy_portable(src: Path, dst: Path, info: str | None = None) -> None:
    """Copies the .keras file `src` to `dst` with its compile config made `portable`
    (every other member as it is) and, given `info`, that as its aelib record."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            if item.filename == INFO_MEMBER and info is not None:
                continue
            with zin.open(item) as member:
                if item.filename == CONFIG_MEMBER:
                    config = json.loads(member.read())
                    if config.get("compile_config"):
                        config["compile_config"] = portable(config["compile_config"])
                    zout.writestr(item, json.dumps(config))
                else:
                    with zout.open(item, "w") as out:
                        shutil.copyfileobj(member, out, 1 << 20)
        if info is not None:
            zout.writestr(INFO_MEMBER, info)


def portable(compile_config: dict) -> dict:
    """A compile config any backend trains with: the optimizer by its public class
    (`keras.optimizers.Adam`, not the saving backend's own), and no `jit_compile`, so
    that the loading backend resolves its default ("auto")."""
    config = dict(compile_config)
    optimizer = config.get("optimizer")
    if isinstance(optimizer, dict) and str(optimizer.get("module", "")).startswith(
        "keras.src.backend."
    ):
        config["optimizer"] = {**optimizer, "module": "keras.optimizers"}
    config.pop("jit_compile", None)
    return config


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """The aelib record stored in a `.keras` file ({} for a plain Keras file)."""
    path = _as_path(path, "read_info")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected a .keras file.")
    if not path.is_file():
        raise FileNotFoundError(f"Model file not found: {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            if INFO_MEMBER not in zf.namelist():
                return {}
            record = json.loads(zf.read(INFO_MEMBER))
    except zipfile.BadZipFile as e:  # (not a zip; or a member's CRC: a damaged file)
        raise ValueError(f"{path} is not a readable .keras file: {e}") from e
    except (ValueError, zlib.error, EOFError) as e:  # (JSON's error, a damaged member)
        raise ValueError(f"{path}: its {INFO_MEMBER} cannot be read ({e}).") from e
    if not isinstance(record, dict):
        raise ValueError(f"{path}: its {INFO_MEMBER} is not aelib's record (a JSON object).")
    return record


def load(path: str | os.PathLike, compile: bool = True) -> Autoencoder:
    """Reloads a model saved by `save` as an `Autoencoder` bundle.

    `.config` is the variant's options, as `build_model` takes them; `.info` the whole
    stored record (training config, data settings, metrics, history, ...). A file
    an earlier aelib wrote has its saving backend's compile config: it is loaded from a
    portable copy, optimizer state included, so that it trains on under any backend.
    """
    path = _as_path(path, "load")
    info = read_info(path)
    if not info:
        raise ValueError(
            f"{path} has no {INFO_MEMBER}: it was not saved by aelib.save, so its variant "
            "is unknown. Load it with keras.models.load_model instead."
        )
    lacking = [key for key in ("name", "input_kind") if key not in info]
    if lacking:
        raise ValueError(f"{path}: its {INFO_MEMBER} lacks {', '.join(lacking)}.")
    try:
        compile_config = _compile_config(path) if compile else None
        if compile_config and portable(compile_config) != compile_config:
            with tempfile.TemporaryDirectory(prefix="aelib-load-") as folder:
                copy = Path(folder, "portable.keras")
                _copy_portable(Path(path), copy)
                model = keras.models.load_model(copy, compile=True)
        else:
            model = keras.models.load_model(path, compile=compile)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # (a damaged member)
        raise ValueError(f"{path} is not a readable .keras file: {plain_message(e)}") from e
    except (MemoryError, ImportError):  # (not the file's fault: as they are)
        raise
    except Exception as e:  # (Keras's, JSON's and h5py's words named no file: a damaged
        # config.json or weights member, one missing, weights of another model)
        if process.out_of_space(e) or getattr(e, "errno", None) == errno.ENOMEM:
            raise  # (a full /tmp while copying it: not the file's fault)
        raise ValueError(
            f"{path} is not a readable .keras file: {type(e).__name__}: {plain_message(e)}"
        ) from e
    _check_input_kind(path, info["input_kind"], model)
    options = info.get("model_config") or {}
    try:
        return Autoencoder.from_autoencoder(model, info["name"], info["input_kind"], options, info)
    except ValueError as e:  # (Keras's "No such layer: encoder")
        raise ValueError(
            f"{path} is not a model aelib.save wrote: {plain_message(e)} (an aelib model's "
            "autoencoder holds an encoder and a decoder)"
        ) from e


def _check_input_kind(path: Path, kind: Any, model: keras.Model) -> None:
    """The record's input_kind, which the jobs and figures go by, against the model's
    input: a record edited or of another file (a dense model said to be "image") was
    believed, and what read it failed far from the cause."""
    rank = {"flat": 2, "image": 4, "sequence": 3}  # (batch, 784), (batch, H, W, C), ...
    if kind not in INPUT_KINDS:
        raise ValueError(
            f"{path}: its {INFO_MEMBER} says input_kind {kind!r}; expected one of {INPUT_KINDS}."
        )
    shape = model.input_shape
    if not isinstance(shape, tuple) or len(shape) != rank[kind]:
        raise ValueError(
            f"{path}: its {INFO_MEMBER} says input_kind {kind!r}, which takes input of "
            f"{rank[kind]} dimensions, but its model takes {shape}: the record is not of "
            "this model."
        )


def _compile_config(path: str | os.PathLike) -> dict | None:
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read(CONFIG_MEMBER)).get("compile_config")


def _version() -> str:
    from aelib import __version__

    return __version__
