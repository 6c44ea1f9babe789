"""Conda environments: every rule that runs something names an existing env, and the envs pin what
pyproject.toml pins.

Conda channels cannot be reached from this machine, so the environments are not solved here; these tests
check what can be checked without a solver: names, versions, builds, and that pip has nothing to fetch
besides the package itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
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

RULE_HEADER = re.compile(r"^(?:rule|checkpoint)\s+(\w+)\s*:", re.MULTILINE)
USE_RULE = re.compile(r"^use\s+rule\s+(\w+)\s+as\s+(\w+)", re.MULTILINE)
CONDA_DIRECTIVE = re.compile(
    r"^[ \t]+conda:[ \t]*(?:\n[ \t]*)?(?:\"([^\"\n]+)\"|'([^'\n]+)'|(\S.*))", re.MULTILINE
)
RUNS_SOMETHING = re.compile(r"^[ \t]+(shell|script|notebook|wrapper|cwl):", re.MULTILINE)
TOP_LEVEL = re.compile(r"^\S", re.MULTILINE)
CONDA_SPEC = re.compile(
    r"^(?P<name>[A-Za-z0-9_.-]+)\s*(?:(?P<op>==|=)\s*(?P<version>[^=\s]+)(?:=(?P<build>\S+))?)?$"
)


@dataclass(frozen=True)
class RuleSource:
    """Where a rule is defined and what its ``conda:`` directive says (None when it has none)."""

    name: str
    file: Path
    conda: str | None
    runs_something: bool

    @property
    def env_path(self) -> Path | None:
        # Snakemake resolves a relative conda path against the file that defines the rule.
        return None if self.conda is None else (self.file.parent / self.conda).resolve()


def workflow_files() -> list[Path]:
    snakefile = REPO / "Snakefile"
    if not snakefile.is_file():
        pytest.fail(f"{snakefile} is missing: the workflow has no Snakefile")
    return [snakefile, *sorted((REPO / "rules").glob("*.smk"))]


def parse_rules(path: Path) -> dict[str, RuleSource]:
    """Rules defined in one Snakemake file, with their ``conda:`` directive, read from the source text."""
    text = path.read_text()
    starts = [m.start() for m in TOP_LEVEL.finditer(text)] + [len(text)]
    rules: dict[str, RuleSource] = {}
    for header in RULE_HEADER.finditer(text):
        end = next(s for s in starts if s > header.start())
        body = text[header.end() : end]
        conda = CONDA_DIRECTIVE.search(body)
        literal = None
        if conda is not None:
            literal = conda.group(1) or conda.group(2)
            if literal is None:
                pytest.fail(
                    f"{path}: rule {header.group(1)}: conda: is not a string literal: {conda.group(3)}"
                )
        rules[header.group(1)] = RuleSource(
            header.group(1), path, literal, RUNS_SOMETHING.search(body) is not None
        )
    for use in USE_RULE.finditer(text):
        base = rules.get(use.group(1))
        if base is not None:
            rules[use.group(2)] = RuleSource(use.group(2), path, base.conda, base.runs_something)
    return rules


@pytest.fixture(scope="module")
def workflow_rules() -> dict[str, RuleSource]:
    rules: dict[str, RuleSource] = {}
    for path in workflow_files():
        rules.update(parse_rules(path))
    return rules


#: Runs `snakemake --list-rules` and, once Snakemake has read the workflow, prints UNDIFFUSE_ROOT as the
#: workflow left it in Snakemake's environment, which is what conda and pip see when they create the envs.
LIST_RULES = """
import atexit, os, sys
from snakemake.cli import main
atexit.register(lambda: print("UNDIFFUSE_ROOT=" + os.environ.get("UNDIFFUSE_ROOT", "")))
sys.argv = ["snakemake", "--list-rules", "--workflow-profile", "none"]
main()
"""


@pytest.fixture(scope="module")
def snakemake_listing() -> list[str]:
    """Lines of `snakemake --list-rules`, run without UNDIFFUSE_ROOT in the environment."""
    env = {key: value for key, value in os.environ.items() if key != "UNDIFFUSE_ROOT"}
    result = subprocess.run(
        [sys.executable, "-c", LIST_RULES], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"snakemake --list-rules failed:\n{result.stderr[-3000:]}"
    return result.stdout.splitlines()


@pytest.fixture(scope="module")
def listed_rules(snakemake_listing) -> list[str]:
    """The rules as Snakemake itself sees them (after includes and config), not as the parser above does."""
    # One rule a line: its name, then its docstring in parentheses, whose further lines are indented.
    names = [re.match(r"(\w+)(?: \(|$)", line) for line in snakemake_listing]
    return [name.group(1) for name in names if name is not None]


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


def package_pins() -> dict[str, str]:
    """pyproject.toml's direct dependencies as {conda name: exact version}."""
    pins = {}
    for line in project_table()["dependencies"]:
        requirement = Requirement(line)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"pyproject.toml: {line} is not pinned exactly"
        pins[CONDA_NAME.get(requirement.name.lower(), requirement.name.lower())] = specifier.version
    return pins


def env_files() -> list[Path]:
    return sorted(ENVS.glob("*.yaml"))


def test_every_rule_that_runs_something_names_an_existing_env(workflow_rules, listed_rules):
    assert listed_rules, "snakemake --list-rules listed no rule"
    missed = sorted(set(listed_rules) - set(workflow_rules))
    assert not missed, f"rules that Snakemake lists but this test could not find in the source: {missed}"
    for name in listed_rules:
        rule = workflow_rules[name]
        if not rule.runs_something:
            continue
        assert rule.conda is not None, f"{rule.file}: rule {name} has no conda: directive"
        assert rule.env_path.is_file(), f"{rule.file}: rule {name}: conda env {rule.conda} does not exist"
        assert rule.env_path.parent == ENVS, f"{rule.file}: rule {name}: env {rule.conda} is not under envs/"


def test_every_env_is_used_and_the_gpu_env_belongs_to_correct_chunk(workflow_rules):
    used = {rule.env_path.name for rule in workflow_rules.values() if rule.env_path is not None}
    unused = sorted({path.name for path in env_files()} - used)
    assert not unused, f"envs that no rule names: {unused}"
    assert workflow_rules["correct_chunk"].env_path == ENVS / GPU_ENV


def test_workflow_sets_the_root_that_the_envs_install(snakemake_listing):
    # The envs' pip line `-e ${UNDIFFUSE_ROOT}` needs the variable when Snakemake creates them.
    (root,) = [line.split("=", 1)[1] for line in snakemake_listing if line.startswith("UNDIFFUSE_ROOT=")]
    assert root, "the workflow does not set UNDIFFUSE_ROOT (envs/*.yaml install ${UNDIFFUSE_ROOT} with pip)"
    assert Path(root).resolve() == REPO


@pytest.mark.parametrize("path", env_files(), ids=lambda path: path.name)
def test_env_pins_agree_with_pyproject(path):
    env = load_env(path)
    assert env["channels"][:2] == ["conda-forge", "bioconda"], f"{path.name}: channels {env['channels']}"
    assert "defaults" not in env["channels"]
    pins = conda_pins(env)
    for name, version in package_pins().items():
        assert name in pins, f"{path.name}: {name} (pinned {version} in pyproject.toml) is missing"
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
