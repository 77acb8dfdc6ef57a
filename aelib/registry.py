"""One registry of named autoencoder variants (timm-style).

Each variant is a decorated builder whose function name is its public name.
Its keyword defaults are the variant's config; callers override any of them.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable
from typing import Any

import keras

_REGISTRY: dict[str, Callable[..., Autoencoder]] = {}

# How a variant wants its MNIST digits: flat 784-vectors, (28, 28, 1) images,
# or 28 time steps of 28 features.
INPUT_KINDS = ("flat", "image", "sequence")


@dataclasses.dataclass
class Autoencoder:
    """The three Keras models of one variant, built from the same layers.

    `autoencoder` is `decoder(encoder(x))` by construction: it is a functional
    model whose two layers are the nested `encoder` and `decoder` models.
    """

    name: str
    autoencoder: keras.Model
    encoder: keras.Model
    decoder: keras.Model
    input_kind: str
    config: dict[str, Any]

    @classmethod
    def from_autoencoder(
        cls, model: keras.Model, name: str, input_kind: str, config: dict[str, Any]
    ) -> Autoencoder:
        """Rebuilds the bundle from a (reloaded) autoencoder model."""
        return cls(
            name=name,
            autoencoder=model,
            encoder=model.get_layer("encoder"),
            decoder=model.get_layer("decoder"),
            input_kind=input_kind,
            config=config,
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
            # JSON-native (tuples become lists) so a reloaded config equals this one.
            config = json.loads(json.dumps({**defaults, **overrides}))
            encoder, decoder = fn(**config)
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
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}. Valid names: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def _import_models() -> None:
    # Importing the modules runs their @register_model decorators.
    from aelib import models  # noqa: F401
