"""EM updates needed to reach the same log-likelihood, plain against SQUAREM-accelerated.

On a simulated full Visium slide, with the simulator's true kernel (maximum likelihood, no prior, so that the
log-likelihood is the objective both climb), records each gene's Poisson log-likelihood after every update of
plain EM and after every SQUAREM cycle (three updates), then reports, per gene, how many updates each needs to
come within 0.01% of the log-likelihood gain plain EM makes in 60 updates (the default budget).

Writes ``benchmarks/results/em_acceleration.json`` and ``.md``.

Usage::

    .venv/bin/python benchmarks/em_acceleration.py
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from undiffuse.correct import CorrectionConfig, _geometry
from undiffuse.diffusion import profile
from undiffuse.model import DiffusionModel, SoftStart
from undiffuse.ot.deconvolution import _em_update, squarem
from undiffuse.prepare import prepare_sample
from undiffuse.simulate import simulate_sample

RESULTS = Path(__file__).resolve().parent / "results"
PLAIN_BUDGET = 60
N_GENES = 32


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="undiffuse-em-") as scratch:
        outs = simulate_sample(Path(scratch) / "sample", n_genes=N_GENES)
        adata = prepare_sample(outs, Path(scratch) / "prepared", n_top_genes=N_GENES)
        truth = ad.read_h5ad(Path(scratch) / "sample" / "truth.h5ad")
    genes = adata.var_names[adata.var["selected"].to_numpy(bool)].tolist()
    simulation = truth.uns["simulation"]
    geometry = _geometry(
        adata, CorrectionConfig(), image=None, device=torch.device("cpu"), dtype=torch.float64
    )
    counts = torch.as_tensor(adata[:, genes].X.toarray(), dtype=torch.float64)
    scale = torch.as_tensor(truth.var.loc[genes, "kernel_scale"].to_numpy(), dtype=torch.float64)
    n = len(genes)
    model = DiffusionModel(
        geometry,
        profile(scale, str(simulation["kernel"])),
        torch.full((n,), float(simulation["bleed"]), dtype=torch.float64),
        torch.full((n,), float(simulation["distal"]), dtype=torch.float64),
    )
    soft = SoftStart(counts, geometry.tissue, 50.0)
    start = soft.start(soft.soft(torch.full((n,), 0.5, dtype=torch.float64)))

    def update(field):
        return _em_update(field, counts, model.kernel, model.bleed, model.distal, None)

    def log_likelihood(field):
        return update(field)[1].numpy()

    with torch.no_grad():
        plain, field = [log_likelihood(start)], start
        for _ in range(3 * PLAIN_BUDGET):
            field = update(field)[0]
            plain.append(log_likelihood(field))
        fast = {0: log_likelihood(start)}
        for cycles in range(1, PLAIN_BUDGET // 3 + 1):
            fast[3 * cycles] = log_likelihood(squarem(update, start, 3 * cycles))
    plain = np.array(plain)
    target = plain[0] + (1 - 1e-4) * (plain[PLAIN_BUDGET] - plain[0])
    plain_needed = np.argmax(plain >= target, axis=0)
    reached = np.array([fast[k] >= target for k in sorted(fast)])
    fast_needed = np.array(sorted(fast))[np.argmax(reached, axis=0)]
    fast_needed = np.where(reached.any(axis=0), fast_needed, -1)
    report = {
        "genes": n,
        "plain_updates_to_target_median": float(np.median(plain_needed)),
        "squarem_updates_to_target_median": float(np.median(fast_needed[fast_needed > 0])),
        "genes_squarem_reached_within_budget": int((fast_needed > 0).sum()),
        "plain_updates_per_gene": plain_needed.tolist(),
        "squarem_updates_per_gene": fast_needed.tolist(),
        "log_likelihood_gain_beyond_plain60_by_squarem60_median": float(
            np.median((fast[PLAIN_BUDGET] - plain[PLAIN_BUDGET]) / np.abs(plain[PLAIN_BUDGET] - plain[0]))
        ),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "em_acceleration.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# EM updates to reach plain EM's log-likelihood after 60 updates (within 0.01% of its gain)",
        "",
        f"- genes: {n} (full-size simulated slide, true kernel, maximum likelihood)",
        f"- plain EM: median {report['plain_updates_to_target_median']:.0f} updates",
        f"- SQUAREM: median {report['squarem_updates_to_target_median']:.0f} updates "
        f"({report['genes_squarem_reached_within_budget']} of {n} genes within 60)",
        "- SQUAREM after 60 updates is beyond plain EM's 60 by a median "
        f"{report['log_likelihood_gain_beyond_plain60_by_squarem60_median']:.3g} of plain EM's gain",
        "",
        f"Machine: {report['machine']}",
        "",
    ]
    (RESULTS / "em_acceleration.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
