"""Tissue mask: in_tissue, refinement from the H&E image, and their agreement."""

from __future__ import annotations

import numpy as np
import pytest

from undiffuse.errors import InputError
from undiffuse.io import read_sample
from undiffuse.io.canonical import build_canonical
from undiffuse.tissue import tissue_mask

PITCH_PX = 100.0
SCALE = 0.2  # image pixels per full-resolution pixel


def synthetic_sample(*, with_image: bool = True, blank: bool = False, flipped: int = 0):
    """A hexagonal slide whose tissue is a pink disk on white glass, with grey fiducial dots round it.

    ``flipped`` spots on the disk's edge get the wrong ``in_tissue``.
    """
    rows, cols = np.meshgrid(np.arange(30), np.arange(30), indexing="ij")
    x = (cols + 0.5 * (rows % 2) + 2) * PITCH_PX
    y = (rows * np.sqrt(3) / 2 + 2) * PITCH_PX
    coords = np.column_stack([x.ravel(), y.ravel()])
    centre, radius = coords.mean(axis=0), 9 * PITCH_PX
    inside = np.linalg.norm(coords - centre, axis=1) < radius
    in_tissue = inside.copy()
    edge = np.flatnonzero(inside & (np.linalg.norm(coords - centre, axis=1) > radius - PITCH_PX))
    in_tissue[edge[:flipped]] = False
    size = int(34 * PITCH_PX * SCALE)
    image = np.full((size, size, 3), 0.93, dtype=np.float32)
    if not blank:
        yy, xx = np.mgrid[0:size, 0:size] / SCALE
        disk = np.hypot(xx - centre[0], yy - centre[1]) < radius
        image[disk] = (0.85, 0.45, 0.7)
        for fx in np.arange(0.5, 34, 1.0) * PITCH_PX:  # a frame of dark, unsaturated fiducials
            for fy in (0.5 * PITCH_PX, 33.5 * PITCH_PX):
                image[np.hypot(xx - fx, yy - fy) < 0.4 * PITCH_PX] = 0.3
    n = coords.shape[0]
    adata = build_canonical(
        counts=np.ones((n, 2)),
        barcodes=np.array([f"spot{i}" for i in range(n)]),
        gene_ids=np.array(["g0", "g1"]),
        gene_names=np.array(["A", "B"]),
        feature_types=np.array(["Gene Expression"] * 2),
        in_tissue=in_tissue,
        array_row=np.repeat(np.arange(30), 30),
        array_col=(2 * np.tile(np.arange(30), 30) + np.repeat(np.arange(30), 30) % 2),
        coords_xy=coords,
        images={"hires": image} if with_image else {},
        scalefactors={
            "spot_diameter_fullres": 0.55 * PITCH_PX,
            "tissue_hires_scalef": SCALE,
            "tissue_lowres_scalef": SCALE / 4,
        },
        metadata={},
        sample_id="synthetic",
        platform="visium",
        source="synthetic",
    )
    return adata, inside, edge[:flipped]


def test_image_mask_finds_the_disk():
    adata, inside, _ = synthetic_sample()
    mask = tissue_mask(adata, refine=True)
    assert mask.source == "image"
    # Spots whose centre lies within a quarter pitch of the drawn edge may go either way.
    centre = adata.obsm["spatial"].mean(axis=0)
    ambiguous = (
        np.abs(np.linalg.norm(adata.obsm["spatial"] - centre, axis=1) - 9 * PITCH_PX) < 0.25 * PITCH_PX
    )
    np.testing.assert_array_equal(mask.tissue[~ambiguous], inside[~ambiguous])
    assert mask.agreement()["mask_jaccard"] > 0.97


def test_agreement_counts_disagreeing_spots():
    adata, inside, flipped = synthetic_sample(flipped=6)
    mask = tissue_mask(adata)
    assert mask.source == "in_tissue"
    np.testing.assert_array_equal(mask.tissue, adata.obs["in_tissue"].to_numpy())
    agreement = mask.agreement()
    differing = mask.image_spots != mask.in_tissue
    assert agreement["mask_spots_differing"] == int(differing.sum())
    assert set(flipped) <= set(np.flatnonzero(differing))
    assert agreement["mask_image_only_spots"] >= len(flipped)
    union = (mask.image_spots | mask.in_tissue).sum()
    assert agreement["mask_jaccard"] == pytest.approx((mask.image_spots & mask.in_tissue).sum() / union)
    assert agreement["mask_share_differing"] == pytest.approx(differing.mean())


def test_blank_image_keeps_in_tissue():
    adata, _, _ = synthetic_sample(blank=True)
    with pytest.warns(UserWarning, match="keeping Space Ranger's in_tissue"):
        mask = tissue_mask(adata, refine=True)
    assert mask.source == "in_tissue"
    np.testing.assert_array_equal(mask.tissue, adata.obs["in_tissue"].to_numpy())


def test_no_image():
    adata, _, _ = synthetic_sample(with_image=False)
    mask = tissue_mask(adata)
    assert mask.image_spots is None and mask.agreement() == {}
    with pytest.raises(InputError, match="needs an H&E image"):
        tissue_mask(adata, refine=True)


def test_simulated_image_agrees_with_truth(tiny_sample):
    adata = read_sample(tiny_sample)
    agreement = tissue_mask(adata, refine=True).agreement()
    assert agreement["mask_jaccard"] > 0.9


@pytest.mark.realdata
def test_mouse_brain_image_agrees_with_spaceranger(shared_data):
    adata = read_sample(shared_data / "visium_mouse_brain_raw_top100")
    mask = tissue_mask(adata, refine=True)
    assert mask.image_key == "lowres"
    assert mask.agreement()["mask_jaccard"] > 0.95
    assert mask.agreement()["mask_share_differing"] < 0.03


def test_square_footprint_samples_bins_by_their_area():
    """Visium HD bins: tissue when at least half of the bin's square is on the mask."""
    from undiffuse.tissue import sample_mask_at_spots

    mask = np.zeros((20, 20), dtype=bool)
    mask[:, :10] = True
    centres = np.array([[8.0, 10.0], [9.0, 10.0], [10.0, 10.0], [11.0, 10.0], [-3.0, 10.0]])
    # A 3-pixel square centred on column 10 covers columns 9-11: one third on the mask.
    covered = sample_mask_at_spots(mask, centres, spot_radius_px=1.5, square=True)
    assert covered.tolist() == [True, True, False, False, False]
    # A 1-pixel bin is the mask at its centre.
    assert sample_mask_at_spots(mask, centres, spot_radius_px=0.5, square=True).tolist() == [
        True,
        True,
        False,
        False,
        False,
    ]
