"""Writes noisy MNIST test digits as PNG files (and their clean references).

    python jobs/make_noisy.py --data /work/shared/data/mnist.npz --count 2000 \
        --out /tmp/digits/noisy --clean-out /tmp/digits/clean --corrupt 3

Image `i` is test digit `i % N` (N: the file's test digits, MNIST's 10,000) with the
tutorial's Gaussian noise (`aelib.data.add_noise`, seeded, so the same command writes
the same files), written as 8-bit PNGs (a file of float digits in [0, 1], which aelib
also reads, gives the same PNGs as its 8-bit values would).
Files go to `OUT/<label>/<i:06d>.png` (ten nested folders) and the clean digit
to the same relative path under `--clean-out`, which is what `jobs/denoise.py
--clean` expects. `--corrupt K` adds K broken files under `OUT/broken/`: a
digit's PNG cut off inside its pixel data (it opens, then fails to load), random bytes
named `.png`, and a text file, in turn. Files
already there are kept (a noisy file if it is not empty, a clean one as it is),
so a rerun (or a larger `--count`) only writes what is missing. Each folder
records what its digits were made with (`.make_noisy.json`: the noise factor, seed
and data; a hidden file, which image jobs leave out), and a rerun with other
settings is refused instead of keeping digits that are not what it asked for (as is a
noisy folder given as `--clean-out`, or a clean one as `--out`).

This script needs neither Ray nor TensorFlow: NumPy and Pillow only, and Keras
only to download MNIST when neither --data nor $AELIB_MNIST names a file.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def _load_aelib(name: str):
    """aelib.<name> (data, process: no Keras) without running aelib/__init__ (which
    imports Keras/TensorFlow, ~5 s)."""
    spec = importlib.util.find_spec("aelib")
    if spec is None:  # a lone copy of this script: use the repository beside it
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        spec = importlib.util.find_spec("aelib")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("aelib is not importable: install it or run from the repository.")
    path = Path(spec.submodule_search_locations[0]) / f"{name}.py"
    module_spec = importlib.util.spec_from_file_location(f"_aelib_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


data_lib = _load_aelib("data")
process = _load_aelib("process")

_CHUNK = 10_000
SETTINGS = ".make_noisy.json"  # in each folder: what its digits were made with
_LAYOUT = re.compile(r"(\d)/(\d{6})\.png")  # relative_path's: LABEL/INDEX.png
_TEMP_FILES = (  # _write's temp files (process.replaced's .STEM.PID.tmp.SUFFIX)
    r"\.(?:\d{6,}|(?:truncated|garbage)_\d+|notes_\d+|\.make_noisy)\.(\d+)\.tmp"
    r"(?:\.(?:png|txt|json))?"
)


def png_bytes(image: np.ndarray) -> bytes:
    """Encodes a uint8 (H, W) array as a grayscale PNG."""
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _write(path: Path, payload: bytes) -> None:
    """Writes `payload` to `path` atomically (temp file, then rename)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with process.replaced(path, clean=False) as tmp:  # (cleaned once, below)
            tmp.write_bytes(payload)
    except OSError as e:  # (a full disk's error names no file: main() names this one)
        e.filename = e.filename or str(path)
        raise


def _written(path: Path) -> bool:
    """Whether `path` holds a file a rerun keeps: one of some bytes (an empty one, of a
    disk that filled or a user's `: > file`, is written again)."""
    return path.is_file() and path.stat().st_size > 0


def _remove_stale_temp_files(folder: Path) -> None:
    """Removes the temp files (see _write) under `folder` of runs no longer running."""
    for root, _, _ in os.walk(folder):
        # (.NAME.PID.tmp.png/.json/.txt, and .NAME.PID.tmp before, of the names _write
        # writes: digits, broken files, the record. The folders may hold the user's own
        # files, and a hidden ".notes.123.tmp.txt" of theirs is none of ours)
        process.remove_dead_temp_files(root, _TEMP_FILES)


def chunk_seed(seed: int, chunk: int) -> int:
    """The noise seed of the `chunk`-th 10,000 digits, drawn from (seed, chunk): the
    same each run, and no two chunks share noise, of one --seed or of two (seed +
    10,000 * chunk gave --seed 10000 the noise of --seed 0's second pass over the
    same digits: the same images)."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


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
        Counts: `written` (new noisy files), `kept` (already there), with a `--clean-out`
        `clean_written` (new clean references: a rerun that adds a `--clean-out` writes them
        all while its noisy files are kept, and said "written: 0"), `corrupt`, and `others`:
        the files in `out` this run did not ask for (of an earlier run with a larger
        `count` or `corrupt`: a rerun never removes any, and "kept: 100" read as if the
        folder held 100 digits; the denoise job takes them all), with a note naming one.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0. Received: count={count}")
    if corrupt < 0:
        raise ValueError(f"corrupt must be >= 0. Received: corrupt={corrupt}")
    data_lib.check_noise_factor(noise_factor)  # (before a folder records it: NaN too)
    if seed < 0:
        raise ValueError(f"seed must be >= 0. Received: seed={seed}")
    if data is not None and not str(data).strip():  # ("" fell back to $AELIB_MNIST)
        raise ValueError("--data is empty: expected the path of mnist.npz")
    for flag, folder in (("--out", out), ("--clean-out", clean_out)):
        if folder is not None and not str(folder).strip():  # ("" wrote into the current
            raise ValueError(f"{flag} is empty: expected a folder.")  # folder, or none)
    (_, _), (x_test, y_test) = data_lib.load_mnist(data)
    n_test = len(x_test)  # (a file of other digits may hold fewer than MNIST's 10,000)
    out = Path(out).expanduser()  # (--out=~/x: the shell leaves that ~ to the program)
    clean_root = Path(clean_out).expanduser() if clean_out is not None else None
    digest = hashlib.sha256(x_test.tobytes() + y_test.tobytes()).hexdigest()[:16]
    # 8-bit digits for the PNGs: a file of floats in [0, 1] (or of 8-bit values in a wider
    # type, as load_mnist accepts) failed in Pillow after the record and the first files
    # were written, and the folder then refused the real data's rerun.
    x_test = np.round(data_lib.scale(x_test) * 255.0).astype(np.uint8)
    made_with = {"noise_factor": noise_factor, "seed": seed, "data_sha256": digest}
    made_with["noise_seeds"] = "SeedSequence([seed, chunk])"  # (before: seed + 10000 * chunk)

    def noisy(index: np.ndarray) -> np.ndarray:
        """The noisy digits `index` (from the start of a chunk of _CHUNK, in order)."""
        clean = data_lib.scale(x_test[index % n_test])
        seeded = chunk_seed(seed, int(index[0]) // _CHUNK)
        return np.round(data_lib.add_noise(clean, noise_factor, seed=seeded) * 255.0).astype(
            np.uint8
        )

    def path(i: int) -> str:
        return relative_path(i, int(y_test[i % n_test]))

    def noisy_digit(i: int) -> tuple[str, np.ndarray]:  # what this run writes as digit i
        return path(i), noisy(np.arange(i - i % _CHUNK, i + 1))[-1]  # (NumPy draws in order)

    claims = [(out, "--out", made_with, noisy_digit)]
    if clean_root is not None:
        clean_digit = lambda i: (path(i), x_test[i % n_test])  # noqa: E731
        claims.append((clean_root, "--clean-out", {"data_sha256": digest}, clean_digit))
    made = _check_folders(out, clean_root)
    for folder, *_ in claims:  # (before the claims: a temp file is no PNG of the folder's)
        _remove_stale_temp_files(folder)
    try:
        unrecorded = [claim for claim in claims if _claim(*claim)]  # all checked, then recorded
    except ValueError:
        process.remove_made(made)
        raise
    for folder, _, made_with, *_ in unrecorded:
        _write(folder / SETTINGS, json.dumps(made_with).encode())
    written = kept = clean_written = 0
    asked: set[str] = set()  # (what this run writes or keeps: the rest of `out` is others)
    for start in range(0, count, _CHUNK):
        index = np.arange(start, min(count, start + _CHUNK))
        clean = x_test[index % n_test]
        for i, image, ref in zip(index, noisy(index), clean, strict=True):
            rel = path(int(i))
            asked.add(rel)
            if _written(out / rel):
                kept += 1
            else:
                _write(out / rel, png_bytes(image))
                written += 1
            if clean_root is not None and not _written(clean_root / rel):
                _write(clean_root / rel, png_bytes(ref))  # (an emptied one too: denoise
                clean_written += 1  # would score against a broken reference)
    digit = png_bytes(x_test[0])  # (cut in its IDAT: Pillow opens it, then fails to load it)
    rng = np.random.default_rng(seed)
    for k in range(corrupt):  # (kept too: written again, the denoise job retried them)
        kind = k % 3
        garbage = rng.bytes(200)  # (drawn for each k, so the files are the same either way)
        name, payload = (
            (f"truncated_{k}.png", digit[: len(digit) // 2]),
            (f"garbage_{k}.png", garbage),
            (f"notes_{k}.txt", b"not an image\n"),
        )[kind]
        asked.add(f"broken/{name}")
        if not _written(out / "broken" / name):
            _write(out / "broken" / name, payload)
    others = sorted(rel for rel in _visible_files(out) if rel not in asked)
    if others:
        print(
            f"make_noisy: note: {out} also holds {len(others)} file(s) this run did not ask "
            f"for (e.g. {others[0]}: from an earlier run with a larger --count or --corrupt, "
            "or not this script's), which the denoise job takes as inputs too; remove the "
            "folder and run again to have only these",
            file=sys.stderr,
        )
    counts = {"written": written, "kept": kept}
    if clean_root is not None:
        counts["clean_written"] = clean_written
    return {**counts, "corrupt": corrupt, "others": len(others)}


def _visible_files(folder: Path) -> list[str]:
    """The files under `folder` as POSIX relative paths, without hidden ones (the record,
    temp files), as the denoise job lists a folder."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(root).relative_to(folder)
        found += [(rel / f).as_posix() for f in files if not f.startswith(".")]
    return found


def _check_folders(out: Path, clean_root: Path | None) -> list[Path]:
    """Each a folder (or one to create) that this process can make, and apart. Returns
    the folders it made, deepest first."""
    if clean_root is not None:
        a, b = out.resolve(), clean_root.resolve()
        if a == b or a in b.parents or b in a.parents:
            raise ValueError(
                f"--out {out} and --clean-out {clean_root} overlap: the noisy and the clean "
                "digits have the same relative paths. Choose separate folders."
            )
    folders = [(flag, f) for flag, f in (("--out", out), ("--clean-out", clean_root)) if f]
    for flag, folder in folders:
        taken = process.nearest_existing(folder)
        if not taken.is_dir():
            what = _not_folder(taken)
            raise ValueError(f"{flag} {folder}: {taken} is {what}; expected a folder.")
    made: list[Path] = []  # removed again if a folder is refused: a refusal leaves nothing
    try:
        for flag, folder in folders:
            try:
                process.make_folder(folder, made)
            except OSError as e:
                raise ValueError(f"{flag} {folder}: cannot create it ({e.strerror or e}).") from e
            try:  # (before either folder records its settings)
                with tempfile.TemporaryFile(dir=folder):
                    pass
            except OSError as e:
                raise ValueError(f"{flag} {folder}: cannot write there ({e.strerror or e}).") from e
    except ValueError:
        process.remove_made(made)
        raise
    return made


def _not_folder(path: Path) -> str:
    """What `path`, which is there and no folder, is instead."""
    if path.is_symlink() and not path.exists():
        return f"a link to {os.readlink(path)}, which does not exist"
    return "a file"


def _claim(folder: Path, flag: str, made_with: dict, digit) -> bool:
    """Whether `folder` needs its record of what its digits are made with written.
    Refuses a folder made with other settings (a rerun keeps the files there), or
    holding the other kind of digits (noisy ones as the clean references). A folder of
    digits with no record (made before the record) is taken, with a note, and recorded
    if its first digit is what this run would write there (`digit(i)`: its relative path
    and pixels), else refused."""
    record = folder / SETTINGS
    role = "noisy digits" if "noise_factor" in made_with else "clean references"
    if record.exists() and not record.is_file():  # (its write failed, naming a temp file)
        raise ValueError(f"{record} is not a make_noisy record (not a file): remove it")
    if record.is_file():
        try:
            before = json.loads(record.read_text())
            if not isinstance(before, dict):
                raise ValueError(f"a JSON {type(before).__name__}, not an object")
        except ValueError as e:  # (json's errors are ValueErrors too)
            raise ValueError(
                f"{record} is not a make_noisy record ({e}): remove it, or the folder"
            ) from e
        held = "noisy digits" if "noise_factor" in before else "clean references"
        if held != role:  # (noisy digits taken as the clean references: denoise scored
            other = "--out" if flag == "--clean-out" else "--clean-out"  # against them)
            raise ValueError(
                f"{flag} {folder} holds {held} (an earlier run's {other}), not {role}: use "
                "another folder."
            )
        changed = [k for k in made_with if before.get(k) != made_with[k]]
        if changed:
            said = ", ".join(f"{k} {before.get(k)} (now {made_with[k]})" for k in changed)
            raise ValueError(
                f"{flag} {folder} holds digits made with other settings: {said}. A rerun "
                "keeps the files there: use another folder, or remove this one first."
            )
        return False
    pngs = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    ours = [rel for rel in pngs if _LAYOUT.fullmatch(rel)]
    if ours:  # (taken as they were, a rerun with other settings kept them without a word)
        rel = ours[0]
        i = int(_LAYOUT.fullmatch(rel)[2])
        try:
            with Image.open(folder / rel) as img:
                have = np.asarray(img.convert("L"))
        except (OSError, ValueError) as e:  # (exit 1 with Pillow's words, naming no flag)
            raise ValueError(
                f"{flag} {folder} holds digits with no record of what made them, and its "
                f"{rel} cannot be read ({e}). A rerun keeps the files there: use another "
                "folder, or remove this one first."
            ) from e
        want_rel, want = digit(i)
        if rel != want_rel or not np.array_equal(have, want):
            raise ValueError(
                f"{flag} {folder} holds digits with no record of what made them, and its "
                f"{rel} is not what these settings write there. A rerun keeps the files "
                "there: use another folder, or remove this one first."
            )
    if pngs:  # (recorded now: a rerun with other settings is refused)
        found = "its first digit is what these settings make" if ours else "none named as ours"
        print(
            f"make_noisy: note: {flag} {folder} holds PNGs with no record of what made them "
            f"({found}); they are kept as they are, and the folder is recorded as made with "
            "these settings",
            file=sys.stderr,
        )
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", default=None, help="mnist.npz (default: $AELIB_MNIST, then Keras's download)"
    )
    parser.add_argument(
        "--count",
        type=int,
        required=True,
        help="number of noisy digits; image i is test digit i %% N (N: the file's test "
        "digits, MNIST's 10,000), so past N the same digits come again with other noise",
    )
    parser.add_argument("--out", required=True, help="folder for the noisy PNGs")
    parser.add_argument("--clean-out", default=None, help="folder for the clean references")
    parser.add_argument("--noise-factor", type=float, default=0.5, help="default: 0.5")
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    parser.add_argument("--corrupt", type=int, default=0, help="broken files to add")
    args = parser.parse_args(argv)
    try:
        with process.sigterm_as_ctrl_c():  # (SIGTERM: as Ctrl-C, not a silent end)
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
    except OSError as e:  # a full disk: the files written so far are kept, a rerun adds
        if process.out_of_space(e):
            line = (
                f"out of disk space writing {e.filename or args.out} ({e.strerror or e}): "
                "free some space, then run the same command again: it keeps the files written"
            )
        else:  # (as before, now with the file: "...: a rerun: it keeps ..." read badly)
            line = f"{e} (a rerun keeps the files written)"
        print(f"make_noisy: error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: Pillow's traceback, or no word
        print(
            f"make_noisy: {process.how_stopped(e)}: a rerun keeps the files written and adds "
            "the rest",
            file=sys.stderr,
        )
        return process.exit_code(e)
    print(f"make_noisy: {counts} in {Path(args.out).expanduser()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
