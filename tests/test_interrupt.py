"""SIGTERM at random points of ``undiffuse prepare`` and ``undiffuse correct`` (issue 13).

Each trial starts the command in a fresh process, sends it SIGTERM after a random delay (anywhere from
start-up to past the end of a full run), and checks that no partial output is left: no ``.partial``
temporary file, and the outputs are either absent or complete and identical to an uninterrupted run. A rerun
into the same folder then gives outputs identical to the uninterrupted run.

The processes are forked from a server that has the scientific stack imported already
(``multiprocessing``'s forkserver), so a trial costs the command's own work, not Python's start-up.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from undiffuse.cli import main

pytestmark = pytest.mark.slow

TRIALS = 10  # per command: 20 in all

#: Exit statuses of a trial: finished before the signal, stopped by undiffuse's handler, or stopped by the
#: default action of SIGTERM when the signal came before the command had started (nothing written yet).
STOPPED = (0, 128 + signal.SIGTERM, -signal.SIGTERM)
PRELOAD = [
    "undiffuse.cli",
    "undiffuse.prepare",
    "undiffuse.correct",
    "anndata",
    "scanpy",
    "torch",
    "matplotlib",
]


#: A short correction: the test is about stopping, not about the result.
FAST_CORRECTION = "correct:\n  epochs: 1\n  em_iterations: 5\n  tail_iterations: 1\n  weights: {image: 0.0}\n"


@pytest.fixture(scope="module")
def context():
    """A forkserver with the stack imported and one thread per process (the machine has 2 cores)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        warm = ctx.Process(target=int)  # starts the server, which keeps the environment it started with
        warm.start()
        warm.join()
    finally:
        if previous is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = previous
    return ctx


def _run(ctx, argv: list[str], delay: float | None) -> tuple[int | None, float]:
    """Run ``undiffuse argv`` in a forked process; SIGTERM it after ``delay`` seconds (None: let it finish)."""
    process = ctx.Process(target=main, args=(argv,))
    started = time.perf_counter()
    process.start()
    if delay is not None:
        process.join(delay)
        if process.is_alive():
            os.kill(process.pid, signal.SIGTERM)
    process.join(120)
    assert not process.is_alive(), "the command did not stop after SIGTERM"
    return process.exitcode, time.perf_counter() - started


def _partials(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.name.endswith(".partial")]


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _same_correction(path: Path, reference: Path) -> bool:
    """Bitwise equal files: the correction stores nothing that changes from run to run."""
    return path.read_bytes() == reference.read_bytes()


def test_sigterm_during_prepare_leaves_nothing_partial(context, tiny_sample, tmp_path):
    rng = np.random.default_rng(13)
    reference = tmp_path / "reference"
    status, duration = _run(
        context, ["prepare", str(tiny_sample / "outs"), str(reference), "--min-counts", "1"], None
    )
    assert status == 0
    expected = _files(reference)
    assert {"prepared.h5ad", "qc/qc.json"} <= set(expected)
    for trial in range(TRIALS):
        outdir = tmp_path / f"trial{trial}"
        argv = ["prepare", str(tiny_sample / "outs"), str(outdir), "--min-counts", "1"]
        status, _ = _run(context, argv, float(rng.uniform(0, 1.1 * duration)))
        assert status in STOPPED
        assert not _partials(tmp_path)
        left = _files(outdir) if outdir.exists() else {}
        assert left in ({}, expected), f"trial {trial}: partial output {sorted(left)}"
        assert _run(context, argv, None)[0] == 0
        assert _files(outdir) == expected
        shutil.rmtree(outdir)


def test_sigterm_during_correct_leaves_nothing_partial(context, tiny_sample, tmp_path):
    from undiffuse.prepare import prepare_sample

    rng = np.random.default_rng(31)
    prepare_sample(tiny_sample / "outs", tmp_path / "prepared", min_counts=1)
    prepared = tmp_path / "prepared" / "prepared.h5ad"
    reference = tmp_path / "reference.h5ad"
    base = ["correct", str(prepared)]
    config = tmp_path / "config.yaml"
    config.write_text(FAST_CORRECTION)
    options = ["--config", str(config), "--device", "cpu", "--quiet"]
    status, duration = _run(context, [*base, str(reference), *options], None)
    assert status == 0 and reference.is_file()
    for trial in range(TRIALS):
        output = tmp_path / f"trial{trial}" / "corrected.h5ad"
        argv = [*base, str(output), *options]
        status, _ = _run(context, argv, float(rng.uniform(0, 1.1 * duration)))
        assert status in STOPPED
        assert not _partials(tmp_path)
        if output.exists():
            assert _same_correction(output, reference), f"trial {trial}: incomplete output"
        assert _run(context, argv, None)[0] == 0
        assert _same_correction(output, reference)
        assert not _partials(tmp_path)
