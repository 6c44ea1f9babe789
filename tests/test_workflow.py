"""The workflow end to end on the tiny two-sample config: outputs, merged = direct, resume after a lost chunk.

The run happens once per test session in a temporary working directory (``--directory``), never in the
repository's ``results/``. Slow on a loaded machine (each job imports the scientific stack), hence the
``workflow`` marker; the tiny config keeps it to a minute or two on 2 free cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from undiffuse.quantiles import read_quantile_table

REPO = Path(__file__).resolve().parents[1]
TEST_CONFIG = REPO / "config" / "test" / "config.yaml"
SAMPLES = ("alpha", "beta")
#: Every var column merge adds, on top of prepare's.
MERGED_VAR_COLUMNS = (
    "undiffuse_q_init",
    "undiffuse_q",
    "undiffuse_r",
    "undiffuse_diffusion_length",
    "undiffuse_bleed",
    "undiffuse_distal",
    "undiffuse_prior_strength",
    "undiffuse_corrected",
    "undiffuse_moran_raw",
    "undiffuse_moran_at_q_init",
    "undiffuse_moran_corrected",
)


def snakemake_command(workdir: Path, *args: str, configfile: Path = TEST_CONFIG) -> list[str]:
    """Command line of snakemake on the repository's Snakefile in ``workdir``.

    Targets go before ``--configfile``, which takes several values."""
    return [
        sys.executable,
        "-m",
        "snakemake",
        *args,
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--cores",
        "2",
        "--retries",
        "0",
        "--configfile",
        str(configfile),
    ]


def snakemake(workdir: Path, *args: str, configfile: Path = TEST_CONFIG) -> subprocess.CompletedProcess:
    return subprocess.run(
        snakemake_command(workdir, *args, configfile=configfile), capture_output=True, text=True, timeout=1200
    )


def targets(sample: str) -> list[str]:
    return [f"results/{sample}/corrected.h5ad", f"results/{sample}/parameters.tsv"]


def planned_jobs(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: rule -> number of jobs."""
    table = output.split("Job stats:", 1)[1] if "Job stats:" in output else ""
    return {rule: int(count) for rule, count in re.findall(r"^(\w+)\s+(\d+)\s*$", table, flags=re.M)}


def resolved_config(corrected: ad.AnnData) -> dict:
    """The config the workflow ran with (defaults, config/config.yaml, then the test config), from the
    provenance of its output."""
    return json.loads(corrected.uns["undiffuse"]["provenance"]["config"])


def check(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout + result.stderr


def result_files(workdir: Path) -> dict[Path, int]:
    """Every file under results/, with its modification time."""
    return {path: path.stat().st_mtime_ns for path in (workdir / "results").rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory) -> dict:
    """Start the two-sample run, stop it (SIGTERM, as a scheduler does) once a first chunk is written, note
    what is on disk and what a dry run plans, then resume it to the end."""
    workdir = tmp_path_factory.mktemp("workflow")
    log = workdir / "interrupted.log"
    with open(log, "w") as stream:
        # The greedy scheduler: a SIGTERM that lands while snakemake's ILP scheduler waits on its solver
        # deadlocks snakemake itself (exit_gracefully waits on the scheduler's lock); the chunk jobs finish
        # fast enough that the signal often lands right there.
        process = subprocess.Popen(
            snakemake_command(workdir, *targets("alpha"), *targets("beta"), "--scheduler", "greedy"),
            stdout=stream,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        # Stop once snakemake has registered a finished chunk job (a chunk written by a job it has not yet
        # seen finish is, rightly, removed as incomplete).
        finished_chunk = re.compile(r"Finished jobid: \d+ \(Rule: correct_chunk\)")
        deadline = time.monotonic() + 1200
        while process.poll() is None and not finished_chunk.search(log.read_text()):
            assert time.monotonic() < deadline, "no chunk job finished in 20 minutes"
            time.sleep(0.2)
        assert process.poll() is None, "the run ended before it could be stopped: " + log.read_text()[-3000:]
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=300)
    assert process.returncode != 0

    on_disk = result_files(workdir)
    plan = planned_jobs(check(snakemake(workdir, *targets("alpha"), *targets("beta"), "-n")))
    check(snakemake(workdir, *targets("alpha"), *targets("beta")))
    return {"workdir": workdir, "on_disk": on_disk, "plan": plan}


@pytest.fixture(scope="module")
def workflow_run(interrupted_run) -> Path:
    return interrupted_run["workdir"]


@pytest.mark.parametrize("configfile", [REPO / "config" / "config.yaml", TEST_CONFIG])
@pytest.mark.slow
def test_dry_run_plans_every_step(tmp_path, configfile):
    from undiffuse.config import load_config, read_sample_sheet

    sheet = read_sample_sheet(REPO / load_config(configfile)["samples"])
    n_samples = len(sheet)
    jobs = planned_jobs(check(snakemake(tmp_path, "-n", configfile=configfile)))
    for rule in ("prepare", "init_quantiles", "merge"):
        assert jobs.get(rule) == n_samples, (rule, jobs)
    for rule, input in (("simulate", "simulate"), ("simulate_hd", "simulate_hd")):
        assert jobs.get(rule, 0) == (sheet["input"] == input).sum(), (rule, jobs)
    assert not (tmp_path / "results").exists(), "a dry run must not write outputs"


@pytest.mark.realdata
@pytest.mark.slow
def test_dry_run_mixes_real_and_simulated_samples(tmp_path, shared_data):
    real = shared_data / "visium_mouse_brain_raw_top100" / "outs"
    if not real.is_dir():
        pytest.skip(f"real data not available: {real} is absent")
    (tmp_path / "samples.tsv").write_text(f"sample\tinput\nbrain\t{real}\ndemo\tsimulate\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        TEST_CONFIG.read_text().replace("config/test/samples.tsv", str(tmp_path / "samples.tsv"))
    )
    output = check(snakemake(tmp_path, *targets("brain"), *targets("demo"), "-n", configfile=config))
    jobs = planned_jobs(output)
    assert jobs["simulate"] == 1 and jobs["prepare"] == 2 and jobs["merge"] == 2
    assert str(real) in output  # prepare reads the sheet's folder


@pytest.mark.slow
def test_bad_config_stops_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TEST_CONFIG.read_text() + "\ninit_quantiles:\n  grid: {step: -1}\n")
    result = snakemake(tmp_path, "-n", configfile=bad)
    assert result.returncode != 0
    assert "init_quantiles" in result.stderr + result.stdout and "step" in result.stderr + result.stdout


@pytest.mark.workflow
def test_two_samples_run_end_to_end(workflow_run):
    for sample in SAMPLES:
        folder = workflow_run / "results" / sample
        corrected = ad.read_h5ad(folder / "corrected.h5ad")
        prepared = ad.read_h5ad(folder / "prepared.h5ad")
        quantiles = read_quantile_table(folder / "quantiles.tsv")
        assert corrected.obs_names.equals(prepared.obs_names) and corrected.var_names.equals(
            prepared.var_names
        )
        assert set(MERGED_VAR_COLUMNS) <= set(corrected.var.columns)
        assert set(corrected.layers) == {"corrected"}
        assert np.isfinite(corrected.layers["corrected"].data).all()
        corrected_genes = corrected.var_names[corrected.var["undiffuse_corrected"].to_numpy()]
        assert sorted(corrected_genes) == sorted(quantiles.index)
        assert 0 < len(corrected_genes) < corrected.n_vars  # some genes pass through
        passed = ~corrected.var["undiffuse_corrected"].to_numpy()
        np.testing.assert_array_equal(
            corrected.layers["corrected"][:, passed].toarray(), prepared.X[:, passed].toarray()
        )
        np.testing.assert_array_equal(corrected.X.toarray(), prepared.X.toarray())  # X: the raw counts
        np.testing.assert_array_equal(
            corrected.var.loc[quantiles.index, "undiffuse_moran_raw"], quantiles["moran_raw"]
        )  # read from the scan, not computed again
        assert "spatial" in corrected.uns
        provenance = corrected.uns["undiffuse"]["provenance"]
        assert {"prepare", "init_quantiles", "correct_chunk_total"} <= set(provenance["wall_times_s"])
        assert provenance["seed"] == 0
        parameters = pd.read_csv(folder / "parameters.tsv", sep="\t", keep_default_na=False)
        assert parameters["gene"].tolist() == corrected.var_names.tolist()
        chunks = sorted(folder.glob("chunks/chunk_*.h5ad"))
        assert len(chunks) == 3  # 10 genes in chunks of at most 4
        for path in chunks:
            # A chunk holds its corrected columns and parameters only: no raw counts, layers or images.
            chunk = ad.read_h5ad(path)
            assert chunk.n_vars <= 4 and chunk.X.nnz <= chunk.n_obs * chunk.n_vars
            assert not chunk.layers and not chunk.obsm and "spatial" not in chunk.uns
        for log in ("prepare", "init_quantiles", "merge"):
            # Each step's log ends with its wall time and exact peak memory.
            last = (workflow_run / "logs" / sample / f"{log}.log").read_text().splitlines()[-1]
            peak = re.search(r"step finished in [0-9.]+ s, peak memory ([0-9]+) MB$", last)
            assert peak and int(peak.group(1)) > 50, last
            assert (workflow_run / "logs" / "benchmarks" / sample / f"{log}.tsv").is_file()
    # The two samples were simulated with different seeds.
    alpha, beta = (ad.read_h5ad(workflow_run / "results" / s / "corrected.h5ad") for s in SAMPLES)
    assert alpha.X.sum() != beta.X.sum()


@pytest.mark.workflow
def test_merged_equals_a_direct_correction(workflow_run):
    from undiffuse.config import correction_options
    from undiffuse.correct import CorrectionConfig, correct

    folder = workflow_run / "results" / "alpha"
    prepared = ad.read_h5ad(folder / "prepared.h5ad")
    quantiles = read_quantile_table(folder / "quantiles.tsv")
    merged = ad.read_h5ad(folder / "corrected.h5ad")
    options = correction_options(resolved_config(merged))
    correct(
        prepared, genes=list(quantiles.index), q_init=quantiles["q_init"], config=CorrectionConfig(**options)
    )
    direct = prepared.layers["corrected"].toarray()
    np.testing.assert_allclose(
        merged.layers["corrected"].toarray(), direct, rtol=0, atol=1e-5 * np.abs(direct).max()
    )
    np.testing.assert_allclose(merged.var["undiffuse_q"], prepared.var["undiffuse_q"], rtol=1e-5)
    assert merged.var["undiffuse_corrected"].equals(prepared.var["undiffuse_corrected"])


@pytest.mark.workflow
def test_a_killed_run_resumes_with_only_what_is_missing(interrupted_run):
    workdir, on_disk, plan = interrupted_run["workdir"], interrupted_run["on_disk"], interrupted_run["plan"]
    chunks_done = [path for path in on_disk if path.parent.name == "chunks"]
    assert chunks_done, "the run was stopped before any chunk was complete"
    # Nothing complete at the kill was recomputed: every file then on disk is untouched.
    assert {path: result_files(workdir)[path] for path in on_disk} == on_disk
    # The plan after the kill: the missing chunks of the scanned samples (3 each), the scans still missing
    # (whose chunks the checkpoint adds later), and both merges.
    scanned = [s for s in SAMPLES if workdir / "results" / s / "quantiles.tsv" in on_disk]
    assert plan.get("correct_chunk", 0) == 3 * len(scanned) - len(chunks_done)
    assert plan.get("init_quantiles", 0) == len(SAMPLES) - len(scanned)
    assert plan["merge"] == len(SAMPLES)
    # Jobs stopped mid-write left no temporary files behind (atomic_path cleans up on SIGTERM).
    assert not [path for path in result_files(workdir) if ".partial" in str(path)]


@pytest.mark.workflow
def test_a_lost_chunk_is_recomputed_alone_and_identically(workflow_run):
    folder = workflow_run / "results" / "alpha"
    before = ad.read_h5ad(folder / "corrected.h5ad")
    before_parameters = (folder / "parameters.tsv").read_text()
    # The state of a run stopped during the chunk jobs: one chunk and the merged outputs are missing.
    for name in ("chunks/chunk_1.h5ad", "corrected.h5ad", "parameters.tsv"):
        (folder / name).unlink()
    untouched = result_files(workflow_run)

    plan = check(snakemake(workflow_run, *targets("alpha"), *targets("beta"), "-n"))
    assert planned_jobs(plan) == {"correct_chunk": 1, "merge": 1, "total": 2}
    assert "chunk=1" in plan and "sample=beta" not in plan
    # Resources of the chunk job (the lattice operator): 1000 MB + 1000 MB per million (spot x gene) at once,
    # the training window (all spots, fewer than train_spots), an eighth for the final EM and 0.04 for the
    # whole chunk held on every spot, and 10 minutes + 100 per million (spot x gene) of the chunk; 4 genes.
    job = plan.split("rule correct_chunk:", 1)[1]
    spot_genes = before.n_obs * 4
    assert f"mem_mb={int(1000 + 1000 * (1.125 + 0.04) * spot_genes / 1e6)}," in job
    assert f"runtime={int(10 + 100 * spot_genes / 1e6)}," in job

    check(snakemake(workflow_run, *targets("alpha"), *targets("beta")))
    assert {path: result_files(workflow_run)[path] for path in untouched} == untouched
    after = ad.read_h5ad(folder / "corrected.h5ad")
    np.testing.assert_array_equal(after.layers["corrected"].toarray(), before.layers["corrected"].toarray())
    pd.testing.assert_frame_equal(after.var, before.var)
    assert (folder / "parameters.tsv").read_text() == before_parameters
    assert planned_jobs(check(snakemake(workflow_run, *targets("alpha"), *targets("beta"), "-n"))) == {}


@pytest.mark.workflow
def test_resumed_output_equals_an_uninterrupted_computation(workflow_run, tmp_path):
    """Recompute every chunk and the merge in one go, with the workflow's own step functions."""
    import torch

    from undiffuse.chunks import run_chunk
    from undiffuse.config import correction_options
    from undiffuse.merge import merge_sample

    folder = workflow_run / "results" / "beta"
    resumed = ad.read_h5ad(folder / "corrected.h5ad")
    config = resolved_config(resumed)
    threads = torch.get_num_threads()
    torch.set_num_threads(config["resources"]["correct_chunk"]["threads"])  # as the jobs ran
    try:
        chunks = []
        for index in range(3):
            chunks.append(tmp_path / f"chunk_{index}.h5ad")
            run_chunk(
                folder / "prepared.h5ad",
                folder / "quantiles.tsv",
                chunks[-1],
                index=index,
                chunk_size=config["correct"]["chunk_size"],
                options=correction_options(config),
            )
    finally:
        torch.set_num_threads(threads)
    uninterrupted = merge_sample(
        folder / "prepared.h5ad", chunks, folder / "quantiles.tsv", tmp_path / "c.h5ad", tmp_path / "p.tsv"
    )
    np.testing.assert_array_equal(
        resumed.layers["corrected"].toarray(), uninterrupted.layers["corrected"].toarray()
    )
    pd.testing.assert_frame_equal(resumed.var, uninterrupted.var)


@pytest.fixture(scope="module")
def hd_run(tmp_path_factory) -> dict:
    """The simulated Visium HD sample of the test config (ci preset, 8 um bins) through the whole workflow,
    report included, in a working directory of its own; the wall time is kept for the record."""
    workdir = tmp_path_factory.mktemp("workflow_hd")
    start = time.monotonic()
    check(
        snakemake(
            workdir, *targets("hd"), "results/hd/report.html", "results/hd/aggregated/square_016um.h5ad"
        )
    )
    return {"workdir": workdir, "wall_s": time.monotonic() - start}


@pytest.mark.workflow
def test_hd_sample_runs_through_the_whole_workflow(hd_run):
    from undiffuse.qc import spot_pitch_um

    workdir = hd_run["workdir"]
    folder = workdir / "results" / "hd"
    corrected = ad.read_h5ad(folder / "corrected.h5ad")
    prepared = ad.read_h5ad(folder / "prepared.h5ad")
    assert corrected.uns["undiffuse"]["platform"] == "visium_hd"
    assert spot_pitch_um(corrected) == 8.0  # the sheet's bin_size
    assert corrected.n_obs == 128 * 128  # the 1 mm ci capture area in 8 um bins
    # Written sparse, raw counts kept.
    assert sp.issparse(corrected.X) and sp.issparse(corrected.layers["corrected"])
    np.testing.assert_array_equal(corrected.X.toarray(), prepared.X.toarray())
    genes = corrected.var["undiffuse_corrected"].to_numpy()
    assert genes.sum() == 10
    background = ~corrected.obs["tissue"].to_numpy(dtype=bool)
    # Corrected expression stays inside the tissue.
    assert corrected.layers["corrected"][background][:, genes].nnz == 0
    assert (workdir / "logs" / "benchmarks" / "hd" / "simulate_hd.tsv").is_file()

    # The report compares with the 8 um truth: the correction moves the counts closer to it.
    summary = pd.read_csv(folder / "metrics" / "summary.tsv", sep="\t").set_index(["metric", "stage"])[
        "value"
    ]
    assert summary["truth_rmse", "corrected"] < 0.95 * summary["truth_rmse", "raw"]
    assert summary["out_of_tissue_fraction", "corrected"] < 0.2 * summary["out_of_tissue_fraction", "raw"]
    # Its markers mark cell types: their border half-width is taken across their home domains.
    markers = pd.read_csv(folder / "metrics" / "markers.tsv", sep="\t", index_col=0)
    assert {"home_domains", "halfwidth_raw", "halfwidth_corrected", "halfwidth_truth"} <= set(markers.columns)
    assert summary["border_halfwidth", "truth"] > 0
    html = (folder / "report.html").read_text()
    assert 'id="table-diffusion_lengths"' in html and "Per-gene diffusion lengths in microns" in html
    for figure in ("before_after", "kernel", "cell_types"):
        assert (folder / "figures" / f"{figure}.png").stat().st_size > 10_000
    assert (folder / "qc" / "background_decay.png").is_file()

    # aggregate.bin_sizes [16] of the test config: 2 x 2 blocks of 8 um bins, every total kept.
    coarse = ad.read_h5ad(folder / "aggregated" / "square_016um.h5ad")
    assert coarse.n_obs == 64 * 64 and coarse.obs_names[0] == "s_016um_00000_00000-1"
    for name in ("X", "corrected"):
        fine_matrix = corrected.X if name == "X" else corrected.layers[name]
        coarse_matrix = coarse.X if name == "X" else coarse.layers[name]
        np.testing.assert_allclose(
            np.asarray(coarse_matrix.sum(axis=0)).ravel(),
            np.asarray(fine_matrix.sum(axis=0)).ravel(),
            rtol=1e-5,
        )


@pytest.mark.workflow
def test_hd_chunk_jobs_ask_for_memory_and_time_by_bin_count(hd_run):
    workdir = hd_run["workdir"]
    plan = check(snakemake(workdir, "results/hd/chunks/chunk_0.h5ad", "-n", "-f"))
    job = plan.split("rule correct_chunk:", 1)[1]
    bin_genes = 128 * 128 * 4  # bins x genes of a chunk (chunk_size 4)
    # 10 minutes + 100 per million (bin x gene); 1000 MB + 1000 per million (bin x gene) of the training
    # window (all 16,384 bins, fewer than train_spots), an eighth of that for the final EM on all bins and
    # 0.04 for the whole chunk held on every bin.
    assert f"runtime={int(10 + 100 * bin_genes / 1e6)}," in job
    assert f"mem_mb={int(1000 + 1000 * (1.125 + 0.04) * bin_genes / 1e6)}," in job
    # The report: 4000 MB + 40 per million (bin x corrected gene), read from corrected.h5ad (10 genes).
    report_job = check(snakemake(workdir, "results/hd/report.html", "-n", "-f")).split("rule report:", 1)[1]
    assert f"mem_mb={int(4000 + 40 * 128 * 128 * 10 / 1e6)}," in report_job


def config_with_reference(tmp_path: Path, reference: str) -> Path:
    """The test config with ``correct.reference`` set."""
    import yaml

    config = yaml.safe_load(TEST_CONFIG.read_text())
    config["correct"]["reference"] = reference
    config["samples"] = str(REPO / config["samples"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_a_missing_reference_stops_before_any_job(tmp_path):
    config = config_with_reference(tmp_path, str(tmp_path / "atlas_{sample}.h5ad"))
    result = snakemake(tmp_path, "-n", configfile=config)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"{tmp_path}/atlas_alpha.h5ad: reference of sample alpha not found" in output
    assert "Traceback" not in output


@pytest.mark.workflow
def test_a_reference_guides_every_chunk_of_a_sample(tmp_path):
    from undiffuse.chunks import chunk_genes
    from undiffuse.config import correction_options
    from undiffuse.correct import CorrectionConfig, correct

    config = config_with_reference(tmp_path, "results/{sample}/simulated/reference.h5ad")
    check(snakemake(tmp_path, *targets("alpha"), configfile=config))
    folder = tmp_path / "results" / "alpha"
    profiles = folder / "reference_profiles.tsv"
    merged = ad.read_h5ad(folder / "corrected.h5ad")
    provenance = merged.uns["undiffuse"]["correction"]["config"]
    assert provenance["reference_types"] == "layer1,layer2,layer3,blob1,blob2"
    # The merged chunks are the library's correction of each chunk's genes with the same profiles.
    prepared = ad.read_h5ad(folder / "prepared.h5ad")
    quantiles = read_quantile_table(folder / "quantiles.tsv")
    workflow_config = resolved_config(merged)
    options = correction_options(workflow_config)
    genes = chunk_genes(list(quantiles.index), workflow_config["correct"]["chunk_size"], 0)
    correct(
        prepared,
        genes=genes,
        q_init=quantiles.loc[genes, "q_init"],
        reference=profiles,
        config=CorrectionConfig(**options),
    )
    direct = prepared[:, genes].layers["corrected"].toarray()
    np.testing.assert_allclose(
        merged[:, genes].layers["corrected"].toarray(), direct, rtol=0, atol=1e-5 * np.abs(direct).max()
    )
    np.testing.assert_allclose(
        merged[:, genes].var["undiffuse_prior_strength"],
        prepared[:, genes].var["undiffuse_prior_strength"],
        rtol=1e-4,
    )
