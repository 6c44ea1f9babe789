"""Shared start of the workflow scripts: output to the job's log file.

Snakemake puts this folder on ``sys.path`` for ``script:`` jobs, so the scripts import this module by name;
they import the undiffuse package installed in the job's environment (rules/common.smk explains).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path


@contextmanager
def logged_to(log_path: str) -> Iterator[logging.Logger]:
    """Send stdout, stderr, warnings, Python logging and tracebacks of the block to ``log_path``.

    A step that succeeds ends its log with its wall time and peak memory (``undiffuse.memory.peak_rss_mb``:
    exact, where snakemake's benchmark files sample memory every 30 s). An exception is written to the log and
    raised again, so that snakemake marks the job as failed. SIGTERM
    (snakemake or the scheduler stopping the job) becomes ``SystemExit``, so that ``atomic_path`` removes
    its temporary files on the way out.
    """
    started = time.perf_counter()
    signal.signal(signal.SIGTERM, _exit_on_signal)
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", buffering=1) as log, redirect_stdout(log), redirect_stderr(log):
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        try:
            yield logging.getLogger("undiffuse.workflow")
            from undiffuse.memory import peak_rss_mb

            logging.getLogger("undiffuse.workflow").info(
                "step finished in %.1f s, peak memory %.0f MB", time.perf_counter() - started, peak_rss_mb()
            )
        except BaseException:
            logging.getLogger("undiffuse.workflow").exception("step failed")
            raise
        finally:
            root.removeHandler(handler)


def _exit_on_signal(signum: int, frame: object) -> None:
    sys.exit(128 + signum)
