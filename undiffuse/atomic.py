"""Atomic outputs: a file or folder appears under its final name only once it is complete.

A crash or a bad input therefore never leaves a partial output behind, and a rerun redoes only what is
missing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; move it to ``path`` when the block succeeds.

    On an exception the temporary file or folder is removed and ``path`` is left as it was.

    Examples
    --------
    >>> with atomic_path("out/table.tsv") as tmp:  # doctest: +SKIP
    ...     frame.to_csv(tmp, sep="\\t")
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffix last, so that writers that dispatch on it (anndata, matplotlib) still work.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    target = tmp if directory else tmp / final.name
    try:
        yield target
        # mkdtemp creates 0700 folders; give the output the permissions any new folder would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if directory:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        else:
            os.replace(target, final)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
