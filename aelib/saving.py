"""Saving a variant as one `.keras` file that carries what produced it.

The file is Keras's own format (reloads with `keras.models.load_model` after
`import aelib`, safe_mode on) plus one extra member, `aelib.json`, holding the
variant name, its input kind, the full training config, data settings, final
metrics and library versions. Keras ignores members it does not know.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import keras

from aelib.registry import Autoencoder

INFO_MEMBER = "aelib.json"


def save(model: Autoencoder, path: str | os.PathLike, info: dict[str, Any] | None = None) -> Path:
    """Writes `model.autoencoder` to `path` (.keras) atomically, with its info.

    Returns:
        The path written.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"Model path must end in .keras. Received: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target, then rename: a crash never leaves half a file.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.keras")
    record = {
        "name": model.name,
        "input_kind": model.input_kind,
        "model_config": model.config,
        "versions": {
            "aelib": _version(),
            "keras": keras.__version__,
            "backend": keras.backend.backend(),
        },
        **(info or {}),
    }
    try:
        model.autoencoder.save(tmp)
        with zipfile.ZipFile(tmp, "a") as zf:
            zf.writestr(INFO_MEMBER, json.dumps(record, indent=2, default=_json_default))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """The aelib record stored in a `.keras` file ({} for a plain Keras file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Model file not found: {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            if INFO_MEMBER not in zf.namelist():
                return {}
            return json.loads(zf.read(INFO_MEMBER))
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a .keras file (not a zip archive): {e}") from e


def load(path: str | os.PathLike, compile: bool = True) -> Autoencoder:
    """Reloads a model saved by `save` as an `Autoencoder` bundle.

    `.config` holds the whole stored record (training config, metrics, ...).
    """
    info = read_info(path)
    if "name" not in info:
        raise ValueError(
            f"{path} has no {INFO_MEMBER}: it was not saved by aelib.save, so its variant "
            "is unknown. Load it with keras.models.load_model instead."
        )
    model = keras.models.load_model(path, compile=compile)
    return Autoencoder.from_autoencoder(model, info["name"], info["input_kind"], info)


def _version() -> str:
    from aelib import __version__

    return __version__


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"Not JSON serialisable: {type(obj).__name__}")
