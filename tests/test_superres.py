"""Histology-guided super-resolution (undiffuse.superres, `undiffuse superres`): the aggregation operator,
exact consistency with the spots, zero off tissue, the baselines, the seed's cell-type localisation per pixel,
bad input and the command line."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from conftest import hex_lattice
from scipy.spatial import cKDTree

from undiffuse.errors import InputError
from undiffuse.metrics import pearson
from undiffuse.superres import (
    MODELS,
    PixelGrid,
    aggregation_matrix,
    bicubic,
    cell_shares,
    footprint_cells,
    guided_filter,
    nearest_spot,
    pixel_cell_types,
    pixel_grid,
    poisson_nmf,
    project,
    segment_nuclei,
    superresolve,
    surrounding_programmes,
)

PITCH = 100.0
RADIUS = 27.5
SCALEF = 0.25
FAST = dict(epochs=60, refine_epochs=20, ensemble=2, threads=1)


#: Dark nuclei-like discs of the test image: centres and radii in full-resolution pixels.
_BLOBS = np.random.default_rng(5).uniform([0, 0, 12], [1440, 1440, 30], (700, 3))


def _dark(points: np.ndarray) -> np.ndarray:
    """Whether full-resolution points ``(x, y)`` lie in a dark disc of the test image."""
    distance, nearest = cKDTree(_BLOBS[:, :2]).query(points, k=8)
    return (distance <= _BLOBS[nearest, 2]).any(axis=1)


def _image(shape: tuple[int, int]) -> np.ndarray:
    """H&E-like test image (scale SCALEF): pale pink tissue with dark purple discs."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    points = np.column_stack([xx.ravel() + 0.5, yy.ravel() + 0.5]) / SCALEF
    image = np.empty((*shape, 3))
    image[...] = [0.9, 0.7, 0.8]
    image[_dark(points).reshape(shape)] = [0.45, 0.25, 0.6]
    return image


def _pixel_truth(grid: PixelGrid, pixels: np.ndarray, n_genes: int) -> np.ndarray:
    """Expression that follows the image: gene g has level (g + 1) in the dark discs, a tenth of it elsewhere."""
    dark = _dark(grid.centres_px(pixels))
    return np.where(dark[:, None], 1.0, 0.1) * np.arange(1, n_genes + 1)[None, :] * grid.pixel_px**2 / 100.0


def _sample(values: np.ndarray | None = None, *, n_genes: int = 6, image: bool = True, seed: int = 0):
    coords = hex_lattice(12, 11) * PITCH + 150.0
    tissue = np.hypot(*(coords - coords.mean(axis=0)).T) < 420.0
    if values is None:
        values = np.random.default_rng(seed).gamma(2.0, 10.0, (coords.shape[0], n_genes))
    values = np.where(tissue[:, None], values, 0.0)
    adata = AnnData(sp.csr_matrix(values.astype(np.float32)))
    adata.var_names = [f"g{k}" for k in range(values.shape[1])]
    adata.obs_names = [f"s{i}" for i in range(coords.shape[0])]
    adata.obs["tissue"] = tissue
    adata.obsm["spatial"] = coords
    adata.uns["undiffuse"] = {"spot_pitch_px": PITCH, "sample_id": "toy"}
    images = {"hires": _image((360, 360))} if image else {}
    adata.uns["spatial"] = {
        "toy": {
            "images": images,
            "scalefactors": {"tissue_hires_scalef": SCALEF, "spot_diameter_fullres": 55.0},
        }
    }
    return adata


@pytest.fixture(scope="module", params=MODELS)
def result_5x(request):
    adata = _sample()
    return adata, superresolve(adata, factor=5, model=request.param, **FAST)


def test_aggregation_operator_is_the_footprint_area():
    grid = PixelGrid((0.0, 0.0), 10.0, 40, 40)
    centres = np.array([[200.0, 200.0], [300.0, 200.0 + PITCH * math.sqrt(3) / 2]])
    A = aggregation_matrix(grid, centres, RADIUS, np.arange(grid.n_pixels), supersample=8)
    assert A.shape == (2, grid.n_pixels)
    assert A.data.min() > 0 and A.data.max() <= 1.0
    # Each row sums to the disc's area in pixels (pi r^2 / 10^2 = 23.76), up to the point sampling.
    np.testing.assert_allclose(np.asarray(A.sum(axis=1)).ravel(), math.pi * RADIUS**2 / 100.0, rtol=0.02)
    # Visium footprints (55 um spots, 100 um apart) share no pixel.
    assert (A[0].multiply(A[1])).nnz == 0
    # Restricted to some pixels, the operator keeps their columns only.
    keep = np.arange(0, grid.n_pixels, 2)
    B = aggregation_matrix(grid, centres, RADIUS, keep, supersample=8)
    np.testing.assert_allclose(B.toarray(), A.toarray()[:, keep])


def test_pixel_grid_is_factor_times_finer_and_anchored():
    coords = hex_lattice(4, 4) * PITCH + 500.0
    grid = pixel_grid(coords, PITCH, 10, origin_px=(3.0, 7.0))
    assert grid.pixel_px == pytest.approx(10.0)
    steps = (np.asarray(grid.origin_px) - (3.0, 7.0)) / 10.0
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-9)
    centres = grid.centres_px()
    assert centres[:, 0].min() < coords[:, 0].min() - 50 and centres[:, 1].max() > coords[:, 1].max() + 50


def test_maps_aggregate_exactly_to_the_spots_and_vanish_off_tissue(result_5x):
    adata, result = result_5x
    values = adata.X.toarray().astype(np.float64)
    tissue = adata.obs["tissue"].to_numpy(bool)
    assert result.maps.shape == (result.pixels.size, adata.n_vars)
    assert np.isfinite(result.maps).all() and (result.maps >= 0).all()
    np.testing.assert_allclose(result.aggregate()[tissue], values[tissue], rtol=1e-5, atol=1e-4)
    # Tissue pixels lie in the Voronoi cells of tissue spots; everything else is zero in the dense image.
    _, nearest = cKDTree(adata.obsm["spatial"]).query(result.grid.centres_px(result.pixels))
    assert tissue[nearest].all()
    dense = result.dense("g0")
    outside = np.ones(result.grid.n_pixels, dtype=bool)
    outside[result.pixels] = False
    assert dense.shape == result.grid.shape and not dense.ravel()[outside].any()
    history = result.loss_history
    first = history["loss"][history["stage"] == "programmes"] if "stage" in history else history["total"]
    assert first.iloc[-1] < first.iloc[0]


def test_anndata_output_plots_with_scanpy_layout(result_5x):
    adata, result = result_5x
    out = result.to_anndata(adata)
    assert out.shape == (result.pixels.size, adata.n_vars)
    assert out.obsm["spatial"].shape == (out.n_obs, 2)
    library = out.uns["spatial"]["toy"]
    assert library["scalefactors"]["spot_diameter_fullres"] == pytest.approx(result.grid.pixel_px)
    assert "hires" in library["images"]
    assert out.uns["superres"]["factor"] == 5
    np.testing.assert_array_equal(out.X, result.maps)


@pytest.mark.slow
def test_image_guides_the_maps_beyond_bicubic():
    """Expression that follows the H&E discs: the learned maps find the discs inside and between spots."""
    probe = _sample(n_genes=4)
    coords = probe.obsm["spatial"]
    grid = pixel_grid(coords, PITCH, 10)
    pixels = np.arange(grid.n_pixels)
    truth = _pixel_truth(grid, pixels, 4)
    spots = aggregation_matrix(grid, coords, RADIUS, pixels) @ truth
    adata = _sample(spots)
    result = superresolve(adata, factor=10, epochs=150, threads=1)
    reference = _pixel_truth(result.grid, result.pixels, 4)
    ours = pearson(result.maps, reference).mean()
    cubic = bicubic(result.grid, result.pixels, coords, adata.X.toarray(), RADIUS)
    assert ours > pearson(cubic, reference).mean() + 0.2
    assert ours > 0.8


def test_projection_is_exact_with_overlapping_footprints():
    rng = np.random.default_rng(1)
    grid = PixelGrid((0.0, 0.0), 10.0, 30, 30)
    centres = hex_lattice(3, 3) * 80.0 + 60.0
    A = aggregation_matrix(grid, centres, 45.0, np.arange(grid.n_pixels))
    assert ((A > 0).sum(axis=0) > 1).any()  # some pixels are shared by two spots
    y = A @ rng.gamma(2.0, 1.0, (grid.n_pixels, 3))  # spot values that some map reaches
    x = project(rng.uniform(0.5, 1.5, (grid.n_pixels, 3)), A, y, tol=1e-9, max_iter=5000)
    np.testing.assert_allclose(A @ x, y, rtol=1e-6)
    assert (x >= 0).all()


def test_projection_fills_a_footprint_the_model_left_empty():
    grid = PixelGrid((0.0, 0.0), 10.0, 20, 20)
    A = aggregation_matrix(grid, np.array([[100.0, 100.0]]), RADIUS, np.arange(grid.n_pixels))
    x = project(np.zeros((grid.n_pixels, 1)), A, np.array([[7.0]]))
    np.testing.assert_allclose(A @ x, [[7.0]])
    under = np.asarray(A.sum(axis=0)).ravel() > 0
    assert np.ptp(x[under]) == pytest.approx(0.0) and not x[~under].any()


def test_baselines():
    coords = hex_lattice(6, 6) * PITCH + 100.0
    grid = pixel_grid(coords, PITCH, 10)
    pixels = np.arange(grid.n_pixels)
    centres = grid.centres_px(pixels)
    area = math.pi * RADIUS**2
    # A linear density field is reproduced by the cubic interpolation inside the spots' hull.
    values = (1.0 + 0.01 * coords[:, :1] + 0.02 * coords[:, 1:]) * area
    cubic = bicubic(grid, pixels, coords, values, RADIUS)
    inside = (centres[:, 0] > 300) & (centres[:, 0] < 500) & (centres[:, 1] > 200) & (centres[:, 1] < 400)
    expected = (1.0 + 0.01 * centres[:, 0] + 0.02 * centres[:, 1]) * grid.pixel_px**2
    np.testing.assert_allclose(cubic[inside, 0], expected[inside], rtol=1e-6)
    # Nearest spot: each pixel takes its nearest spot's density.
    near = nearest_spot(grid, pixels, coords, values, RADIUS)
    _, nearest = cKDTree(coords).query(centres)
    np.testing.assert_allclose(near[:, 0], values[nearest, 0] / area * grid.pixel_px**2)
    # The guided filter keeps a constant map and follows a guide that explains the input linearly.
    guide = np.sin(centres[:, 0] / 40.0).reshape(grid.shape)
    flat = guided_filter(grid, pixels, np.full((pixels.size, 1), 3.0), guide, radius=3)
    np.testing.assert_allclose(flat, 3.0, rtol=1e-9)
    linear = 2.0 + guide.ravel()[:, None]
    np.testing.assert_allclose(
        guided_filter(grid, pixels, linear, guide, radius=3, eps=1e-8), linear, rtol=1e-4
    )


def test_pixel_cell_types_follow_the_seed_definition():
    maps = np.array([[0.0, 10.0, 1.0], [5.0, 0.0, 3.0], [10.0, 5.0, 2.0]])
    markers = pd.DataFrame({"cell_type": ["A", "B", "B"], "gene": ["a", "b", "c"]})
    typed = pixel_cell_types(maps, ["a", "b", "c"], markers)
    scaled = (maps - maps.min(axis=0)) / np.ptp(maps, axis=0)
    scores = np.column_stack([scaled[:, 0], scaled[:, 1:].mean(axis=1)])
    np.testing.assert_allclose(typed[["score_A", "score_B"]].to_numpy(), scores)
    assert typed["cell_type"].tolist() == ["B", "A", "A"]
    np.testing.assert_allclose(typed["score"], scores.max(axis=1))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.uns["spatial"]["toy"].update(images={}), "no H&E image"),
        (lambda a: a.X.data.__setitem__(0, -1.0), "non-negative"),
        (lambda a: a.obs.drop(columns="tissue", inplace=True), "no tissue calls"),
    ],
)
def test_bad_input_names_the_file(change, message):
    adata = _sample()
    adata.uns["undiffuse"]["source"] = "corrected.h5ad"
    change(adata)
    with pytest.raises(InputError, match=message) as info:
        superresolve(adata, factor=5, **FAST)
    assert "corrected.h5ad" in str(info.value)


def test_cli_writes_pixels_and_reports_bad_input(tmp_path, capsys):
    import anndata

    from undiffuse.cli import main

    adata = _sample(n_genes=3)
    path = tmp_path / "corrected.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "superres.h5ad"
    assert (
        main(["superres", str(path), "-o", str(out), "--factor", "5", "--epochs", "20", "--threads", "1"])
        == 0
    )
    written = anndata.read_h5ad(out)
    tissue = adata.obs["tissue"].to_numpy(bool)
    spots = adata.X.toarray()[tissue]
    assert written.n_vars == 3 and written.uns["superres"]["factor"] == 5
    assert written.obsm["spatial"].shape == (written.n_obs, 2)
    # Aggregating the written pixels with the operator reproduces the spots.
    grid = PixelGrid(
        tuple(written.uns["superres"]["origin_px"]),
        written.uns["superres"]["pixel_px"],
        written.uns["superres"]["n_rows"],
        written.uns["superres"]["n_cols"],
    )
    flat = written.obs["array_row"].to_numpy() * grid.n_cols + written.obs["array_col"].to_numpy()
    A = aggregation_matrix(grid, adata.obsm["spatial"][tissue], RADIUS, flat)
    np.testing.assert_allclose(A @ written.X, spots, rtol=1e-4, atol=1e-3)

    bad = _sample(n_genes=3, image=False)
    bad_path = tmp_path / "no_image.h5ad"
    bad.write_h5ad(bad_path)
    capsys.readouterr()
    assert main(["superres", str(bad_path), "-o", str(tmp_path / "x.h5ad"), "--factor", "5"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "no_image.h5ad" in error and "H&E image" in error
    assert not (tmp_path / "x.h5ad").exists()


def test_report_figures_and_most_changed_genes(result_5x, tmp_path):
    from undiffuse.superres import most_changed_genes, plot_cell_types, plot_maps

    adata, result = result_5x
    changed = adata.copy()
    moved = adata.X.toarray()
    moved[:, 2] *= 3.0
    changed.layers["corrected"] = moved
    assert most_changed_genes(changed, result.genes, 1) == ["g2"]
    assert most_changed_genes(adata, result.genes, 2) == ["g0", "g1"]
    markers = pd.DataFrame({"cell_type": ["A", "B"], "gene": ["g0", "g1"]})
    typed = pixel_cell_types(result.maps, result.genes, markers)
    assert len(typed) == result.pixels.size and set(typed["cell_type"]) <= {"A", "B"}
    for path in (
        plot_maps(result, adata, ["g0", "g1"], tmp_path / "maps.png"),
        plot_cell_types(result, adata, typed, tmp_path / "types.png"),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_poisson_nmf_recovers_a_low_rank_product():
    rng = np.random.default_rng(3)
    V = rng.gamma(1.0, 1.0, (40, 3)) @ rng.gamma(1.0, 2.0, (3, 25))
    W, H = poisson_nmf(V, 3, iterations=2000)
    assert W.shape == (40, 3) and H.shape == (3, 25) and (W >= 0).all() and (H >= 0).all()
    np.testing.assert_allclose(W @ H, V, rtol=0.05, atol=0.05 * V.mean())
    # The multiplicative updates never raise the Poisson loss: more iterations fit at least as well.
    W_short, H_short = poisson_nmf(V, 3, iterations=20)

    def loss(fit):
        return float(np.sum(fit - V * np.log(fit)))

    assert loss(W @ H) <= loss(W_short @ H_short)


def _nuclei_image(centres: np.ndarray, radius: float, shape=(80, 80)) -> np.ndarray:
    """Pink tissue with purple nuclei (discs of ``radius`` pixels at ``centres`` (row, col))."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    image = np.empty((*shape, 3))
    image[...] = [0.9, 0.7, 0.8]
    for r, c in centres:
        image[np.hypot(rows - r, cols - c) <= radius] = [0.35, 0.2, 0.55]
    return image


def test_nuclei_are_segmented_split_and_own_their_cells():
    # Two touching nuclei (centres 7 px apart, radius 4) and a lone one; 1 um per pixel.
    centres = np.array([[20.0, 20.0], [20.0, 27.0], [60.0, 55.0]])
    nuclei = segment_nuclei(_nuclei_image(centres, 4.0), 1.0, reach_um=3.0)
    assert nuclei.n_cells == 3
    assert nuclei.features.shape[0] == 3 and np.isfinite(nuclei.features).all()
    at = [nuclei.owner[int(r), int(c)] for r, c in centres]
    assert len(set(at)) == 3 and max(at) < 3
    # Centres (x, y) in image pixels: the disc drawn around pixel (row, col) is centred at (col + 0.5, row + 0.5).
    np.testing.assert_allclose(nuclei.centres[at], centres[:, ::-1] + 0.5, atol=0.1)
    # A cell reaches 3 um beyond its nucleus, no further.
    assert nuclei.owner[60, 55 + 4 + 2] == at[2]
    assert nuclei.owner[60, 55 + 4 + 6] == nuclei.n_cells
    # An image without nuclei has no cell.
    empty = segment_nuclei(_nuclei_image(np.zeros((0, 2)), 4.0), 1.0)
    assert empty.n_cells == 0 and (empty.owner == 0).all()


def test_cell_areas_of_pixels_and_footprints():
    centres = np.array([[20.0, 20.0], [60.0, 55.0]])
    nuclei = segment_nuclei(_nuclei_image(centres, 4.0), 1.0, reach_um=3.0)
    grid = PixelGrid((0.0, 0.0), 10.0, 8, 8)
    pixels = np.arange(grid.n_pixels)
    shares = cell_shares(grid, pixels, nuclei, 1.0, um_per_px=1.0)
    assert shares.shape == (grid.n_pixels, nuclei.n_cells + 1)
    np.testing.assert_allclose(np.asarray(shares.sum(axis=1)).ravel(), 1.0)
    # Each cell's area (a disc of 7 um) is found in the pixels around it, to the sampling (points 2 um apart).
    np.testing.assert_allclose(
        np.asarray(shares.sum(axis=0)).ravel()[:2] * 100.0, math.pi * 7.0**2, rtol=0.25
    )
    spots = np.array([[20.0, 20.0], [15.0, 65.0]])  # (x, y): on the first cell, and in empty tissue
    areas = footprint_cells(spots, 12.0, nuclei, 1.0, um_per_px=1.0, pixel_px=10.0)
    np.testing.assert_allclose(np.asarray(areas.sum(axis=1)).ravel(), math.pi * 144.0 / 100.0)
    assert areas[0, nuclei.owner[20, 20]] > 0.9 * math.pi * 49.0 / 100.0
    assert areas[1, nuclei.n_cells] == pytest.approx(math.pi * 144.0 / 100.0)


def test_surrounding_programmes_leave_out_the_cells_own_spot():
    spots = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    abundance = np.array([[4.0, 0.0], [1.0, 3.0], [0.0, 2.0]])
    # The cells: under the first spot's footprint; halfway between the first two; beyond every spot's reach.
    cells = np.array([[5.0, 0.0], [50.0, 0.0], [1000.0, 1000.0]])
    mix = surrounding_programmes(cells, spots, abundance, sigma=100.0, radius=27.5)
    shares = abundance / abundance.sum(axis=1, keepdims=True)

    def expected(cell, spots_in_reach):
        weights = np.exp(-0.5 * (np.hypot(*(cell - spots[spots_in_reach]).T) / 100.0) ** 2)
        return weights @ shares[spots_in_reach] / weights.sum()

    np.testing.assert_allclose(mix[0], expected(cells[0], [1, 2]))  # its own spot is left out
    np.testing.assert_allclose(mix[1], expected(cells[1], [0, 1, 2]))  # between footprints, every spot counts
    np.testing.assert_allclose(mix[2], [0.5, 0.5])
    np.testing.assert_allclose(mix.sum(axis=1), 1.0)


def test_surrounding_spots_type_the_cells_between_footprints():
    """Cells that all look alike, in two halves of opposite expression: only the surrounding spots' programme
    mix tells the halves apart in the gaps between footprints, where no spot is measured."""
    coords = hex_lattice(12, 11) * PITCH + 150.0
    left = coords[:, 0] < coords[:, 0].mean()
    values = np.column_stack([np.where(left, 40.0, 4.0), np.where(left, 4.0, 40.0), np.full(left.size, 10.0)])
    adata = _sample(values)
    settings = {**FAST, "epochs": 200}
    typed = superresolve(adata, factor=5, **settings)
    alone = superresolve(adata, factor=5, neighbour_sigma=0.0, **settings)
    np.testing.assert_array_equal(typed.pixels, alone.pixels)
    gaps = np.asarray(typed.aggregation.sum(axis=0)).ravel() == 0
    centres = typed.grid.centres_px(typed.pixels[gaps])
    # Gap pixels at least half a pitch from the border between the halves.
    side = np.where(
        centres[:, 0] < coords[:, 0].mean() - 50, 1, np.where(centres[:, 0] > coords[:, 0].mean() + 50, -1, 0)
    )

    def contrast(result):
        log_ratio = np.log((result.maps[gaps, 0] + 1e-3) / (result.maps[gaps, 1] + 1e-3))
        return float(np.mean(log_ratio[side == 1]) - np.mean(log_ratio[side == -1]))

    # The truth's contrast is 2 log 10 = 4.6; the stain context alone guesses part of it.
    assert contrast(typed) > 2.3
    assert contrast(typed) > contrast(alone) + 0.6


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown super-resolution model"):
        superresolve(_sample(), factor=5, model="diffusion", **FAST)
