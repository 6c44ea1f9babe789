"""Atomic outputs: a file or folder appears under its final name only once it is complete.

A crash, a bad input or a SIGTERM/SIGINT therefore never leaves a partial output behind, and a rerun redoes
only what is missing. Temporary siblings are named ``.{name}.{pid}.XXXX.partial``; one left by a process that
is gone (killed with SIGKILL, a power cut) is removed by the next write of the same output.

:func:`check_output_path` checks that an output can be written before any work is done.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError

#: Signals held back while outputs are moved into place, so that a set of outputs is committed whole.
COMMIT_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

PARTIAL_SUFFIX = ".partial"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_partials(path: str | os.PathLike[str]) -> list[Path]:
    """Temporary siblings of ``path`` left by processes that no longer run."""
    final = Path(path)
    if not final.parent.is_dir():
        return []
    stale = []
    for candidate in final.parent.glob(f".{final.name}.*{PARTIAL_SUFFIX}"):
        # ``.{name}.{pid}.{random}.partial``: anything else (another output's name) is not ours.
        parts = candidate.name[len(final.name) + 2 : -len(PARTIAL_SUFFIX)].split(".")
        if len(parts) == 2 and parts[0].isdigit() and not _pid_alive(int(parts[0])):
            stale.append(candidate)
    return stale


def remove_stale_partials(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the leftovers of interrupted writes of ``path``; returns what was removed."""
    removed = stale_partials(path)
    for leftover in removed:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return removed


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGTERM, SIGINT and SIGHUP back for the duration of the block (main thread only).

    A signal that arrives meanwhile is raised again when the block ends, so the work of the block is either
    not started or complete. The handlers are swapped (rather than the signals masked) because a signal sent
    to the process may be delivered to any of its threads (PyTorch's, OpenMP's).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def record(signum: int, frame: object) -> None:
        received.append(signum)

    previous = {}
    for sig in COMMIT_SIGNALS:
        handler = signal.getsignal(sig)
        if handler is not None:  # None: installed outside Python, left alone
            previous[sig] = signal.signal(sig, record)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(received):
            signal.raise_signal(sig)


def _permissions(tmp: Path) -> None:
    # mkdtemp creates 0700 folders; give the output the permissions any new folder would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)


@contextmanager
def atomic_paths(outputs: Sequence[tuple[str | os.PathLike[str], bool]]) -> Iterator[list[Path]]:
    """Several outputs that appear together: yield one temporary path per ``(path, is_directory)``.

    When the block succeeds, all are moved into place with SIGTERM/SIGINT held back, so an interruption
    leaves either all of them (complete) or none of the new ones; on an exception every temporary file is
    removed and the final paths are left as they were.
    """
    finals = [(Path(path), bool(directory)) for path, directory in outputs]
    tmps: list[Path] = []
    targets: list[Path] = []
    try:
        # Signals wait while the temporary folders are made, so that none is made without being recorded.
        with signals_deferred():
            for final, directory in finals:
                final.parent.mkdir(parents=True, exist_ok=True)
                remove_stale_partials(final)
                # Keep the real suffix last, so that writers that dispatch on it (anndata, matplotlib) still
                # work.
                tmp = Path(
                    tempfile.mkdtemp(
                        prefix=f".{final.name}.{os.getpid()}.", suffix=PARTIAL_SUFFIX, dir=final.parent
                    )
                )
                tmps.append(tmp)
                targets.append(tmp if directory else tmp / final.name)
        yield targets
        with signals_deferred():
            _raise_if_stopped()
            for (final, directory), tmp, target in zip(finals, tmps, targets, strict=True):
                _permissions(tmp)
                if directory:
                    if final.is_dir() and not final.is_symlink():
                        shutil.rmtree(final)
                    elif final.exists() or final.is_symlink():
                        final.unlink()
                    os.replace(tmp, final)
                else:
                    os.replace(target, final)
                    shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        with signals_deferred():
            for tmp in tmps:
                shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; move it to ``path`` when the block succeeds.

    On an exception (SIGTERM included, once :func:`exit_on_signals` is in force) the temporary file or
    folder is removed and ``path`` is left as it was. Leftovers of earlier interrupted writes are removed.

    Examples
    --------
    >>> with atomic_path("out/table.tsv") as tmp:  # doctest: +SKIP
    ...     frame.to_csv(tmp, sep="\\t")
    """
    with atomic_paths([(path, directory)]) as (tmp,):
        yield tmp


#: The stop signal received under :func:`exit_on_signals`, if any.
_stop_signal: int | None = None


def _exit_on_signal(signum: int, frame: object) -> None:
    global _stop_signal
    _stop_signal = signum
    raise SystemExit(128 + signum)


def _raise_if_stopped() -> None:
    # A SystemExit raised inside a finaliser or weakref callback is printed and ignored by Python; the flag
    # makes sure that such a stop request still prevents the outputs from being committed.
    if _stop_signal is not None:
        raise SystemExit(128 + _stop_signal)


@contextmanager
def exit_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into ``SystemExit(128 + signum)`` (SIGINT already raises
    ``KeyboardInterrupt``), so that ``atomic_path`` cleans up when a command is stopped."""
    global _stop_signal
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _stop_signal = None
    previous = {sig: signal.signal(sig, _exit_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop_signal = None


def check_output_path(path: str | os.PathLike[str], *, directory: bool = False, what: str = "output") -> Path:
    """Check, before any work, that ``path`` can be written; raise :class:`InputError` naming it if not.

    Catches an output that is a folder where a file is expected (or the reverse), a parent that is a file,
    and a place that is read-only or otherwise not writable (tested by creating and removing a file).
    """
    final = Path(path)
    if directory and final.exists() and not final.is_dir():
        raise InputError(final, f"the {what} folder is a file; remove it or choose another folder")
    if not directory and final.is_dir():
        raise InputError(final, f"the {what} is a folder; give a file name instead")
    ancestor = final.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(
            final, f"cannot be created: {ancestor} is a file, not a folder; choose another {what} path"
        )
    try:
        probe = tempfile.NamedTemporaryFile(prefix=".undiffuse-write-test.", dir=ancestor)
        probe.close()
    except OSError as err:
        reason = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}.get(
            err.errno, err.strerror or str(err)
        )
        raise InputError(
            final,
            f"cannot be written: {ancestor} does not accept new files ({reason}); choose a writable {what} path",
        ) from err
    return final
