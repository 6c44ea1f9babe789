"""Cluster execution: the site profiles are valid, and a real one-node SLURM cluster on this machine runs the
tiny workflow with ``--profile profiles/slurm``, giving the same results as a local run.

The cluster comes from ``scripts/slurm_cluster.sh`` (Debian's slurm-wlm and munge; root only). The SLURM tests
skip, with the reason, when that is impossible; with ``UNDIFFUSE_REQUIRE_SLURM=1`` (set by CI) they fail
instead, so that a run where they should have run cannot pass without them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
PROFILES = REPO / "profiles"
TEST_CONFIG = REPO / "config" / "test" / "config.yaml"
TEST_SAMPLES = REPO / "config" / "test" / "samples.tsv"
DAEMONS = ("munged", "slurmctld", "slurmd")
REQUIRE_SLURM = "UNDIFFUSE_REQUIRE_SLURM"

#: The executor's line for every submitted job: Snakemake's job id and SLURM's.
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+)")
FINISHED = re.compile(r"Finished jobid: (\d+) \(Rule: (\w+)\)")


@dataclass(frozen=True)
class SlurmCluster:
    partition: str
    log_dir: Path
    pids: dict[str, int]

    @property
    def controller_log(self) -> Path:
        return self.log_dir / "slurmctld.log"


def run_script(command: str, *, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), command], capture_output=True, text=True, timeout=timeout, check=False
    )


def parse_status(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if re.fullmatch(r"\w+=.*", line))


def unavailable(reason: str):
    if os.environ.get(REQUIRE_SLURM) == "1":
        pytest.fail(f"{reason} ({REQUIRE_SLURM}=1 forbids skipping)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node cluster; started here (and stopped at the end, by pid) unless already running."""
    if os.geteuid() != 0:
        unavailable("the local SLURM cluster needs root (it installs packages and starts system daemons)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        unavailable("SLURM is not installed and apt-get is not available to install it")
    before = parse_status(run_script("status", timeout=30).stdout)
    started_here = all(before.get(daemon, "none") == "none" for daemon in DAEMONS)
    try:
        result = run_script("start", timeout=900)
    except subprocess.TimeoutExpired:
        unavailable("scripts/slurm_cluster.sh start took more than 15 minutes")
    if result.returncode != 0:
        unavailable(f"scripts/slurm_cluster.sh start failed:\n{result.stderr[-3000:]}")
    status = parse_status(result.stdout)
    pids = {daemon: int(status[daemon]) for daemon in DAEMONS}
    yield SlurmCluster(status["partition"], Path(status["log_dir"]), pids)
    if started_here:
        stopped = run_script("stop", timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        for daemon, pid in pids.items():
            assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"{daemon} (pid {pid}) still runs"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def job_state(job_id: str) -> str:
    out = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--format=%T", f"--jobs={job_id}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.strip()


def snakemake_env() -> dict[str, str]:
    """The environment for snakemake: this interpreter's bin folder first on PATH, so that the jobs, which
    sbatch gives the submitting process's environment (--export=ALL), find the same Python and tools."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def sample_names() -> list[str]:
    rows = [line.split("\t")[0] for line in TEST_SAMPLES.read_text().splitlines()[1:]]
    return [row for row in rows if row and not row.startswith("#")]


def corrected_targets() -> list[str]:
    """Each test sample's corrected data: every step up to merge, without the reports (the slowest jobs,
    which add nothing to what this test checks about SLURM)."""
    return [
        f"results/{sample}/{name}"
        for sample in sample_names()
        for name in ("corrected.h5ad", "parameters.tsv")
    ]


class SnakemakeRun:
    """The tiny test config run up to the corrected data in ``workdir``, in the background; its log (stdout
    and stderr) goes to ``workdir/snakemake.log``."""

    def __init__(self, workdir: Path, *profile_args: str):
        self.command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
        self.command += ["--configfile", str(TEST_CONFIG), "--directory", str(workdir), *profile_args]
        self.command += ["--", *corrected_targets()]
        self.log_path = workdir / "snakemake.log"
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                self.command, cwd=workdir, env=snakemake_env(), stdout=log, stderr=subprocess.STDOUT
            )

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def wait(self, timeout: float = 1500) -> str:
        """Wait for the end; returns the log, after checking that the run succeeded."""
        try:
            returncode = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        log = self.log_path.read_text()
        assert returncode == 0, f"snakemake failed ({' '.join(self.command)}):\n{log[-6000:]}"
        return log


@pytest.mark.slurm
def test_slurm_cluster_runs_a_batch_job(slurm_cluster, tmp_path):
    output = tmp_path / "hostname.txt"
    submitted = subprocess.run(
        ["sbatch", "--parsable", "-p", slurm_cluster.partition, "-D", str(tmp_path), "-o", "/dev/null"]
        + ["--wrap", f"hostname > {output}"],
        capture_output=True,
        text=True,
        check=True,
    )
    job_id = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 60
    while (state := job_state(job_id)) != "COMPLETED":
        assert state in {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING"}, f"job {job_id}: {state}"
        assert time.monotonic() < deadline, f"job {job_id} still {state} after 60 s"
        time.sleep(0.5)
    assert output.read_text().strip() == os.uname().nodename
    assert f"_job_complete: JobId={job_id} done" in slurm_cluster.controller_log.read_text()


def write_test_profile(directory: Path, cluster: SlurmCluster) -> Path:
    """The test-only overlay on profiles/slurm: this cluster's partition, no account (there is no accounting
    here), job states from squeue, short waits. Derived from the real profile's default resources so that
    only the site-specific values differ."""
    site = yaml.safe_load((PROFILES / "slurm" / "config.yaml").read_text())
    resources = dict(site["default-resources"])
    resources.pop("slurm_account")
    resources.update(slurm_partition=cluster.partition, mem_mb=1000, runtime=15)
    overlay = {
        "default-resources": resources,
        "slurm-status-command": "squeue",
        # The executor queries job states 5 s after a query that saw a job end, then waits 10 s longer
        # each time (5, 15, 25, ...): short waits for the short jobs of the tiny workflow.
        "slurm-init-seconds-before-status-checks": 5,
        "slurm-keep-successful-logs": True,
        "latency-wait": 5,
        "jobs": 4,
    }
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))
    return directory


def read_corrected(results: Path):
    import anndata as ad

    data = {}
    for path in sorted(results.glob("*/corrected.h5ad")):
        adata = ad.read_h5ad(path)
        matrix = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
        data[path.parent.name] = (list(adata.obs_names), list(adata.var_names), matrix)
    return data


@pytest.mark.slurm
@pytest.mark.workflow
@pytest.mark.slow  # two runs of the tiny workflow, about 3-5 minutes on 2 cores
def test_workflow_through_slurm_matches_a_local_run(slurm_cluster, tmp_path):
    local_dir, slurm_dir = tmp_path / "local", tmp_path / "slurm"
    local_dir.mkdir()
    slurm_dir.mkdir()
    overlay = write_test_profile(tmp_path / "profile", slurm_cluster)
    controller_log_start = slurm_cluster.controller_log.stat().st_size

    # Both at once: the SLURM run spends much of its time waiting between status queries.
    local_run = SnakemakeRun(local_dir, "--profile", str(PROFILES / "local"), "--cores", "2")
    try:
        slurm_run = SnakemakeRun(slurm_dir, "--profile", str(PROFILES / "slurm"), "--profile", str(overlay))
        log = slurm_run.wait()
        local_run.wait()
    finally:
        local_run.kill()

    # Every job that ran went to SLURM (rule `all` only collects inputs and runs nowhere) ...
    submitted = dict(SUBMITTED.findall(log))
    finished = dict(FINISHED.findall(log))
    assert submitted, f"no job was submitted to SLURM:\n{log[-3000:]}"
    assert set(finished) <= set(submitted) | {job for job, rule in finished.items() if rule == "all"}
    assert {"simulate", "prepare", "init_quantiles", "correct_chunk", "merge"} <= set(finished.values())
    # ... and SLURM's controller saw each of them submitted and ended with exit status 0.
    with slurm_cluster.controller_log.open() as handle:
        handle.seek(controller_log_start)
        controller_log = handle.read()
    for slurm_job in submitted.values():
        assert re.search(rf"_slurm_rpc_submit_batch_job: JobId={slurm_job}\b", controller_log)
        assert re.search(rf"_job_complete: JobId={slurm_job} WEXITSTATUS 0\b", controller_log)

    local, on_slurm = read_corrected(local_dir / "results"), read_corrected(slurm_dir / "results")
    assert set(local) == set(on_slurm) == set(sample_names())
    for sample, (barcodes, genes, matrix) in local.items():
        slurm_barcodes, slurm_genes, slurm_matrix = on_slurm[sample]
        assert (barcodes, genes) == (slurm_barcodes, slurm_genes)
        assert np.isfinite(slurm_matrix).all()
        assert np.allclose(matrix, slurm_matrix, rtol=1e-5, atol=1e-6), (
            f"{sample}: max difference {np.abs(matrix - slurm_matrix).max()}"
        )


def profile_keys(name: str) -> dict:
    return yaml.safe_load((PROFILES / name / "config.yaml").read_text())


@pytest.mark.parametrize("name", ["local", "slurm"])
def test_site_profiles_leave_per_rule_settings_to_the_workflow_profile(name):
    # Snakemake lets the workflow profile (profiles/default) replace these keys as a whole, so a site
    # profile's per-rule settings would be silently dropped.
    assert not {"set-threads", "set-resources"} & set(profile_keys(name))


def test_slurm_profile_asks_for_what_a_cluster_needs():
    profile = profile_keys("slurm")
    assert profile["executor"] == "slurm"
    assert {"slurm_partition", "slurm_account", "runtime", "mem_mb"} <= set(profile["default-resources"])
    assert profile["jobs"] > 1 and profile["latency-wait"] > 0


def test_workflow_profile_retries_and_reruns_incomplete_jobs():
    profile = profile_keys("default")
    assert profile["retries"] >= 1 and profile["rerun-incomplete"] is True


@pytest.mark.parametrize("name", ["local", "slurm"])
@pytest.mark.slow
def test_profile_installed_by_name_is_accepted_by_snakemake(name, tmp_path):
    # Installed as ~/.config/snakemake/NAME (here $XDG_CONFIG_HOME/snakemake/NAME), `--profile NAME` works
    # from any directory. A dry run parses the profile, with the workflow profile merged in, into
    # Snakemake's and the SLURM executor's options and plans the tiny workflow: an unknown key or a bad
    # value fails here.
    config_home = tmp_path / "config"
    (config_home / "snakemake").mkdir(parents=True)
    (config_home / "snakemake" / name).symlink_to(PROFILES / name)
    workdir = tmp_path / "project"
    workdir.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
        + ["--configfile", str(TEST_CONFIG), "--dry-run", "--profile", name],
        cwd=workdir,
        env=snakemake_env() | {"XDG_CONFIG_HOME": str(config_home)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert f"Using profiles {name} and workflow specific profile {PROFILES / 'default'}" in log
    assert re.search(r"correct_chunk|init_quantiles", log)
