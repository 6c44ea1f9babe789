"""The lattice FFT operator against the pair operator, its adjoint, conservation, confinement, the lattice fit
and the accelerated EM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import hex_lattice

from undiffuse.diffusion import expected_counts, profile, profile_log_weights
from undiffuse.lattice import fast_fft_size, fit_lattice
from undiffuse.operators import LatticeOperator, PairOperator, build_operator
from undiffuse.ot.cost import cost_weights, pair_features
from undiffuse.ot.deconvolution import deconvolve_em

SCALES = torch.tensor([0.6, 1.5, 3.5], dtype=torch.float64)


def square_lattice(n_rows: int, n_cols: int) -> np.ndarray:
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    return np.column_stack([cols.ravel(), rows.ravel()]).astype(np.float64)


def rotated(coords: np.ndarray, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    return coords @ np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]).T + 7.3


def disc_tissue(coords: np.ndarray, radius: float) -> np.ndarray:
    return np.hypot(*(coords - coords.mean(axis=0)).T) < radius


def learned_profile(reach: float):
    """f_phi's Gibbs kernel with a radial shape and a tissue-boundary term, different for every gene."""
    phi = torch.tensor(
        [[0.3, -0.2, 0.1, 0.0, 0.7], [-0.4, 0.2, 0.0, 0.3, -0.5], [0.0, 0.0, 0.0, 0.0, 0.0]],
        dtype=torch.float64,
    )
    reg = torch.tensor([1.0, 3.0, 8.0], dtype=torch.float64)
    return lambda d, c: -cost_weights(pair_features(d, c, reach), phi) * d[:, None] ** 2 / reg


PROFILES = {
    "gaussian": profile(SCALES, "gaussian"),
    "heavy_tailed": profile(SCALES, "heavy_tailed"),
    "learned f_phi with tissue term": learned_profile(4.0),
}


@pytest.fixture(params=["hexagonal", "square rotated by 30 degrees"])
def slide(request):
    if request.param == "hexagonal":
        coords = hex_lattice(13, 11)
    else:
        coords = rotated(square_lattice(12, 10), 30.0)
    return coords, disc_tissue(coords, 3.6)


@pytest.mark.parametrize("name", list(PROFILES))
@pytest.mark.parametrize("cutoff", [2.5, 40.0])
def test_lattice_equals_pairs(slide, name, cutoff):
    """With the same truncation radius (a large one holds all the mass) both operators give the same kernel."""
    coords, tissue = slide
    pairs = PairOperator(coords, tissue, cutoff, dtype=torch.float64).bind(PROFILES[name])
    lattice = build_operator(coords, tissue, cutoff=cutoff, dtype=torch.float64)
    assert isinstance(lattice, LatticeOperator)
    fft = lattice.bind(PROFILES[name])
    rng = np.random.default_rng(0)
    field = torch.as_tensor(rng.random((len(coords), 3)) * tissue[:, None])
    values = torch.as_tensor(rng.random((len(coords), 3)))
    for op in ("push", "pull"):
        x = field if op == "push" else values
        expected, got = getattr(pairs, op)(x), getattr(fft, op)(x)
        assert float((got - expected).abs().max() / expected.abs().max()) < 1e-6, op


@pytest.mark.parametrize("tissue_dependent", [False, True])
def test_lattice_gradients_equal_pair_gradients(slide, tissue_dependent):
    """The lattice convolution's hand-written backward gives the gradients autograd finds through the pairs,
    with respect to the field and to the kernel's parameters, through the normaliser, push and pull."""
    coords, tissue = slide
    rng = np.random.default_rng(1)
    field = torch.as_tensor(rng.random((len(coords), 3)) * tissue[:, None])
    values = torch.as_tensor(rng.random((len(coords), 3)))
    weights = torch.as_tensor(rng.random((len(coords), 3)))
    gradients = []
    for operator in (
        PairOperator(coords, tissue, 40.0, dtype=torch.float64),
        build_operator(coords, tissue, cutoff=40.0, dtype=torch.float64),
    ):
        phi = torch.tensor(
            [[0.3, -0.2, 0.1, 0.0, 0.7], [-0.4, 0.2, 0.0, 0.3, 0.0], [0.1, 0.0, -0.1, 0.0, 0.0]],
            dtype=torch.float64,
            requires_grad=True,
        )
        reg = torch.tensor([1.0, 3.0, 8.0], dtype=torch.float64, requires_grad=True)
        z = field.clone().requires_grad_(True)
        kernel = operator.bind(
            lambda d, c, phi=phi, reg=reg: (
                -cost_weights(pair_features(d, c, 4.0), phi) * d[:, None] ** 2 / reg
            ),
            tissue_dependent=tissue_dependent,
        )
        loss = (kernel.push(z) * weights).sum() + (kernel.pull(values * kernel.push(z)) * weights).sum()
        grad_z, grad_phi, grad_reg = torch.autograd.grad(loss, (z, phi, reg))
        # Background spots are no sources of the pairs; the field is zero there.
        gradients.append((grad_z[torch.as_tensor(tissue)], grad_phi, grad_reg))
    for pairs, lattice in zip(*gradients, strict=True):
        np.testing.assert_allclose(
            lattice.numpy(), pairs.numpy(), rtol=1e-6, atol=1e-9 * float(pairs.abs().max())
        )


@pytest.mark.parametrize("name", list(PROFILES))
def test_adjoint_conservation_and_confinement_without_cutoff(slide, name):
    coords, tissue = slide
    kernel = build_operator(coords, tissue, dtype=torch.float64).bind(PROFILES[name])
    rng = np.random.default_rng(1)
    z = torch.as_tensor(rng.random((len(coords), 3)) * tissue[:, None])
    y = torch.as_tensor(rng.random((len(coords), 3)))
    pushed, pulled = kernel.push(z), kernel.pull(y)
    np.testing.assert_allclose((pushed * y).sum(0), (z * pulled).sum(0), rtol=1e-10)
    np.testing.assert_allclose(pushed.sum(0), z.sum(0), rtol=1e-10)
    assert torch.all(pulled[~torch.as_tensor(tissue)] == 0)


def test_no_cutoff_keeps_the_heavy_tail():
    """Without a cutoff a heavy-tailed kernel reaches across the slide: it equals the pair operator with a
    radius as wide as the slide, and differs from one cut at 4 scales by more than the tolerance."""
    coords = hex_lattice(20, 18)
    tissue = disc_tissue(coords, 4.0)
    heavy = profile(torch.tensor([1.0], dtype=torch.float64), "heavy_tailed")
    operator = build_operator(coords, tissue, dtype=torch.float64)
    field = torch.as_tensor(tissue[:, None].astype(np.float64))
    lattice = operator.bind(heavy).push(field)
    assert operator.last_radius > 15
    whole = PairOperator(coords, tissue, 40.0, dtype=torch.float64).bind(heavy).push(field)
    cut = PairOperator(coords, tissue, 4.0, dtype=torch.float64).bind(heavy).push(field)
    assert float((lattice - whole).abs().max() / whole.max()) < 1e-5
    assert float((lattice - cut).abs().max() / whole.max()) > 1e-3


def test_kept_radius_follows_the_kernel_mass():
    coords = hex_lattice(40, 36)
    tissue = disc_tissue(coords, 8.0)
    operator = build_operator(coords, tissue, dtype=torch.float64)
    narrow, wide = operator.kept_radius(profile(torch.tensor([0.5, 2.0], dtype=torch.float64), "gaussian"))
    # A Gaussian of scale s holds all but 1e-6 of its mass within s * sqrt(2 ln 1e6) = 5.26 s.
    assert float(narrow) == pytest.approx(0.5 * 5.26, abs=0.1)
    assert float(wide) == pytest.approx(2.0 * 5.26, abs=0.2)


def test_results_do_not_depend_on_the_gene_batch():
    coords = hex_lattice(16, 14)
    tissue = disc_tissue(coords, 4.5)
    operator = build_operator(coords, tissue, dtype=torch.float64)
    field = torch.as_tensor(np.random.default_rng(2).random((len(coords), 3)) * tissue[:, None])
    together = operator.bind(PROFILES["gaussian"]).push(field)
    for g in range(3):
        alone = operator.bind(profile(SCALES[g : g + 1], "gaussian")).push(field[:, g : g + 1])
        np.testing.assert_allclose(alone[:, 0], together[:, g], rtol=1e-9, atol=1e-12)


def test_float32_operator_is_close_to_float64():
    coords = hex_lattice(30, 26)
    tissue = disc_tissue(coords, 8.0)
    field = np.random.default_rng(3).random((len(coords), 3)) * tissue[:, None] * 100
    results = []
    for dtype in (torch.float32, torch.float64):
        kernel = build_operator(coords, tissue, dtype=dtype).bind(profile(SCALES.to(dtype), "gaussian"))
        results.append(kernel.push(torch.as_tensor(field, dtype=dtype)).double())
    assert float((results[0] - results[1]).abs().max() / results[1].max()) < 1e-5
    assert (results[0] >= 0).all()


def test_fit_lattice_recovers_indices_and_rejects_scattered_spots():
    coords = rotated(hex_lattice(9, 7), 12.0)
    lattice = fit_lattice(coords)
    assert lattice is not None and lattice.n_spots == len(coords)
    steps = np.linalg.norm(lattice.basis, axis=0)
    np.testing.assert_allclose(steps, 1.0, atol=1e-9)
    angle = np.degrees(np.arccos(abs(lattice.basis[:, 0] @ lattice.basis[:, 1])))
    assert angle == pytest.approx(60.0, abs=1e-6)
    # Every spot's index maps back onto its coordinates.
    origin = coords[0] - lattice.basis @ lattice.index[0]
    np.testing.assert_allclose(origin + lattice.index @ lattice.basis.T, coords, atol=1e-9)
    scattered = np.random.default_rng(4).random((60, 2)) * 8
    assert fit_lattice(scattered) is None
    with pytest.raises(ValueError, match="lattice"):
        build_operator(scattered, scattered[:, 0] < 4, kind="lattice")
    assert isinstance(build_operator(scattered, scattered[:, 0] < 4, cutoff=2.0), PairOperator)


def test_fit_lattice_on_the_real_mouse_brain(shared_data):
    from undiffuse.io import read_sample
    from undiffuse.spatial import pitch_coordinates

    adata = read_sample(shared_data / "visium_mouse_brain_raw_top100" / "outs")
    lattice = fit_lattice(pitch_coordinates(adata))
    assert lattice is not None and lattice.n_spots == adata.n_obs
    # Visium: 78 rows of 64 spots on a hexagonal lattice, one pitch apart.
    np.testing.assert_allclose(np.linalg.norm(lattice.basis, axis=0), 1.0, atol=0.01)


def test_fast_fft_size():
    assert [fast_fft_size(n) for n in (1, 11, 97, 121)] == [1, 12, 98, 125]


@pytest.mark.slow
def test_accelerated_em_reaches_the_likelihood_of_plain_em_sooner():
    coords = hex_lattice(24, 20)
    tissue = disc_tissue(coords, 6.0)
    rng = np.random.default_rng(5)
    truth = rng.gamma(2.0, 20.0, (len(coords), 2)) * tissue[:, None]
    operator = build_operator(coords, tissue, dtype=torch.float64)
    kernel = operator.bind(profile(torch.tensor([1.5, 2.5], dtype=torch.float64), "gaussian"))
    shares = torch.tensor([0.4, 0.4], dtype=torch.float64)
    mu = expected_counts(torch.as_tensor(truth), kernel, shares, 0.05 * shares)
    counts = torch.as_tensor(rng.poisson(mu.numpy()), dtype=torch.float64)
    start = torch.as_tensor(tissue[:, None] * np.ones((1, 2))) * counts.sum(0) / tissue.sum()

    def log_likelihood(field):
        m = expected_counts(field, kernel, shares, 0.05 * shares)
        return (counts * torch.log(m.clamp_min(1e-300)) - m).sum(0)

    with torch.no_grad():
        plain = deconvolve_em(counts, start, kernel, shares, 0.05 * shares, n_iter=60)
        fast = deconvolve_em(counts, start, kernel, shares, 0.05 * shares, n_iter=21, accelerate=True)
    assert torch.all(log_likelihood(fast) >= log_likelihood(plain) - 1e-6 * log_likelihood(plain).abs())
    np.testing.assert_allclose(fast.sum(0), counts.sum(0), rtol=1e-9)
    assert torch.all(fast[~torch.as_tensor(tissue)] == 0) and torch.all(fast >= 0)


def test_profiles_are_radial_log_weights():
    distance = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    logw = profile_log_weights(distance, torch.tensor([1.0], dtype=torch.float64), "gaussian")
    np.testing.assert_allclose(logw[:, 0], [0.0, -0.5, -2.0])
