"""Run ``correct`` of this checkout or of an earlier version on the same data, each in a process of its own.

The earlier version is checked out from this repository's history (``git worktree``) into a scratch folder and
imported from there in a child process, so that both versions run on one machine under the same load and their
times can be reported as a ratio. Nothing is copied into the repository.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from undiffuse.memory import peak_rss_mb

REPO = Path(__file__).resolve().parents[1]


# Versions before the AnnData-first API return a result object; later ones write into the AnnData.
_CHILD = """
import json, resource, sys, time
from pathlib import Path
import anndata as ad, numpy as np, pandas as pd
from undiffuse.correct import correct
args = json.loads(sys.argv[1])
adata = ad.read_h5ad(args["prepared"])
q_init = pd.read_csv(args["q_init"], sep="\\t", index_col=0, keep_default_na=False)["q_init"]
started = time.perf_counter()
result = correct(adata, genes=args["genes"], q_init=q_init, progress=False, **args["options"])
seconds = time.perf_counter() - started
if result is None:
    corrected = adata[:, args["genes"]].layers["corrected"]
    corrected = corrected.toarray() if hasattr(corrected, "toarray") else np.asarray(corrected)
    from undiffuse.correct import parameter_table
    params = parameter_table(adata, args["genes"])
    config = adata.uns["undiffuse"]["correction"]["config"]
else:
    corrected, params, config = result.corrected, result.params, result.config
np.save(args["out"], corrected)
params.to_csv(args["params"], sep="\\t")
json.dump({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "config": config}, open(args["timing"], "w"), default=str)
"""
_CHILD = inspect.getsource(peak_rss_mb) + _CHILD


def run_previous(
    revision: str | None, prepared: Path, genes: list[str], q_init: pd.Series, options: dict | None = None
) -> dict:
    """Correct ``genes`` of ``prepared`` with undiffuse at git ``revision`` (``None``: this checkout), in a
    child process.

    Returns
    -------
    dict with ``corrected`` ``(N, G)``, ``params`` (DataFrame), ``seconds`` (time inside ``correct``),
    ``peak_rss_mb`` (the child process's peak resident memory) and ``config`` (the resolved settings).
    """
    with tempfile.TemporaryDirectory(prefix="undiffuse-previous-") as scratch:
        root = Path(scratch)
        checkout = REPO if revision is None else root / "checkout"
        if revision is not None:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(checkout), revision],
                check=True,
            )
        try:
            q_init.rename("q_init").to_frame().to_csv(root / "q_init.tsv", sep="\t")
            args = {
                "prepared": str(prepared),
                "q_init": str(root / "q_init.tsv"),
                "genes": genes,
                "options": options or {},
                "out": str(root / "corrected.npy"),
                "params": str(root / "params.tsv"),
                "timing": str(root / "timing.json"),
            }
            env = dict(os.environ, PYTHONPATH=str(checkout))
            subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], check=True, env=env, cwd=root)
            timing = json.loads((root / "timing.json").read_text())
            return {
                "corrected": np.load(root / "corrected.npy"),
                "params": pd.read_csv(root / "params.tsv", sep="\t", index_col=0, keep_default_na=False),
                "seconds": timing["seconds"],
                "peak_rss_mb": timing["peak_rss_mb"],
                "config": timing["config"],
            }
        finally:
            if revision is not None:
                subprocess.run(
                    ["git", "-C", str(REPO), "worktree", "remove", "--force", str(checkout)], check=False
                )
