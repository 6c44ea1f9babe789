"""Packaging: a non-editable install carries its schemas, notebooks and marker lists and runs from anywhere.

The wheel is built from a copy of the package (a build inside the checkout would leave ``build/`` behind and
could package stale files from it), installed without dependencies into a folder of its own, and run with only
that folder on ``PYTHONPATH`` from a temporary working directory, so that nothing of the checkout is in reach.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import yaml

from undiffuse.package_data import MARKERS_DIR, NOTEBOOKS_DIR, SCHEMA_DIR, SIMULATED_MARKERS

REPO = Path(__file__).resolve().parents[1]
#: What a wheel is built from besides the package itself.
PROJECT_FILES = ("pyproject.toml", "README.md", "LICENSE")
#: The checkout's visible paths of the package data, and the package folders they must link to.
CHECKOUT_LINKS = {
    "config/schemas": SCHEMA_DIR,
    "resources/notebooks": NOTEBOOKS_DIR,
    "resources/markers": MARKERS_DIR,
}
#: Prints where the package is imported from and where its data lies.
WHERE = (
    "import undiffuse, undiffuse.package_data as data;"
    "print(undiffuse.__file__);"
    "print(*(str(p) for p in (data.CONFIG_SCHEMA, data.SAMPLES_SCHEMA, data.REPORT_NOTEBOOK,"
    " data.SUMMARY_NOTEBOOK, data.SIMULATED_MARKERS)), sep='\\n')"
)

#: Modules that only the extras (report, workflow, dev) install: the library imports none of them up front.
EXTRA_MODULES = (
    "papermill",
    "nbconvert",
    "nbformat",
    "ipykernel",
    "IPython",
    "jinja2",
    "snakemake",
    "squidpy",
)
#: Imports every module of the package, and runs the command line's help, with the extras' modules hidden.
IMPORT_WITHOUT_EXTRAS = """
import sys, importlib, pkgutil
for name in sys.argv[1:]:
    sys.modules[name] = None  # `import name` now raises ImportError
import undiffuse
for module in pkgutil.walk_packages(undiffuse.__path__, "undiffuse."):
    if module.name != "undiffuse.__main__":  # which would run the command line
        importlib.import_module(module.name)
from undiffuse.cli import main
main(["--help"])
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """Folder holding the installed wheel (``undiffuse/`` and the ``bin/undiffuse`` entry point)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    shutil.copytree(REPO / "undiffuse", source / "undiffuse", ignore=shutil.ignore_patterns("__pycache__"))
    for name in PROJECT_FILES:
        shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    # No build isolation: the build backend is this environment's (the dev extra has it), so no index is needed.
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(root / "wheel"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = (root / "wheel").glob("undiffuse-*.whl")
    site = root / "site"
    install = subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    return site


def run_installed(site: Path, cwd: Path, *command: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``command`` with the installed package first on the path, from ``cwd``."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def undiffuse_command(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``undiffuse ARGS`` through the entry point that the wheel installed."""
    return run_installed(site, cwd, str(site / "bin" / "undiffuse"), *args)


@pytest.fixture()
def elsewhere(tmp_path) -> Path:
    """An empty working directory outside the checkout."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd


def test_checkout_paths_link_to_the_one_copy_in_the_package():
    for visible, packaged in CHECKOUT_LINKS.items():
        path = REPO / visible
        assert path.is_symlink(), f"{visible} should link to {packaged}, not hold a copy"
        assert path.resolve() == packaged.resolve()
    assert SIMULATED_MARKERS.is_file()


@pytest.mark.slow  # imports the whole package in a new interpreter
def test_core_dependencies_suffice_to_import_the_library_and_its_command(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_WITHOUT_EXTRAS, *EXTRA_MODULES],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "correct" in result.stdout  # the help lists the subcommands


@pytest.mark.slow  # builds and installs a wheel
def test_installed_package_is_imported_with_its_data(installed, elsewhere):
    result = run_installed(installed, elsewhere, sys.executable, "-c", WHERE)
    assert result.returncode == 0, result.stderr[-3000:]
    package, *data = (Path(line) for line in result.stdout.splitlines())
    assert package.is_relative_to(installed), f"imported {package}, not the installed package"
    for path in data:
        assert path.is_relative_to(installed / "undiffuse") and path.is_file(), path
        packaged = SCHEMA_DIR.parent / path.relative_to(installed / "undiffuse")
        assert path.read_bytes() == packaged.read_bytes()


@pytest.mark.slow  # builds and installs a wheel
def test_installed_command_validates_a_config_and_corrects(installed, elsewhere, tiny_sample):
    bad = elsewhere / "bad.yaml"
    bad.write_text(yaml.safe_dump({"correct": {"epochs": 0}}))
    refused = undiffuse_command(
        installed, elsewhere, "correct", str(tiny_sample / "outs"), "x.h5ad", "--config", str(bad)
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"{bad}: invalid config: correct.epochs" in refused.stderr
    assert "Traceback" not in refused.stderr and not (elsewhere / "x.h5ad").exists()

    good = elsewhere / "config.yaml"
    good.write_text(yaml.safe_dump({"correct": {"epochs": 2}}))
    result = undiffuse_command(
        installed,
        elsewhere,
        "correct",
        str(tiny_sample / "outs"),
        "corrected.h5ad",
        "--config",
        str(good),
        "--quiet",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    corrected = ad.read_h5ad(elsewhere / "corrected.h5ad")
    values, counts = (
        m.toarray() if sp.issparse(m) else np.asarray(m) for m in (corrected.layers["corrected"], corrected.X)
    )
    assert np.isfinite(values).all() and not np.array_equal(values, counts)
    np.testing.assert_allclose(values.sum(axis=0), counts.sum(axis=0), rtol=1e-3)


@pytest.mark.slow
def test_installed_command_builds_a_report_with_its_notebook_and_markers(installed, elsewhere, tiny_sample):
    """`undiffuse report` runs the packaged notebook (in a kernel that imports the installed package too)."""
    corrected = elsewhere / "corrected.h5ad"
    result = undiffuse_command(
        installed, elsewhere, "correct", str(tiny_sample / "outs"), str(corrected), "--epochs", "2", "--quiet"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    markers = installed / "undiffuse" / "markers" / "simulated.tsv"
    result = undiffuse_command(
        installed, elsewhere, "report", str(corrected), "report", "--markers", str(markers)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    html = (elsewhere / "report" / "report.html").read_text()
    assert "undiffuse report" in html
    assert {"before_after.png", "cell_types.png"} <= {
        p.name for p in (elsewhere / "report" / "figures").iterdir()
    }


@pytest.mark.realdata
@pytest.mark.slow
def test_installed_command_corrects_the_real_sample_from_tmp(installed, elsewhere, shared_data):
    outs = shared_data / "visium_mouse_brain_raw_top100" / "outs"
    if not outs.is_dir():
        pytest.skip(f"real data not available: {outs} is absent")
    genes = ["Mbp", "Plp1", "Snap25"]
    with h5py.File(outs / "raw_feature_bc_matrix.h5") as handle:
        assert set(genes) <= {name.decode() for name in handle["matrix/features/name"][:]}
    result = undiffuse_command(
        installed,
        elsewhere,
        "correct",
        str(outs),
        "brain.h5ad",
        "--genes",
        *genes,
        "--epochs",
        "5",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from undiffuse.io import read_sample

    raw = read_sample(outs)[:, genes]
    corrected = ad.read_h5ad(elsewhere / "brain.h5ad")[raw.obs_names, genes]
    values = corrected.layers["corrected"]
    values = (values.toarray() if sp.issparse(values) else np.asarray(values)).astype(np.float64)
    observed = raw.X.toarray().astype(np.float64)
    assert np.isfinite(values).all() and (values >= 0).all()
    # Each gene's total is kept, and the molecules found on background spots go back into the tissue.
    np.testing.assert_allclose(values.sum(axis=0), observed.sum(axis=0), rtol=1e-4)
    background = ~raw.obs["in_tissue"].to_numpy()
    assert values[background].sum() < 0.01 * observed[background].sum()
