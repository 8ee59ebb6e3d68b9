"""Invariants of w(x) over seeded random label images."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from unet_core.weights import blockwise as WD
from unet_core.weights import maps as W
from unet_core.weights.recipe import WeightParams

SEEDS = [pytest.param(s, id=f"seed{s}") for s in range(6)]


def random_labels(seed: int, shape=(96, 80)) -> np.ndarray:
    """Random blobs: coarse random instance grid, upsampled, with random background holes."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 12, size=(shape[0] // 8 + 1, shape[1] // 8 + 1))
    coarse[rng.random(coarse.shape) < 0.3] = 0
    labels = np.kron(coarse, np.ones((8, 8), int))[: shape[0], : shape[1]]
    if seed % 2:  # wider, ragged background between some cells
        labels = np.where(np.roll(labels, 1, axis=1) == 0, 0, labels)
    return labels


def weights_of(labels: np.ndarray) -> np.ndarray:
    classes = W.class_map(labels, separate_touching=True)
    return W.weight_map(labels, classes, class_weights=(0.5, 1.5), params=W.WeightParams(w0=10, sigma_px=5))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("flip", [pytest.param(lambda a: a[::-1], id="flip-y"),
                                  pytest.param(lambda a: a[:, ::-1], id="flip-x"),
                                  pytest.param(lambda a: a.T, id="transpose")])
def test_symmetric_under_flips(seed, flip):
    labels = random_labels(seed)
    np.testing.assert_array_equal(weights_of(flip(labels)), flip(weights_of(labels)))


@pytest.mark.parametrize("seed", SEEDS)
def test_translation_of_labels_translates_w(seed):
    labels = random_labels(seed)
    pad = 40  # more than the cutoff: the frame sees no edge effects
    big = np.pad(labels, pad)
    shifted = np.roll(big, (7, -5), axis=(0, 1))
    np.testing.assert_array_equal(np.roll(weights_of(big), (7, -5), axis=(0, 1)), weights_of(shifted))


@pytest.mark.parametrize("seed", SEEDS)
def test_d1_le_d2_and_term_bounds(seed):
    cells = W.cells_from(random_labels(seed), W.class_map(random_labels(seed), separate_touching=True))
    _, d1, d2 = W.two_nearest_distances(cells, cutoff=W.cutoff_px(w0=10, sigma_px=5, tolerance=1e-3))
    assert np.all(d1[np.isfinite(d2)] <= d2[np.isfinite(d2)])
    term = W.border_weight(cells)
    assert term.min() >= 0 and term.max() <= 10


@pytest.mark.parametrize("seed", SEEDS)
def test_chunked_equals_whole(seed):
    labels = np.stack([random_labels(seed), random_labels(seed + 100)])
    params = WeightParams()
    inst, _ = WD.label_arrays(da.from_array(labels, chunks=(1, 32, 24)), kind="instance")
    chunked = WD.weight_array(inst, kind="instance", class_weights=(0.5, 1.5), params=params).compute(
        scheduler="synchronous")
    for z in range(2):
        np.testing.assert_array_equal(chunked[z], weights_of(labels[z]))
