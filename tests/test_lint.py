"""Static checks of the workflow: `snakemake --lint` is clean and the Snakefiles are snakefmt-formatted."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Snakefiles of the workflow core (rules/report.smk is linted by the report's own tests).
SNAKEFILES = [
    "Snakefile",
    *sorted(str(p.relative_to(REPO)) for p in (REPO / "rules").glob("*.smk") if p.name != "report.smk"),
]


@pytest.mark.parametrize("configfile", ["config/config.yaml", "config/test/config.yaml"])
@pytest.mark.slow
def test_snakemake_lint_is_clean(tmp_path, configfile):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--lint",
            "--snakefile",
            str(REPO / "Snakefile"),
            "--directory",
            str(tmp_path),
            "--configfile",
            str(REPO / configfile),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Lints for" not in output, output
    assert "Congratulations, your workflow is in a good condition!" in output


def test_snakefiles_are_formatted():
    snakefmt = shutil.which("snakefmt") or str(Path(sys.executable).with_name("snakefmt"))
    if not Path(snakefmt).exists():
        pytest.skip("snakefmt is not installed")
    result = subprocess.run([snakefmt, "--check", *SNAKEFILES], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
