"""Conda environments: every rule that runs something names an existing env, and the envs pin what
pyproject.toml pins.

Conda channels cannot be reached from this machine, so the environments are not solved here; these tests
check what can be checked without a solver: names, versions, builds, and that pip has nothing to fetch
besides the package itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
ENVS = REPO / "envs"

#: pip distribution name -> conda-forge/bioconda package that provides it (same name when absent).
CONDA_NAME = {
    "torch": "pytorch",
    "snakemake": "snakemake-minimal",
    "matplotlib": "matplotlib-base",
    "nbconvert": "nbconvert-core",
}

#: The env of the only rule that may run on a GPU; all others are CPU-only.
GPU_ENV = "correct.yaml"

#: What every env installs with pip: the workflow's own checkout, and nothing from PyPI.
PIP_SECTION = ["-e ${UNDIFFUSE_ROOT}"]

CONDA_SPEC = re.compile(
    r"^(?P<name>[A-Za-z0-9_.-]+)\s*(?:(?P<op>==|=)\s*(?P<version>[^=\s]+)(?:=(?P<build>\S+))?)?$"
)

#: Loads the workflow with Snakemake's API (what `snakemake --list-rules` reads) and prints, as JSON, every
#: rule with the conda env file Snakemake resolves for it, and UNDIFFUSE_ROOT as the workflow left it in
#: Snakemake's environment, which is what conda and pip see when they create the envs.
LOAD_WORKFLOW = """
import json, os, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import (
    ConfigSettings, DeploymentSettings, OutputSettings, ResourceSettings, StorageSettings,
)

snakefile, workdir = map(Path, sys.argv[1:])
with SnakemakeApi(OutputSettings()) as api:
    loaded = api.workflow(
        snakefile=snakefile,
        workdir=workdir,
        config_settings=ConfigSettings(),
        resource_settings=ResourceSettings(),
        storage_settings=StorageSettings(),
        deployment_settings=DeploymentSettings(),
    )
    rules = {}
    # The API's workflow object: its rules after includes and config, as Snakemake runs them.
    for rule in loaded._workflow.rules:
        env = rule.expand_conda_env({})
        rules[rule.name] = {
            "runs_something": not rule.norun and not rule.is_run,
            "conda": None if env is None else str(env.file.get_path_or_uri(secret_free=True)),
        }
print("WORKFLOW=" + json.dumps({"root": os.environ.get("UNDIFFUSE_ROOT", ""), "rules": rules}))
"""


@pytest.fixture(scope="module")
def loaded_workflow(tmp_path_factory) -> dict:
    """``{"root": UNDIFFUSE_ROOT, "rules": {name: {"runs_something", "conda"}}}`` as Snakemake loads the
    workflow, run without UNDIFFUSE_ROOT in the environment."""
    env = {key: value for key, value in os.environ.items() if key != "UNDIFFUSE_ROOT"}
    workdir = tmp_path_factory.mktemp("workdir")
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WORKFLOW, str(REPO / "Snakefile"), str(workdir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"Snakemake could not load the workflow:\n{result.stderr[-3000:]}"
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("WORKFLOW=")]
    return json.loads(line.removeprefix("WORKFLOW="))


@pytest.fixture(scope="module")
def rule_envs(loaded_workflow) -> dict[str, Path | None]:
    """Conda env file of every rule that runs something (None when it names none)."""
    return {
        name: None if rule["conda"] is None else Path(rule["conda"]).resolve()
        for name, rule in loaded_workflow["rules"].items()
        if rule["runs_something"]
    }


def load_env(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def conda_pins(env: dict) -> dict[str, re.Match]:
    pins = {}
    for dependency in env["dependencies"]:
        if isinstance(dependency, str):
            match = CONDA_SPEC.match(dependency.strip())
            assert match is not None, f"unreadable conda spec {dependency!r}"
            pins[match["name"]] = match
    return pins


def project_table() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


#: The extras of pyproject.toml that the workflow's jobs run (besides the core dependencies).
WORKFLOW_EXTRAS = ("report", "workflow")


def pyproject_pins(*, extras: tuple[str, ...]) -> dict[str, str]:
    """pyproject.toml's direct dependencies and those of ``extras`` as {conda name: exact version}; an extra's
    reference to another extra of undiffuse itself is left out."""
    project = project_table()
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    pins = {}
    for line in lines:
        requirement = Requirement(line)
        if requirement.name == project["name"]:
            continue
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"pyproject.toml: {line} is not pinned exactly"
        pins[CONDA_NAME.get(requirement.name.lower(), requirement.name.lower())] = specifier.version
    return pins


def env_files() -> list[Path]:
    return sorted(ENVS.glob("*.yaml"))


@pytest.mark.slow
def test_every_rule_that_runs_something_names_an_existing_env(rule_envs):
    assert {"prepare", "correct_chunk", "merge", "report"} <= set(rule_envs), sorted(rule_envs)
    for name, env in rule_envs.items():
        assert env is not None, f"rule {name} has no conda: directive"
        assert env.is_file(), f"rule {name}: conda env {env} does not exist"
        assert env.parent == ENVS, f"rule {name}: env {env} is not under envs/"


@pytest.mark.slow
def test_every_env_is_used_and_the_gpu_env_belongs_to_correct_chunk(rule_envs):
    used = {env.name for env in rule_envs.values() if env is not None}
    unused = sorted({path.name for path in env_files()} - used)
    assert not unused, f"envs that no rule names: {unused}"
    assert rule_envs["correct_chunk"] == ENVS / GPU_ENV


@pytest.mark.slow
def test_workflow_sets_the_root_that_the_envs_install(loaded_workflow):
    # The envs' pip line `-e ${UNDIFFUSE_ROOT}` needs the variable when Snakemake creates them.
    root = loaded_workflow["root"]
    assert root, "the workflow does not set UNDIFFUSE_ROOT (envs/*.yaml install ${UNDIFFUSE_ROOT} with pip)"
    assert Path(root).resolve() == REPO


@pytest.mark.parametrize("path", env_files(), ids=lambda path: path.name)
def test_env_pins_agree_with_pyproject(path):
    env = load_env(path)
    assert env["channels"][:2] == ["conda-forge", "bioconda"], f"{path.name}: channels {env['channels']}"
    assert "defaults" not in env["channels"]
    pins = conda_pins(env)
    for name in pyproject_pins(extras=WORKFLOW_EXTRAS).keys() - pins.keys():
        pytest.fail(
            f"{path.name}: {name} (pinned in pyproject.toml, needed by the workflow's jobs) is missing"
        )
    # Whatever else an env pins that pyproject.toml pins too (an extra of the tests, say) agrees with it.
    for name, version in pyproject_pins(extras=tuple(project_table()["optional-dependencies"])).items():
        if name in pins:
            assert pins[name]["version"] == version, (
                f"{path.name}: {name} is pinned to {pins[name]['version']}, pyproject.toml says {version}"
            )
    assert pins["python"]["version"] in SpecifierSet(project_table()["requires-python"]), (
        f"{path.name}: python {pins['python']['version']}"
    )
    assert "pip" in pins
    (pip_section,) = [dependency["pip"] for dependency in env["dependencies"] if isinstance(dependency, dict)]
    assert pip_section == PIP_SECTION, f"{path.name}: pip installs {pip_section}, expected only the checkout"


@pytest.mark.parametrize("path", env_files(), ids=lambda path: path.name)
def test_pytorch_build_matches_the_rule_device(path):
    build = conda_pins(load_env(path))["pytorch"]["build"]
    # A build string is what stops a solve on a GPU-less login node from picking the CPU build silently.
    expected = "cuda*" if path.name == GPU_ENV else "cpu*"
    assert build == expected, f"{path.name}: pytorch build {build!r}, expected {expected!r}"


def test_cpu_envs_are_identical_so_snakemake_builds_one():
    contents = {path.name: path.read_bytes() for path in env_files() if path.name != GPU_ENV}
    assert len(contents) >= 2
    assert len(set(contents.values())) == 1, f"CPU envs differ: {sorted(contents)}"
