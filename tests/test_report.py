"""Reports: a complete set of inputs in the workflow's layout -> metrics, notebook, HTML, summary, screenshot.

The notebook kernel is slow to start, so the report and the summary are each built once per module.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from bs4 import BeautifulSoup
from matplotlib.figure import Figure
from PIL import Image

from undiffuse import report
from undiffuse.cli import main
from undiffuse.diffusion import diffuse
from undiffuse.errors import InputError
from undiffuse.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
PITCH_PX, SCALE, BLEED, DISTAL = 100.0, 1.5, 0.3, 0.02
GENES = ["cortex_a", "cortex_b", "wm_a", "wm_b", "ventricle_a", "house_a", "house_b", "passed"]
MARKER_OF = ["cortex", "cortex", "white_matter", "white_matter", "ventricle", "", "", ""]


def write_sample(root: Path, *, seed: int = 0, n_rows: int = 20, n_cols: int = 18):
    """Write corrected.h5ad, qc/, truth.h5ad and markers.tsv, as the workflow.

    The raw counts are Poisson draws of the truth diffused with a known kernel; the correction is the truth
    rescaled plus noise. Returns ``root`` and the re-diffusion with the known kernel.
    """
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(n_rows), n_cols)
    cols = 2 * np.tile(np.arange(n_cols), n_rows) + rows % 2
    xy = np.column_stack([cols * PITCH_PX / 2, rows * PITCH_PX * np.sqrt(3) / 2]) + 150.0
    pitch_xy = xy / PITCH_PX
    centre = pitch_xy.mean(axis=0)
    offset = pitch_xy - centre
    tissue = (offset[:, 0] / 7.0) ** 2 + (offset[:, 1] / 6.0) ** 2 <= 1
    domain = np.where(offset[:, 0] < -1.5, "cortex", np.where(offset[:, 1] < 0, "white_matter", "ventricle"))
    truth = np.zeros((len(xy), len(GENES)))
    for g, region in enumerate(MARKER_OF):
        level = rng.uniform(5, 15)
        truth[:, g] = np.where(domain == region, level, 0.5) if region else level * (1 + offset[:, 0] / 35)
    truth[~tissue] = 0
    expected = diffuse(truth, pitch_xy, tissue, scale=SCALE, bleed=BLEED, distal=DISTAL)
    counts = rng.poisson(expected).astype(np.float32)
    passed = np.array([gene == "passed" for gene in GENES])
    corrected = np.clip(truth * counts.sum(0) / truth.sum(0) + rng.normal(0, 0.3, truth.shape), 0, None)
    corrected[~tissue] = 0
    corrected[:, passed] = counts[:, passed]
    barcodes = [f"AAAC{i:05d}-1" for i in range(len(xy))]
    obs = pd.DataFrame(
        {"in_tissue": tissue, "tissue": tissue, "array_row": rows, "array_col": cols}, index=barcodes
    )
    scalef = 0.25
    image = np.ones(
        (int((xy[:, 1].max() + 150) * scalef), int((xy[:, 0].max() + 150) * scalef), 3), np.float32
    )
    yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]] / scalef / PITCH_PX
    image[((xx - centre[0]) / 7.0) ** 2 + ((yy - centre[1]) / 6.0) ** 2 <= 1] = [0.85, 0.6, 0.8]
    uns = {
        "spatial": {
            "synthetic": {
                "images": {"lowres": image},
                "scalefactors": {"spot_diameter_fullres": 55.0, "tissue_lowres_scalef": scalef},
                "metadata": {},
            }
        },
        "undiffuse": {"sample_id": "synthetic", "platform": "visium", "spot_pitch_px": PITCH_PX},
    }
    epochs = np.arange(20)
    chunk_of = np.repeat([0, 1], len(epochs))
    loss = pd.DataFrame(
        {
            "chunk": chunk_of,
            "epoch": np.tile(epochs, 2),
            "total": np.exp(-np.tile(epochs, 2) / 8) + chunk_of,
            "moran": -0.5 - 0.1 * np.tile(epochs, 2) / 20,
            "poisson": 1 + np.exp(-np.tile(epochs, 2) / 5),
        }
    )
    distance = np.linspace(0, 4, 9)
    weight = np.exp(-(distance**2) / (2 * SCALE**2))
    kernel = pd.DataFrame(
        {"chunk": 0, "distance": distance, "weight": weight, "q25": 0.8 * weight, "q75": weight}
    )
    var = pd.DataFrame(
        {
            "selected": ~passed,
            "undiffuse_q_init": np.where(passed, 0.0, 0.5),
            "undiffuse_q": rng.uniform(0, 0.9, len(GENES)),
            "undiffuse_r": rng.uniform(0.5, 2, len(GENES)),
            "undiffuse_diffusion_length": np.where(passed, 0.0, rng.uniform(1, 3, len(GENES))),
            "undiffuse_bleed": np.where(passed, 0.0, BLEED),
            "undiffuse_distal": np.where(passed, 0.0, DISTAL),
            "undiffuse_corrected": ~passed,
            "undiffuse_moran_at_q_init": np.where(passed, 0.0, 0.6),
            "undiffuse_moran_raw": rng.uniform(0.2, 0.5, len(GENES)),
            "undiffuse_moran_corrected": rng.uniform(0.4, 0.7, len(GENES)),
        },
        index=GENES,
    )
    correction = {"layer": "corrected", "loss_history": loss, "kernel_profile": kernel}
    adata = AnnData(
        X=sp.csr_matrix(counts),
        obs=obs,
        var=var,
        obsm={"spatial": xy},
        layers={"corrected": sp.csr_matrix(corrected.astype(np.float32))},
        uns={**uns, "undiffuse": {**uns["undiffuse"], "correction": correction}},
    )
    root.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(root / "corrected.h5ad")
    AnnData(
        X=truth.astype(np.float32),
        obs=pd.DataFrame({"domain": domain}, index=barcodes),
        var=pd.DataFrame({"marker_of": MARKER_OF}, index=GENES),
    ).write_h5ad(root / "truth.h5ad")
    qc = root / "qc"
    qc.mkdir()
    (qc / "qc.json").write_text(json.dumps({"arc_score": 0.0512, "diffusion_cutoff": 3.5, "sample_id": "s"}))
    for name in ("tissue_mask.png", "background_decay.png"):
        fig = Figure(figsize=(3, 2))
        fig.subplots().plot([0, 1], [1, 0])
        fig.savefig(qc / name)
    markers = pd.DataFrame(
        {
            "cell_type": [m for m in MARKER_OF if m],
            "gene": [g for g, m in zip(GENES, MARKER_OF, strict=True) if m],
        }
    )
    markers.to_csv(root / "markers.tsv", sep="\t", index=False)

    def rediffuse(subset: AnnData) -> np.ndarray:
        field = subset.layers["corrected"].toarray()
        return diffuse(field, pitch_xy, tissue, scale=SCALE, bleed=BLEED, distal=DISTAL)

    return root, rediffuse


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A simulated-like sample's full report, a real-like sample's metrics, and the summary of both."""
    base = tmp_path_factory.mktemp("report")
    inputs, rediffuse = write_sample(base / "inputs")
    outputs = report.build_report(
        inputs / "corrected.h5ad",
        base / "results" / "sim",
        qc_dir=inputs / "qc",
        truth=inputs / "truth.h5ad",
        markers=inputs / "markers.tsv",
        sample="sim",
        rediffuse=rediffuse,
    )
    other, other_rediffuse = write_sample(base / "other_inputs", seed=1)
    report.write_sample_metrics(
        other / "corrected.h5ad", base / "results" / "real" / "metrics", rediffuse=other_rediffuse
    )
    metrics_dirs = {"sim": outputs.metrics_dir, "real": base / "results" / "real" / "metrics"}
    summary = report.build_summary(
        metrics_dirs, base / "results" / "summary.html", reports={"sim": outputs.html}
    )
    return outputs, summary, metrics_dirs


def soup_of(path: Path) -> BeautifulSoup:
    return BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")


def html_table(soup: BeautifulSoup, name: str) -> tuple[list[str], dict[str, list[str]]]:
    """Column headers and ``{row label: cells}`` of the report table ``table-{name}``."""
    table = soup.find("table", id=f"table-{name}")
    assert table is not None, f"table {name} is not in the HTML"
    header = [th.get_text(strip=True) for th in table.thead.find_all("tr")[0].find_all("th")][1:]
    rows = {
        tr.th.get_text(strip=True): [td.get_text(strip=True) for td in tr.find_all("td")]
        for tr in table.tbody.find_all("tr")
    }
    return header, rows


def assert_printed(printed: str, value) -> None:
    """A number printed in the report is the file's value, to the report's precision."""
    assert printed == report.format_value(value)
    if isinstance(value, float | np.floating):
        assert float(printed) == pytest.approx(
            float(value), rel=10.0 ** (1 - report.SIGNIFICANT_DIGITS), abs=1e-12
        )


def embedded_pngs(soup: BeautifulSoup) -> list[Image.Image]:
    images = []
    for img in soup.find_all("img"):
        source = img.get("src", "")
        assert source.startswith("data:image/png;base64,"), f"an image is not embedded: {source[:60]}"
        images.append(Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))))
    return images


@pytest.mark.slow
def test_report_outputs_are_complete(built):
    outputs, _, _ = built
    assert report.notebook_errors(outputs.notebook) == []
    for name in report.KEY_FIGURES:
        with Image.open(outputs.figures_dir / f"{name}.png") as figure:
            assert figure.format == "PNG" and min(figure.size) > 200
    names = {path.name for path in outputs.metrics_dir.iterdir()}
    assert {
        "summary.tsv",
        "genes.tsv",
        "consistency.tsv",
        "truth.tsv",
        "markers.tsv",
        "cell_types.tsv",
    } <= names
    assert "metrics.json" in names


@pytest.mark.slow
def test_report_html_is_self_contained_with_rendered_figures(built):
    outputs, _, _ = built
    text = outputs.html.read_text(encoding="utf-8")
    soup = BeautifulSoup(text, "html.parser")
    images = embedded_pngs(soup)
    # QC (2), quantiles, loss, kernel, before/after, cell types, truth.
    assert len(images) >= 8
    assert all(min(image.size) > 100 for image in images)
    assert not [s for s in soup.find_all("script") if s.get("src")], "the report loads scripts from elsewhere"
    assert "ReportInputs.load" not in text, "code cells are shown"
    assert "Traceback" not in text and "Error" not in soup.get_text()
    headings = [h2.get_text() for h2 in soup.find_all("h2")]
    for section in ("Quality control", "Initial quantiles", "Loss curves", "Learned diffusion", "Cell types"):
        assert any(section in heading for heading in headings), section


@pytest.mark.slow
def test_report_prints_the_metrics_of_the_files(built):
    outputs, _, _ = built
    soup = soup_of(outputs.html)
    tables = read_metrics(outputs.metrics_dir)

    header, rows = html_table(soup, "summary")
    summary = tables["summary"]
    assert list(rows) == list(dict.fromkeys(summary["metric"]))
    for metric, stage, value in summary.itertuples(index=False):
        assert_printed(rows[metric][header.index(stage)], value)
    assert {"truth_rmse", "consistency_rmse_2x2", "marker_specificity", "cell_type_accuracy"} <= set(rows)

    for name in ("genes", "truth", "markers"):
        header, rows = html_table(soup, name)
        table = tables[name]
        assert set(rows) <= set(table.index) and rows
        for gene, cells in rows.items():
            for column, printed in zip(header, cells, strict=True):
                assert_printed(printed, table.loc[gene, column])


@pytest.mark.slow
def test_report_consistency_with_the_known_kernel_beats_the_undiffused_field(built):
    outputs, _, _ = built
    summary = read_metrics(outputs.metrics_dir)["summary"].set_index(["metric", "stage"])["value"]
    assert summary["consistency_pearson", "rediffused"] > summary["consistency_pearson", "corrected"]
    assert summary["consistency_pearson_2x2", "rediffused"] > 0.9
    assert summary["truth_rmse", "corrected"] < summary["truth_rmse", "raw"]


@pytest.mark.slow
def test_summary_html_tabulates_every_sample(built):
    _, summary_html, metrics_dirs = built
    soup = soup_of(summary_html)
    assert report.notebook_errors(summary_html.with_suffix(".ipynb")) == []
    assert len(embedded_pngs(soup)) >= 1
    header, rows = html_table(soup, "samples")
    assert list(rows) == ["sim", "real"]
    for sample, folder in metrics_dirs.items():
        for metric, stage, value in read_metrics(folder)["summary"].itertuples(index=False):
            assert_printed(rows[sample][header.index(f"{metric} ({stage})")], value)
    # The real-like sample has no truth: its truth columns are empty.
    assert rows["real"][header.index("truth_rmse (raw)")] == ""
    assert soup.find("a", href="sim/report.html") is not None


def chromium_binary() -> str | None:
    found = next(
        (shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None
    )
    if found is None:
        subprocess.run(
            ["bash", str(REPO / "scripts" / "install_chromium.sh")], capture_output=True, timeout=600
        )
        found = shutil.which("chromium")
    return found


@pytest.mark.slow
def test_report_renders_in_headless_chromium(built, tmp_path):
    outputs, _, _ = built
    chromium = chromium_binary()
    if chromium is None:
        pytest.skip(
            "chromium is not installed and scripts/install_chromium.sh could not install it (needs root)"
        )
    screenshot = tmp_path / "report.png"
    profile = tmp_path / "chromium-profile"
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--screenshot={screenshot}",
        "--window-size=1280,2000",
        outputs.html.resolve().as_uri(),
    ]
    subprocess.run(command, capture_output=True, timeout=120, check=True)
    with Image.open(screenshot) as image:
        assert image.size == (1280, 2000)
        grey = np.asarray(image.convert("L"), dtype=np.float64)
    # A blank page is uniformly white; the report has text, tables and figures.
    assert (grey < 200).mean() > 0.02
    assert grey.std() > 20


@pytest.mark.slow
def test_failed_notebook_leaves_no_output(tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    template = tmp_path / "failing.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("raise ValueError('boom')")]), template)
    with pytest.raises(RuntimeError, match="ValueError: boom"):
        report.execute_notebook(template, tmp_path / "out" / "executed.ipynb", {})
    assert not (tmp_path / "out" / "executed.ipynb").exists()


def test_report_of_a_missing_file_fails_cleanly(tmp_path, capsys):
    status = main(["report", str(tmp_path / "absent.h5ad"), str(tmp_path / "out")])
    assert status == 2
    assert "absent.h5ad: corrected sample not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["report", "summary"])
def test_report_without_the_report_extra_names_the_extra(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "papermill", None)  # import papermill now raises ImportError
    corrected = tmp_path / "corrected.h5ad"
    corrected.write_bytes(b"")
    args = (
        [str(corrected), str(tmp_path / "out")]
        if command == "report"
        else [str(tmp_path / "s.html"), str(tmp_path)]
    )
    status = main([command, *args])
    assert status == 2
    assert (
        "papermill is not installed; install it with `pip install 'undiffuse[report]'`"
        in capsys.readouterr().err
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrected.h5ad"]


def test_report_rejects_a_file_that_is_not_a_corrected_sample(tmp_path):
    path = tmp_path / "prepared.h5ad"
    AnnData(X=np.ones((3, 2)), obs=pd.DataFrame(index=["a", "b", "c"])).write_h5ad(path)
    with pytest.raises(InputError, match=r"missing layers\['corrected'\]"):
        report.build_report(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_report_names_a_truth_that_does_not_fit(built, tmp_path):
    inputs = Path(built[0].html).parents[2] / "inputs"
    wrong = tmp_path / "truth.h5ad"
    AnnData(
        X=np.ones((2, 2)), obs=pd.DataFrame(index=["x", "y"]), var=pd.DataFrame(index=GENES[:2])
    ).write_h5ad(wrong)
    with pytest.raises(InputError, match="truth lacks") as err:
        report.write_sample_metrics(inputs / "corrected.h5ad", tmp_path / "metrics", truth=wrong)
    assert err.value.path == str(wrong)
    assert not (tmp_path / "metrics").exists()


def test_summary_of_a_missing_metrics_folder_fails_cleanly(tmp_path, capsys):
    status = main(["summary", str(tmp_path / "summary.html"), str(tmp_path / "s1" / "metrics")])
    assert status == 2
    assert "no summary.tsv" in capsys.readouterr().err
    assert not (tmp_path / "summary.html").exists()


def test_report_rules_are_snakefmt_formatted():
    snakefmt = shutil.which("snakefmt") or str(Path(sys.executable).with_name("snakefmt"))
    if not Path(snakefmt).exists():
        pytest.skip("snakefmt is not installed")
    result = subprocess.run(
        [snakefmt, "--check", "rules/report.smk"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def hd_bins(n: int = 24, pitch_px: float = 10.0) -> tuple[AnnData, np.ndarray]:
    """A tiny Visium HD-like sample: n x n square bins on a white hires image (scale factor 0.5)."""
    rows, cols = np.divmod(np.arange(n * n), n)
    values = (rows * n + cols).astype(np.float64)
    adata = AnnData(
        X=sp.csr_matrix(values[:, None]),
        obs=pd.DataFrame(
            {"array_row": rows, "array_col": cols, "tissue": rows < n // 2},
            index=[f"s_008um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)],
        ),
        var=pd.DataFrame(index=["gene"]),
        obsm={"spatial": np.column_stack([cols, rows]) * pitch_px + pitch_px},
    )
    side = int((n + 2) * pitch_px * 0.5)
    adata.uns["undiffuse"] = {"platform": "visium_hd", "sample_id": "hd", "spot_pitch_px": pitch_px}
    adata.uns["spatial"] = {
        "hd": {
            "images": {"hires": np.ones((side, side, 3))},
            "scalefactors": {"tissue_hires_scalef": 0.5, "bin_size_um": 8.0},
        }
    }
    return adata, values


def test_hd_bins_are_drawn_as_a_raster_of_their_values():
    """Visium HD spot plots are rasters (one pixel a bin at this size), not discs; bins outside the drawn
    spots are masked, so the H&E shows through."""
    from matplotlib.image import AxesImage

    from undiffuse.plotting.report import spatial_scatter

    adata, values = hd_bins()
    tissue = adata.obs["tissue"].to_numpy()
    ax = Figure().subplots()
    artist = spatial_scatter(adata, values, ax=ax, spots=tissue)
    assert isinstance(artist, AxesImage)
    raster = artist.get_array()
    assert raster.shape == (24, 24)
    np.testing.assert_array_equal(raster[:12].filled(-1), values.reshape(24, 24)[:12])
    assert raster.mask[12:].all() and not raster.mask[:12].any()
    colours = np.tile([1.0, 0.0, 0.0, 1.0], (adata.n_obs, 1))
    rgba = spatial_scatter(adata, ax=Figure().subplots(), spots=tissue, colours=colours).get_array()
    np.testing.assert_array_equal(rgba[:12, :, 0], 1.0)
    np.testing.assert_array_equal(rgba[12:, :, 3], 0.0)  # transparent off the drawn spots


def test_kernel_figure_draws_lengths_in_microns_with_the_pitch():
    from undiffuse.plotting.report import plot_kernel

    profile = pd.DataFrame({"distance": [0.0, 1.0, 2.0], "weight": [1.0, 0.5, 0.1]})
    fig = plot_kernel(profile, [1.0, 2.0, 3.0], pitch_um=8.0)
    left, right = fig.axes[:2]
    assert left.get_xlabel() == "distance (um)" and right.get_xlabel() == "diffusion length (um)"
    np.testing.assert_array_equal(left.get_lines()[0].get_xdata(), [0.0, 8.0, 16.0])
    assert right.get_legend().get_texts()[0].get_text() == "median 16"
    pitches = plot_kernel(profile, [1.0, 2.0, 3.0])
    assert pitches.axes[0].get_xlabel() == "distance (spot pitches)"


def test_report_inputs_give_diffusion_lengths_in_microns(tmp_path):
    adata, _ = hd_bins()
    adata.layers["corrected"] = adata.X.copy()
    adata.var["undiffuse_corrected"] = True
    adata.var["undiffuse_diffusion_length"] = 1.5
    adata.var["undiffuse_bleed"] = 0.3
    inputs = report.ReportInputs(sample="hd", corrected=adata, metrics={})
    assert inputs.pitch_um() == 8.0
    table = inputs.diffusion_lengths_um()
    assert table.loc["gene", "diffusion_length_um"] == pytest.approx(12.0)
    assert table.loc["gene", "bleed"] == pytest.approx(0.3)


def test_report_inputs_list_the_model_settings_with_the_rank_of_the_low_rank_model():
    adata, _ = hd_bins()
    config = {"operator": "lattice", "programmes": 8, "prior_strength": "auto", "lr": 0.05}
    adata.uns["undiffuse"] = {"correction": {"config": config}}
    settings = report.ReportInputs(sample="hd", corrected=adata, metrics={}).model_settings()
    assert settings["value"].to_dict() == {"operator": "lattice", "programmes": "8", "prior_strength": "auto"}
    config["programmes"] = 0
    settings = report.ReportInputs(sample="hd", corrected=adata, metrics={}).model_settings()
    assert settings.loc["programmes", "value"].startswith("0 (each gene on its own")


def test_the_loss_panels_are_the_history_columns_in_their_order():
    """One panel per loss term the trainer recorded, in its order, whatever the terms are: the report keeps no
    list of its own."""
    from undiffuse.plotting.report import plot_loss_history

    epochs = np.arange(3)
    history = {
        "0": pd.DataFrame({"epoch": epochs, "total": [3.0, 2, 1], "poisson": [2.0, 1, 0.5], "new_term": 1.0}),
        "1": pd.DataFrame({"epoch": epochs, "total": [4.0, 3, 2], "moran": [-0.1, -0.2, -0.3]}),
    }
    figure = plot_loss_history(history)
    assert [ax.get_title() for ax in figure.axes if ax.has_data()] == [
        "total",
        "poisson",
        "new_term",
        "moran",
    ]
