"""One registry of named autoencoder variants (timm-style).

Each variant is a decorated builder whose function name is its public name.
Its keyword defaults are the variant's config; callers override any of them.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import numbers
import os
import re
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

_REGISTRY: dict[str, Callable[..., Autoencoder]] = {}

# How a variant wants its MNIST digits: flat 784-vectors, (28, 28, 1) images,
# or 28 time steps of 28 features.
INPUT_KINDS = ("flat", "image", "sequence")


@dataclasses.dataclass
class Autoencoder:
    """The three Keras models of one variant, built from the same layers.

    `autoencoder` is `decoder(encoder(x))` by construction: it is a functional
    model whose two layers are the nested `encoder` and `decoder` models.
    `config` is the variant's options (`build_model(name, **config)` builds it
    again); `info` is what `aelib.save` stored with a reloaded one (training config,
    data settings, metrics, history, versions); for one `aelib.train` returns, its run's
    record (training config, data settings, metrics, history: the fields `aelib.save`
    adds, name, input_kind, model_config and versions, are not in it); empty for one just
    built.
    """

    name: str
    autoencoder: keras.Model
    encoder: keras.Model
    decoder: keras.Model
    input_kind: str
    config: dict[str, Any]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_autoencoder(
        cls,
        model: keras.Model,
        name: str,
        input_kind: str,
        config: dict[str, Any],
        info: dict[str, Any] | None = None,
    ) -> Autoencoder:
        """Rebuilds the bundle from a (reloaded) autoencoder model."""
        return cls(
            name=name,
            autoencoder=model,
            encoder=model.get_layer("encoder"),
            decoder=model.get_layer("decoder"),
            input_kind=input_kind,
            config=config,
            info=info or {},
        )


def register_model(input_kind: str) -> Callable:
    """Registers a builder under its function name.

    Args:
        input_kind: one of `INPUT_KINDS`, how the variant reads MNIST.
    """
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind must be one of {INPUT_KINDS}. Received: {input_kind!r}")

    def decorator(fn: Callable[..., tuple[keras.Model, keras.Model]]) -> Callable:
        defaults = {
            k: p.default
            for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty
        }

        def build(**overrides: Any) -> Autoencoder:
            unknown = sorted(set(overrides) - set(defaults))
            if unknown:
                raise ValueError(
                    f"Unknown option(s) {unknown} for model {fn.__name__!r}. "
                    f"Valid options: {sorted(defaults)}"
                )
            for key, value in overrides.items():
                _check_option(fn.__name__, key, value, defaults[key])
            # JSON-native (tuples become lists, NumPy numbers Python's) so a reloaded
            # config equals this one.
            config = json.loads(json.dumps({**defaults, **overrides}, default=json_default))
            try:
                encoder, decoder = fn(**config)
            except (TypeError, ValueError) as e:  # name the options, not only Keras's words
                raise ValueError(
                    f"Model {fn.__name__!r} cannot be built with {options_text(overrides)}: "
                    f"{plain_message(e)}"
                ) from e
            inputs = keras.Input(shape=encoder.input_shape[1:], name="input")
            outputs = decoder(encoder(inputs))
            autoencoder = keras.Model(inputs, outputs, name=f"{fn.__name__}_autoencoder")
            return Autoencoder(fn.__name__, autoencoder, encoder, decoder, input_kind, config)

        build.defaults = defaults
        build.input_kind = input_kind
        build.__doc__ = fn.__doc__
        _REGISTRY[fn.__name__] = build
        return fn

    return decorator


def json_default(obj: Any) -> Any:
    """JSON for what `json` does not take: NumPy arrays and numbers, paths."""
    if hasattr(obj, "tolist"):  # NumPy arrays, and numbers (whose tolist is .item())
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"Not JSON serialisable: {type(obj).__name__}")


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float as None: JSON has no NaN (Python writes
    a bare `NaN` token, which jq and JavaScript refuse)."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, np.ndarray):  # (json_default's lists: of NaN too)
        return finite(value.tolist())
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None
    return value


def is_int(value: Any) -> bool:
    """An int (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float (numpy's too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def options_text(overrides: dict[str, Any]) -> str:
    """Model options as an error names them: `depth=3, skips=True`."""
    return ", ".join(f"{k}={v!r}" for k, v in overrides.items()) or "its defaults"


def _is_size(key: str) -> bool:
    """Keras's sizes (`kernel_size`, `pool_size`) take an int or one per dimension; an
    int option of any other name (`filters`, `depth`) takes one int."""
    return key.endswith("_size")


def _kind(value: Any, key: str = "") -> str | None:
    """What an option's default says its values must be: None where it says nothing."""
    if isinstance(value, bool):
        return "a bool (True or False)"
    if isinstance(value, numbers.Integral):
        return "an int (or a tuple of ints)" if _is_size(key) else "an int"
    if isinstance(value, numbers.Real):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return None


def _fits(value: Any, default: Any, size: bool = False) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, numbers.Integral):  # a size: or one per dimension, as Keras's
        if size and isinstance(value, (tuple, list)):
            return bool(value) and all(_fits(v, default) for v in value)
        return is_int(value)
    if isinstance(default, numbers.Real):
        return is_number(value)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list)) and all(
            _fits(v, default[0]) for v in value if default
        )
    return True


def _check_option(model: str, key: str, value: Any, default: Any) -> None:
    """An override of the default's kind: `filters=5` where the default is a tuple of
    three ints fails here, naming the option, rather than deep in the builder."""
    if _fits(value, default, _is_size(key)):
        return
    if isinstance(default, (tuple, list)):
        expected = f"a tuple like {tuple(default)!r}"
    else:
        expected = _kind(default, key)
    raise ValueError(
        f"Option {key} of model {model!r} must be {expected}. Received: {key}={value!r}"
    )


def plain_message(e: BaseException) -> str:
    """An exception's message without the terminal colour codes Keras puts in some."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()


def list_models() -> list[str]:
    """Returns the registered variant names, in registration order."""
    _import_models()
    return list(_REGISTRY)


def model_defaults(name: str) -> dict[str, Any]:
    """Returns the default config of variant `name`."""
    return dict(_get(name).defaults)


def model_input_kind(name: str) -> str:
    return _get(name).input_kind


def build_model(name: str, **overrides: Any) -> Autoencoder:
    """Builds variant `name` with its defaults, overridden by `overrides`.

    Raises:
        ValueError: for an unknown name (listing the valid ones) or option.
    """
    return _get(name)(**overrides)


def _get(name: str) -> Callable[..., Autoencoder]:
    _import_models()
    if not isinstance(name, str) or name not in _REGISTRY:  # (a list: "unhashable type")
        raise ValueError(f"Unknown model {name!r}. Valid names: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def _import_models() -> None:
    # Importing the modules runs their @register_model decorators.
    from aelib import models  # noqa: F401
