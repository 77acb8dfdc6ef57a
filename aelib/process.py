"""What a run of a command does as a process: one at a time in a folder, and how it ends.

- `held`: a lock file the kernel holds (flock) for its process. It ends with the process
  however that ends, so a crash or a kill leaves nothing to clear by hand.
- `sigterm_as_ctrl_c`: SIGTERM (`kill`, a scheduler stopping the run) raises `Terminated`,
  a KeyboardInterrupt, so the run ends as on Ctrl-C: with its message, not in silence;
  `raise_if_stopped` raises either again at a safe point of a long loop.
  `record_stops_early` keeps a stop that comes before it (during imports) for it to raise.
- `in_use`: whether another process holds such a lock (without taking it).
- `out_of_space`: whether an error is a full disk (or quota).
- `broken_link`: which link on a path points nowhere; `nearest_existing`: a path, or the
  nearest folder above it that exists.
- `make_folder`: makes a folder, noting each one it made for `remove_made` to remove
  again when the run is refused: a refusal leaves nothing behind.
- `alive`: whether a process of that ID runs (the owner of a temp file, say);
  `remove_dead_temp_files`: removes the temp files of runs that no longer run.
- `replaced`: a temp file beside a path, renamed onto it once written: a reader, a
  crash or a stop never sees half a file.
- `exit_without_teardown`: a command's exit that skips the interpreter's teardown.
- `node_types`, `beyond_node_types`: the node types a cluster launcher's autoscaler may
  add, from its config, and whether none holds what a job's trial or actor asks for.

Standard library only (and PyYAML, Ray's, in `node_types` as it runs): `jobs/sweep.py`,
`jobs/make_noisy.py` and `jobs/denoise.py` load this file without importing the aelib
package (whose __init__ imports Keras).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn


class Busy(Exception):
    """Another process holds the lock; str() is what it wrote there (who it is)."""


@contextlib.contextmanager
def held(lock: str | os.PathLike, holder: str) -> Iterator[None]:
    """Holds file `lock` (made if missing) while the block runs, with `holder` written in
    it for a second process to name; raises Busy at once if another process holds it."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = os.pread(fd, 200, 0).decode(errors="replace").strip()
            raise Busy(who or "another process") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        yield
    finally:
        os.close(fd)


def in_use(lock: str | os.PathLike) -> bool:
    """Whether another process holds file `lock` (as `held` does), without taking it or
    making the file: False where there is none, or where it cannot be locked."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # (released by the close)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken as Ctrl-C is (exit_code: 143, against Ctrl-C's 130)."""


def exit_code(stop: KeyboardInterrupt) -> int:
    """The exit status of a run stopped by Ctrl-C (130) or SIGTERM (143)."""
    return 143 if isinstance(stop, Terminated) else 130


def how_stopped(stop: KeyboardInterrupt) -> str:
    """What a command's line says of a run stopped by Ctrl-C or SIGTERM."""
    return "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"


def _stop_of(signum: int) -> type[KeyboardInterrupt]:
    """What the handlers below raise for a signal: Terminated for SIGTERM."""
    return Terminated if signum == signal.SIGTERM else KeyboardInterrupt


_STOPPED: list[type[KeyboardInterrupt]] = []  # what the handlers below raised
_DEFERRED: list[str] = []  # [notice] while stops wait for raise_if_stopped (defer_stops)
_EARLY: dict = {}  # the handlers record_stops_early replaced, until sigterm_as_ctrl_c


def record_stops_early() -> None:
    """Until sigterm_as_ctrl_c's block, Ctrl-C and SIGTERM only record the stop, which
    that block then raises as it starts (a second one is raised at once). For a command
    whose imports take seconds (`aelib train`: TensorFlow's): a Ctrl-C raised inside
    them was lost (in a garbage-collector callback, say) and the run trained to its end;
    SIGTERM ended it without a word. Only in the main thread, over Python's own handlers."""
    if threading.current_thread() is not threading.main_thread() or _EARLY:
        return
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    _STOPPED.clear()
    for sig, handler in defaults.items():
        if signal.getsignal(sig) is handler:  # (not one ignored, or someone else's)
            _EARLY[sig] = handler
            signal.signal(sig, _record)


def _record(signum, frame) -> None:
    _STOPPED.append(_stop_of(signum))
    if len(_STOPPED) > 1:  # (a second stop: at once, as asked, as Python's own handler
        signal.signal(signum, _EARLY.get(signum, signal.SIG_DFL))  # does it: SIGTERM's
        os.kill(os.getpid(), signum)  # exit 143, Ctrl-C's KeyboardInterrupt)


def end_early_recording() -> None:
    """Sets Python's own handlers back where record_stops_early replaced them, for a
    command that will not reach sigterm_as_ctrl_c (`aelib models`), and raises the stop
    recorded meanwhile, if any."""
    for sig, handler in _EARLY.items():
        signal.signal(sig, handler)
    _EARLY.clear()
    stopped, _STOPPED[:] = list(_STOPPED), []
    if stopped:
        raise stopped[-1]()


def command_line(argv0: str, orig_argv: list[str]) -> bool:
    """Whether this process runs aelib's command line (`python -m aelib`, or the `aelib`
    script), from its sys.argv[0] and sys.orig_argv: not a program importing aelib
    (`python -m myproj.train` too: its sys.argv[0] is also "-m" during its imports)."""
    if os.path.basename(argv0) == "aelib":
        return True
    args = iter(orig_argv[1:])
    for arg in args:  # (Python's own options, up to -m MODULE)
        if arg == "-m" or (arg.startswith("-m") and not arg.startswith("--")):
            module = arg[2:] or next(args, "")
            return module in ("aelib", "aelib.__main__")
        if arg in ("-X", "-W"):  # (options with a value of their own)
            next(args, None)
        elif not arg.startswith("-") or arg in ("-c", "-"):  # (a script, code, stdin)
            return False
    return False


def _stop(signum, frame) -> None:
    stop = _stop_of(signum)
    _STOPPED.append(stop)
    if not _DEFERRED or len(_STOPPED) > 1:  # (a second stop: at once, as asked)
        raise stop()
    if _DEFERRED[0]:  # (os.write: a print here could land inside another one's)
        with contextlib.suppress(OSError):
            os.write(2, f"{_DEFERRED[0]}\n".encode())


def defer_stops(defer: bool, notice: str = "") -> None:
    """While deferred (until the end of sigterm_as_ctrl_c's block, or defer_stops(False)),
    Ctrl-C and SIGTERM only record the stop, for raise_if_stopped to raise at a safe
    point: raised inside TensorFlow (its training, evaluate, predict), the exception was
    lost, or the process died (SIGSEGV, a corrupted heap). The first stop writes
    `notice` to stderr (what happens now); a second one is raised at once."""
    _DEFERRED[:] = [notice] if defer else []


def raise_if_stopped() -> None:
    """Raises again what Ctrl-C or SIGTERM raised in sigterm_as_ctrl_c's block, for a
    long loop to call where it is safe: a handler's exception lands wherever the main
    thread is, and in a __del__ Python only prints it (a training went on to its end,
    then died in the interpreter's teardown)."""
    if _STOPPED:
        raise _STOPPED[-1]()


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM raises Terminated, and Ctrl-C KeyboardInterrupt, while the block runs, and
    raise_if_stopped again after either, in the block (in the main thread: elsewhere
    Python sets no handler); the handlers before are set again after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if not _EARLY:
        _STOPPED.clear()
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous.update(_EARLY)  # (not record_stops_early's: Python's own again after)
    _EARLY.clear()
    try:
        raise_if_stopped()  # (a stop record_stops_early kept)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        _STOPPED.clear()
        _DEFERRED.clear()


def out_of_space(error: BaseException) -> bool:
    """Whether `error` is a full disk or quota (ENOSPC, EDQUOT). pyarrow's file systems
    raise a plain OSError that says '[errno 28]' in its text, not in its errno."""
    codes = (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, OSError) and (
        error.errno in codes or any(f"[errno {code}]" in str(error) for code in codes)
    )


def broken_link(path: str | os.PathLike) -> Path | None:
    """The link on `path` (it, or a folder above it) that points nowhere (to a disk not
    mounted, say, or a loop of links), or None. (mkdir and makedirs said "File exists".)"""
    path = Path(path)
    return next((p for p in (path, *path.parents) if p.is_symlink() and not p.exists()), None)


def nearest_existing(path: str | os.PathLike) -> Path:
    """`path`, or the nearest folder above it that exists (a link that points nowhere
    counts: it is there, and no folder)."""
    path = Path(path)
    return next((p for p in (path, *path.parents) if os.path.lexists(p)), Path(path.anchor or "."))


def make_folder(folder: str | os.PathLike, made: list[Path]) -> None:
    """Makes `folder` and the folders above it that are missing, adding each to `made`
    (deepest first, even where mkdir fails part way) for `remove_made`."""
    folder = Path(folder).absolute()  # (one form for all, for remove_made's order)
    # Not a path whose ".." leads to a folder there: "new/../out" (new missing, out
    # there) noted /cwd/new/../out as made (mkdir makes new), and a refusal removed out.
    missing = (p for p in (folder, *folder.parents) if not os.path.lexists(p))
    made.extend(p for p in missing if not os.path.lexists(os.path.abspath(p)))
    folder.mkdir(parents=True, exist_ok=True)


def remove_made(made: list[Path]) -> None:
    """Removes the folders `make_folder` made, deepest first, where they are empty: a
    run refused before it wrote anything leaves nothing, and a folder that holds
    something stays."""
    for path in sorted(made, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir()


def alive(pid: int) -> bool:
    """Whether process `pid` runs (one of another user's does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temp_files(folder: str | os.PathLike, pattern: str) -> None:
    """Removes the files in `folder` whose names match `pattern`, a regular expression
    whose first group is the PID of the process writing them, where that process no
    longer runs: the temp files a kill -9 left (nothing else leaves one). A number
    above 2**22, Linux's largest PID, is no PID (a timestamp, say): kept."""
    regex = re.compile(pattern)
    with contextlib.suppress(OSError):  # (no folder: nothing to remove)
        for entry in os.scandir(folder):
            match = regex.fullmatch(entry.name)
            if match and int(match.group(1)) <= 2**22 and not alive(int(match.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


@contextlib.contextmanager
def replaced(path: str | os.PathLike, clean: bool = True) -> Iterator[Path]:
    """A temp path beside `path` (`.STEM.PID.tmpSUFFIX`) for the block to write, renamed
    to `path` after it and removed if the block fails: no reader, nor a run that was
    stopped or crashed, sees half a file. With `clean`, the temp files of `path` that a
    kill -9 left are removed first (`remove_dead_temp_files`; a caller writing many
    files to one folder does that once, with a pattern of its own)."""
    path = Path(path)
    if clean:
        remove_dead_temp_files(path.parent, temp_pattern(path))
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # (renamed; or never made, e.g. a read-only folder)
            tmp.unlink()


def temp_pattern(path: str | os.PathLike) -> str:
    """The `remove_dead_temp_files` pattern of `replaced`'s temp files for `path`."""
    path = Path(path)
    return rf"\.{re.escape(path.stem)}\.(\d+)\.tmp{re.escape(path.suffix)}"


def exit_without_teardown(main: Callable[[], int | str | None], usage: str = "") -> NoReturn:
    """Runs `main` and exits with its status, without tearing down the interpreter.

    With TensorFlow loaded (and Ray, pandas), the teardown took 1.5-1.7 s after `aelib
    train`'s last line on a quiet machine and 8-23 s under load, time a user or a script
    waiting on the exit status waits for nothing: by then everything is written. The
    exit handlers (atexit: Ray's, logging's) still run, and the output is flushed. A
    message `main` exits with (sys.exit("...")) is printed, status 2 where it starts
    with `usage` (a usage error, as argparse's), else 1. Errors other than SystemExit
    propagate as usual, with their traceback."""
    try:
        code = main()
    except SystemExit as e:  # argparse's errors, sys.exit("message")
        code = e.code
    if isinstance(code, str):  # what sys.exit(message) prints and returns
        print(code, file=sys.stderr)
        code = 2 if usage and code.startswith(usage) else 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # (a closed pipe: Python's own exit says 120)
            code = code or 120
    os._exit(code or 0)


# Where `ray up` leaves, on the head, the config its autoscaler reads; another file (the
# local fake cluster's, see cluster/local.py) is named by this variable.
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"
AUTOSCALING_CONFIG_ENV = "AELIB_AUTOSCALING_CONFIG"


def node_types(path: str | os.PathLike | None = None) -> tuple[str, dict] | None:
    """The autoscaling config's file and the node types its autoscaler may add ({name:
    {resource: amount}}): `path`, else $AELIB_AUTOSCALING_CONFIG, else the file `ray up`
    leaves on the head. None where there is no such file (a driver off the head, a
    cluster not of the launcher) or it does not say every type's resources: what may be
    added is then not known here."""
    path = os.path.expanduser(path or os.environ.get(AUTOSCALING_CONFIG_ENV) or LAUNCHER_CONFIG)
    try:
        import yaml  # (PyYAML: a dependency of Ray's, which runs the jobs)

        with open(path) as f:
            config = yaml.safe_load(f)
        head, most = config.get("head_node_type"), config.get("max_workers", 2)
        types = {
            name: {k: float(v) for k, v in spec["resources"].items()}
            for name, spec in config["available_node_types"].items()
            # (Ray's defaults: the head's type none, another the cluster's max_workers,
            # which caps them all)
            if most > 0 and spec.get("max_workers", 0 if name == head else most) > 0
        }
    except Exception:  # (no such file, not YAML, not such a config: not known)
        return None
    if not all(types.values()):  # (resources left to the launcher to fill in)
        return None
    return path, types


def beyond_node_types(need: dict[str, float]) -> str | None:
    """Why no node the autoscaler may add holds `need` ({"CPU": 8, "GPU": 1}: what one
    trial or actor asks for), naming the types and the file: with --allow-autoscale a job
    waited for such a node without end. None where a type holds it, or where that is not
    known (`node_types`)."""
    found = node_types()
    if found is None:
        return None
    path, types = found
    if any(all(r.get(k, 0.0) >= v for k, v in need.items() if v > 0) for r in types.values()):
        return None
    shown = "; ".join(
        f"{name}: {{{', '.join(f'{k}: {r.get(k, 0.0):g}' for k in need)}}}"
        for name, r in types.items()
    )
    return f"nor may its autoscaler add one: the node types in {path} have {shown or 'none'}"
