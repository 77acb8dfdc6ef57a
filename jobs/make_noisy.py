"""Writes noisy MNIST test digits as PNG files (and their clean references).

    python jobs/make_noisy.py --data /work/shared/data/mnist.npz --count 2000 \
        --out /tmp/digits/noisy --clean-out /tmp/digits/clean --corrupt 3

Image `i` is test digit `i % 10000` with the tutorial's Gaussian noise
(`aelib.data.add_noise`, seeded, so the same command writes the same files).
Files go to `OUT/<label>/<i:06d>.png` (ten nested folders) and the clean digit
to the same relative path under `--clean-out`, which is what `jobs/denoise.py
--clean` expects. `--corrupt K` adds K broken files under `OUT/broken/`: a
truncated PNG, random bytes named `.png`, and a text file, in turn. Files
already there are kept (a noisy file if it is not empty, a clean one as it is),
so a rerun (or a larger `--count`) only writes what is missing.

This script needs neither Ray nor TensorFlow: NumPy and Pillow only, and Keras
only to download MNIST when neither --data nor $AELIB_MNIST names a file.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def _load_data_lib():
    """aelib.data without running aelib/__init__ (which imports Keras/TensorFlow, ~5 s)."""
    spec = importlib.util.find_spec("aelib")
    if spec is None:  # a lone copy of this script: use the repository beside it
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        spec = importlib.util.find_spec("aelib")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("aelib is not importable: install it or run from the repository.")
    path = Path(spec.submodule_search_locations[0]) / "data.py"
    module_spec = importlib.util.spec_from_file_location("_aelib_data", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


data_lib = _load_data_lib()

MNIST_TEST_SIZE = 10_000
_CHUNK = 10_000


def png_bytes(image: np.ndarray) -> bytes:
    """Encodes a uint8 (H, W) array as a grayscale PNG."""
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _write(path: Path, payload: bytes) -> None:
    """Writes `payload` to `path` atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def relative_path(index: int, label: int) -> str:
    return f"{label}/{index:06d}.png"


def make_noisy(
    data: str | None,
    count: int,
    out: str | os.PathLike,
    clean_out: str | os.PathLike | None = None,
    noise_factor: float = 0.5,
    seed: int = 0,
    corrupt: int = 0,
) -> dict[str, int]:
    """Writes `count` noisy digits (and clean references) plus `corrupt` broken files.

    Returns:
        Counts: `written` (new noisy files), `kept` (already there), `corrupt`.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0. Received: count={count}")
    if corrupt < 0:
        raise ValueError(f"corrupt must be >= 0. Received: corrupt={corrupt}")
    (_, _), (x_test, y_test) = data_lib.load_mnist(data)
    out = Path(out)
    clean_root = Path(clean_out) if clean_out else None
    written = kept = 0
    for start in range(0, count, _CHUNK):
        index = np.arange(start, min(count, start + _CHUNK))
        clean = x_test[index % MNIST_TEST_SIZE]
        # One seed per chunk: reproducible, and chunks never share noise.
        noisy = data_lib.add_noise(data_lib.scale(clean), noise_factor, seed=seed + start)
        noisy = np.round(noisy * 255.0).astype(np.uint8)
        for i, image, ref in zip(index, noisy, clean, strict=True):
            rel = relative_path(int(i), int(y_test[i % MNIST_TEST_SIZE]))
            target = out / rel
            if target.is_file() and target.stat().st_size > 0:
                kept += 1
            else:
                _write(target, png_bytes(image))
                written += 1
            if clean_root is not None and not (clean_root / rel).is_file():
                _write(clean_root / rel, png_bytes(ref))
    good = png_bytes(np.zeros((28, 28), np.uint8))
    rng = np.random.default_rng(seed)
    for k in range(corrupt):
        kind = k % 3
        if kind == 0:
            _write(out / "broken" / f"truncated_{k}.png", good[: len(good) // 2])
        elif kind == 1:
            _write(out / "broken" / f"garbage_{k}.png", rng.bytes(200))
        else:
            _write(out / "broken" / f"notes_{k}.txt", b"not an image\n")
    return {"written": written, "kept": kept, "corrupt": corrupt}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", default=None, help="mnist.npz (default: $AELIB_MNIST, then Keras's download)"
    )
    parser.add_argument("--count", type=int, required=True, help="number of noisy digits")
    parser.add_argument("--out", required=True, help="folder for the noisy PNGs")
    parser.add_argument("--clean-out", default=None, help="folder for the clean references")
    parser.add_argument("--noise-factor", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corrupt", type=int, default=0, help="broken files to add")
    args = parser.parse_args(argv)
    try:
        counts = make_noisy(
            args.data,
            args.count,
            args.out,
            args.clean_out,
            args.noise_factor,
            args.seed,
            args.corrupt,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # RuntimeError: offline
        print(f"make_noisy: error: {e}", file=sys.stderr)
        return 2
    print(f"make_noisy: {counts} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
