"""Accuracy against ground truth on a simulated sample (issue 4's figures).

Simulates a sample (default: the full-size "moderate" demo sample), prepares it, initialises the quantiles with
the Moran's I scan, and scores over tissue spots:

- raw counts;
- the trivial baseline that zeroes background spots and rescales each gene to keep its total;
- ``deconvolve``, the correction with its defaults (the lattice FFT operator, no cutoff), the same with the
  pair operator (``operator: pairs``, radius capped at ``max_cutoff``), without the prior (maximum likelihood,
  ``prior_strength=0``), and, with ``--previous REV``, the engine of an earlier git revision run in the same
  benchmark (``benchmarks/previous.py``), and, with ``--other-prior-weights``, with the prior's other
  neighbour weights (``prior_weights: uniform``; rows ``*_uniform``);
- with ``--seed-baseline``, the seed's balanced OT (:mod:`undiffuse.ot.baseline`; dense POT, so small samples
  only);
- EM with the simulator's true kernel: maximum likelihood (the reference of issue 4's criteria) and maximum a
  posteriori with the same prior as ``deconvolve`` (the answer known), and with ``--other-prior-weights`` the
  same with the other neighbour weights.

Beside the learned kernels' recovery (length, bleed and distal shares against the truth) it reports the
kernels fitted by maximum likelihood with the true field known (``ml_kernel_given_true_field``): how well the
background counts can tell the genes' lengths apart at all.

Writes ``benchmarks/results/accuracy[_SUFFIX].json`` and ``.md``.

Usage::

    .venv/bin/python benchmarks/accuracy.py --previous 82269b4     # full size, both engines
    .venv/bin/python benchmarks/accuracy.py --n-rows 30 --n-cols 26 --n-genes 40 --seed-baseline --suffix small
    .venv/bin/python benchmarks/accuracy.py --kernel heavy_tailed --kernel-scale 5 --suffix long
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from previous import run_previous

from undiffuse.correct import CorrectionConfig, _geometry, correct, deconvolve_known_kernel, parameter_table
from undiffuse.diffusion import profile
from undiffuse.losses import poisson_loss
from undiffuse.metrics import marker_specificity, out_of_tissue_fraction, pearson, pooled_rmse
from undiffuse.model import DiffusionModel
from undiffuse.moran import scan_quantiles
from undiffuse.ot.baseline import balanced_ot_baseline
from undiffuse.prepare import prepare_sample
from undiffuse.simulate import simulate_sample

RESULTS = Path(__file__).resolve().parent / "results"


def score(estimate: np.ndarray, truth: ad.AnnData, tissue: np.ndarray, genes: list[str]) -> dict[str, float]:
    """RMSE and mean per-gene Pearson over tissue spots, marker specificity, background share."""
    reference = np.asarray(truth[:, genes].X, dtype=np.float64)
    markers = truth.var.loc[genes, "marker_of"].astype(str).to_numpy()
    is_marker = markers != ""
    domains = truth.obs["domain"].astype(str).to_numpy()
    specificity = marker_specificity(estimate[:, is_marker], domains, markers[is_marker], tissue=tissue)
    return {
        "rmse": pooled_rmse(estimate[tissue], reference[tissue]),
        "pearson_mean": float(pearson(estimate[tissue], reference[tissue]).mean()),
        "marker_specificity_mean": float(specificity.mean()),
        "background_share": float(out_of_tissue_fraction(estimate.sum(1, keepdims=True), tissue)[0]),
    }


@dataclass(frozen=True)
class SimulatedSample:
    """A simulated sample, prepared, with its truth and the genes a benchmark corrects."""

    adata: ad.AnnData
    prepared: Path
    truth: ad.AnnData
    genes: list[str]
    tissue: np.ndarray
    counts: np.ndarray
    q_init: pd.Series


def simulate_prepared(root: Path, *, gene_stride: int, **simulation_options) -> SimulatedSample:
    """Simulate a sample under ``root``, prepare it, pick every ``gene_stride``-th selected gene and initialise
    their quantiles with the Moran's I scan."""
    outs = simulate_sample(root / "sample", **simulation_options)
    adata = prepare_sample(outs, root / "prepared")
    truth = ad.read_h5ad(root / "sample" / "truth.h5ad")[adata.obs_names]
    genes = adata.var_names[adata.var["selected"].to_numpy(bool)].tolist()[::gene_stride]
    quantiles = scan_quantiles(adata, genes)
    q_init = quantiles.set_index("gene")["q_init"] if "gene" in quantiles.columns else quantiles["q_init"]
    return SimulatedSample(
        adata=adata,
        prepared=root / "prepared" / "prepared.h5ad",
        truth=truth,
        genes=genes,
        tissue=adata.obs["in_tissue"].to_numpy(bool),
        counts=np.asarray(adata[:, genes].X.toarray(), dtype=np.float64),
        q_init=q_init,
    )


def zero_background_baseline(counts: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Zero the background spots and rescale each gene to keep its total: the trivial baseline."""
    baseline = counts * tissue[:, None]
    baseline *= counts.sum(0) / np.where(baseline.sum(0) > 0, baseline.sum(0), 1.0)
    return baseline


def true_kernel_estimate(sample: SimulatedSample, config: CorrectionConfig) -> np.ndarray:
    """EM with the simulator's true kernel (maximum likelihood when ``config.prior_strength`` is 0)."""
    simulation = sample.truth.uns["simulation"]
    return deconvolve_known_kernel(
        sample.adata,
        genes=sample.genes,
        scale=sample.truth.var.loc[sample.genes, "kernel_scale"].to_numpy(),
        bleed=float(simulation["bleed"]),
        distal=float(simulation["distal"]),
        kind=str(simulation["kernel"]),
        q_init=sample.q_init,
        config=config,
    )


def true_diffusion_length(sample: SimulatedSample, config: CorrectionConfig) -> np.ndarray:
    """``(G,)`` the simulator's local kernels measured as the learned ones are (``diffusion_length``: per-axis
    RMS displacement on the same lattice neighbourhood within the QC's diffusion range), so that learned and
    true lengths compare alike also where the truth's profile has no finite RMS (heavy tails)."""
    geometry = _geometry(sample.adata, config, image=None, device=torch.device("cpu"), dtype=torch.float64)
    scale = torch.as_tensor(
        sample.truth.var.loc[sample.genes, "kernel_scale"].to_numpy(), dtype=torch.float64
    )
    kind = str(sample.truth.uns["simulation"]["kernel"])
    zeros = torch.zeros(len(sample.genes), dtype=torch.float64)
    model = DiffusionModel(geometry, profile(scale, kind), zeros, zeros)
    return model.diffusion_length().numpy()


def true_field_kernel_fit(
    sample: SimulatedSample, config: CorrectionConfig, *, steps: int = 300
) -> pd.DataFrame:
    """Per-gene kernels fitted with the answer half known: maximum likelihood of the true family's scale and of
    the local and distal shares on the background spots' counts, with the true field in tissue. The lengths'
    correlation with the truth is what the background counts alone tell with the field known (``correct`` has to
    find the field too, but also learns from the tissue spots). Returns ``parameter_table``'s columns."""
    geometry = _geometry(sample.adata, config, image=None, device=torch.device("cpu"), dtype=torch.float64)
    truth = sample.truth[:, sample.genes].X
    field = torch.as_tensor(truth.toarray() if hasattr(truth, "toarray") else np.asarray(truth))
    counts = torch.as_tensor(sample.counts, dtype=torch.float64)
    kind = str(sample.truth.uns["simulation"]["kernel"])
    n_genes, background = counts.shape[1], ~geometry.tissue
    start = geometry.decay_kernel[1] if geometry.decay_kernel else 1.0
    log_scale = torch.full((n_genes,), np.log(start), dtype=torch.float64).requires_grad_()
    logits = (
        torch.log(torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)).repeat(n_genes, 1).requires_grad_()
    )
    optimiser = torch.optim.Adam([log_scale, logits], lr=0.05)

    def model() -> DiffusionModel:
        shares = torch.softmax(logits, dim=1)
        return DiffusionModel(geometry, profile(torch.exp(log_scale), kind), shares[:, 1], shares[:, 2])

    for _ in range(steps):
        optimiser.zero_grad()
        poisson_loss(counts, model().forward(field), background).sum().backward()
        optimiser.step()
    with torch.no_grad():
        shares = torch.softmax(logits, dim=1)
        return pd.DataFrame(
            {
                "diffusion_length": model().diffusion_length().numpy(),
                "bleed": shares[:, 1].numpy(),
                "distal": shares[:, 2].numpy(),
                "prior_strength": np.zeros(n_genes),
            },
            index=sample.genes,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-rows", type=int, default=78)
    parser.add_argument("--n-cols", type=int, default=64)
    parser.add_argument("--n-genes", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kernel", choices=["gaussian", "heavy_tailed"], default="gaussian")
    parser.add_argument("--kernel-scale", type=float, default=2.5, help="true diffusion scale (pitches)")
    parser.add_argument("--bleed", type=float, default=0.3)
    parser.add_argument("--distal", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--previous", metavar="REV", help="also run the engine of this git revision")
    parser.add_argument("--seed-baseline", action="store_true", help="also run the seed's balanced OT")
    parser.add_argument("--skip-pairs", action="store_true", help="skip deconvolve with the pair operator")
    parser.add_argument("--skip-no-prior", action="store_true", help="skip deconvolve without the prior")
    parser.add_argument(
        "--skip-ml-kernel",
        action="store_true",
        help="skip ml_kernel_given_true_field (it does not depend on the engine; minutes on a busy machine)",
    )
    parser.add_argument(
        "--other-prior-weights",
        action="store_true",
        help="also run deconvolve and MAP with the true kernel with the non-default prior_weights",
    )
    parser.add_argument(
        "--gene-stride", type=int, default=1, metavar="K", help="correct every K-th selected gene (all kinds)"
    )
    parser.add_argument("--suffix", default="")
    args = parser.parse_args()

    config = CorrectionConfig()
    if args.epochs is not None:
        config = replace(config, epochs=args.epochs)
    scratch = tempfile.TemporaryDirectory(prefix="undiffuse-accuracy-")
    root = Path(scratch.name)
    simulation_options = dict(
        n_rows=args.n_rows,
        n_cols=args.n_cols,
        n_genes=args.n_genes,
        seed=args.seed,
        kernel=args.kernel,
        kernel_scale=args.kernel_scale,
        bleed=args.bleed,
        distal=args.distal,
    )
    sample = simulate_prepared(root, gene_stride=args.gene_stride, **simulation_options)
    adata, truth, genes, tissue, counts, q_init = (
        sample.adata,
        sample.truth,
        sample.genes,
        sample.tissue,
        sample.counts,
        sample.q_init,
    )

    figures: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    figures["raw"] = score(counts, truth, tissue, genes)
    figures["zero_background_rescaled"] = score(
        zero_background_baseline(counts, tissue), truth, tissue, genes
    )

    simulation = truth.uns["simulation"]
    other_weights = "uniform" if config.prior_weights == "bilateral" else "bilateral"
    oracles = {"em_true_kernel": {"prior_strength": 0.0}, "map_true_kernel": {}}
    if args.other_prior_weights:
        oracles[f"map_true_kernel_{other_weights}"] = {"prior_weights": other_weights}
    for name, options in oracles.items():
        started = time.perf_counter()
        oracle = true_kernel_estimate(sample, replace(config, **options))
        timings[name] = time.perf_counter() - started
        figures[name] = score(oracle, truth, tissue, genes)

    runs = {"deconvolve": {}}
    if not args.skip_pairs:
        runs["deconvolve_pairs"] = {"operator": "pairs"}
    if not args.skip_no_prior:
        runs["deconvolve_no_prior"] = {"prior_strength": 0.0}
    if args.other_prior_weights:
        runs[f"deconvolve_{other_weights}"] = {"prior_weights": other_weights}
    learned = {}
    for name, options in runs.items():
        started = time.perf_counter()
        out = correct(adata, genes=genes, q_init=q_init, config=replace(config, **options), copy=True)
        timings[name] = time.perf_counter() - started
        figures[name] = score(
            out[:, genes].layers["corrected"].toarray().astype(np.float64), truth, tissue, genes
        )
        learned[name] = parameter_table(out, genes)
    if args.previous:
        options = {} if args.epochs is None else {"epochs": args.epochs}
        previous = run_previous(args.previous, sample.prepared, genes, q_init, options)
        name = f"previous_engine_{args.previous}"
        timings[name] = previous["seconds"]
        figures[name] = score(previous["corrected"].astype(np.float64), truth, tissue, genes)
        learned[name] = previous["params"]
    if not args.skip_ml_kernel:
        started = time.perf_counter()
        learned["ml_kernel_given_true_field"] = true_field_kernel_fit(sample, config)
        timings["ml_kernel_given_true_field"] = time.perf_counter() - started
    if args.seed_baseline:
        started = time.perf_counter()
        seed = balanced_ot_baseline(adata, genes=genes, q=q_init.loc[genes].to_numpy())
        timings["seed_balanced_ot"] = time.perf_counter() - started
        figures["seed_balanced_ot"] = score(seed, truth, tissue, genes)
    scratch.cleanup()

    raw, ours, ml = figures["raw"], figures["deconvolve"], figures["em_true_kernel"]
    checks = {
        "rmse <= 0.75 x raw": ours["rmse"] <= 0.75 * raw["rmse"],
        "rmse <= 1.05 x EM with true kernel": ours["rmse"] <= 1.05 * ml["rmse"],
        "beats zero-background baseline": ours["rmse"] < figures["zero_background_rescaled"]["rmse"],
        "pearson within 0.01 of raw": ours["pearson_mean"] >= raw["pearson_mean"] - 0.01,
        "marker specificity above raw": ours["marker_specificity_mean"] > raw["marker_specificity_mean"],
        "background share <= 1%": ours["background_share"] <= 0.01,
    }
    true_scale = truth.var.loc[genes, "kernel_scale"].to_numpy()
    true_length = true_diffusion_length(sample, config)

    def recovery(params) -> dict[str, float]:
        return {
            "diffusion_length_median": float(params["diffusion_length"].median()),
            "diffusion_length_vs_true_pearson": float(
                np.corrcoef(params["diffusion_length"], true_scale)[0, 1]
            ),
            "diffusion_length_vs_true_length_pearson": float(
                np.corrcoef(params["diffusion_length"], true_length)[0, 1]
            ),
            "bleed_median": float(params["bleed"].median()),
            "distal_median": float(params["distal"].median()),
            "prior_strength_median": float(params["prior_strength"].median()),
        }

    report = {
        "sample": {
            "n_rows": args.n_rows,
            "n_cols": args.n_cols,
            "n_genes_simulated": args.n_genes,
            "n_genes_corrected": len(genes),
            "n_spots": int(adata.n_obs),
            "n_tissue_spots": int(tissue.sum()),
            "seed": args.seed,
            "simulation": {k: simulation[k] for k in ("bleed", "distal", "kernel", "kernel_scale")},
            "true_kernel_scale_median": float(np.median(true_scale)),
            "true_diffusion_length_median": float(np.median(true_length)),
        },
        "config": {k: v for k, v in vars(config).items() if k != "weights"} | {"weights": config.weights},
        "figures": figures,
        "checks": checks,
        "kernel_recovery": {name: recovery(params) for name, params in learned.items()},
        "wall_time_s": timings,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": __import__("os").cpu_count(),
            "torch": torch.__version__,
            "device": "cpu",
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "accuracy" + (f"_{args.suffix}" if args.suffix else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    lines = [
        f"# Accuracy on the simulated sample ({args.n_rows} x {args.n_cols} spots, {len(genes)} genes corrected; "
        f"{args.kernel} diffusion, scale {args.kernel_scale} pitches, bleed {args.bleed}, distal {args.distal})",
        "",
        "| method | RMSE (tissue) | mean Pearson | marker specificity | background share |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, values in figures.items():
        lines.append(
            f"| {name} | {values['rmse']:.3f} | {values['pearson_mean']:.4f} | "
            f"{values['marker_specificity_mean']:.4f} | {values['background_share']:.4f} |"
        )
    lines += ["", "| check | passed |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in checks.items()]
    lines += [
        "",
        "| engine | median diffusion length | corr. with true scale | corr. with true length | median bleed "
        "| median distal |",
    ]
    lines += ["| --- | --- | --- | --- | --- | --- |"]
    for name, values in report["kernel_recovery"].items():
        lines.append(
            f"| {name} | {values['diffusion_length_median']:.2f} | {values['diffusion_length_vs_true_pearson']:.2f} "
            f"| {values['diffusion_length_vs_true_length_pearson']:.2f} "
            f"| {values['bleed_median']:.3f} | {values['distal_median']:.3f} |"
        )
    lines += [
        "",
        f"True: median scale {np.median(true_scale):.2f} pitches, median length {np.median(true_length):.2f} "
        f"pitches (the true local kernel measured as the learned one is: per-axis RMS displacement within the "
        f"diffusion range), bleed {args.bleed}, distal {args.distal}."
        + (
            ""
            if args.skip_ml_kernel
            else " ml_kernel_given_true_field: the true family's scale and shares fitted per gene by maximum "
            "likelihood on the background counts with the true field known: what the background counts alone tell."
        ),
        "",
        f"Machine: {report['machine']}",
        "Wall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
        "",
    ]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
