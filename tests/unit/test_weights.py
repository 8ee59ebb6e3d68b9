"""Tests of the pure w(x) kernels in unet_core.weights.maps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unet_core.common.errors import UserInputError
from unet_core.synth.scene import voronoi_cells as voronoi
from unet_core.weights import maps as W


def test_cutoff_matches_paper_numbers():
    # sigma * sqrt(2 ln(w0 / eps)) = 5 * sqrt(2 ln 1e4) = 21.46 px (FACTS.md)
    assert W.cutoff_px(w0=10, sigma_px=5, tolerance=1e-3) == pytest.approx(21.46, abs=0.01)
    assert W.cutoff_px(w0=1e-4, sigma_px=5, tolerance=1e-3) == 0.0


def test_two_cells_one_pixel_apart():
    # cells at x = 0..2 and x = 4..6 with a 1-px gap at x = 3: d1 = d2 = 1 there.
    labels = np.zeros((5, 7), np.int32)
    labels[:, :3] = 1
    labels[:, 4:] = 2
    term = W.border_weight(labels, W.WeightParams(w0=10, sigma_px=5))
    expected = 10 * math.exp(-4 / 50)
    np.testing.assert_allclose(term[:, 3], expected, rtol=1e-6)
    assert np.all(term[:, :3] == 0) and np.all(term[:, 4:] == 0)


@pytest.mark.parametrize("method", [pytest.param("kdtree", id="kdtree"), pytest.param("bbox", id="bbox")])
@pytest.mark.parametrize("pixels", [pytest.param("background", id="bg"), pytest.param("all", id="all")])
@pytest.mark.parametrize(
    "n,gap", [pytest.param(25, 0.0, id="touching"), pytest.param(25, 1.1, id="gaps"), pytest.param(6, 1.4, id="sparse")]
)
def test_matches_exact_reference_within_tolerance(method, pixels, n, gap):
    labels = voronoi((160, 140), n, seed=n + int(gap * 10), gap=gap)
    cells = W.cells_from(labels, W.class_map(labels, separate_touching=True))
    ref = W.border_weight_reference(cells, W.WeightParams(w0=10, sigma_px=5, border_pixels=pixels))
    got = W.border_weight(cells, W.WeightParams(w0=10, sigma_px=5, tolerance=1e-3, border_pixels=pixels, method=method))
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() <= 1e-3
    assert np.abs(got - ref).max() > 0 or gap == 0  # the truncation is real when gaps exist


def test_methods_identical():
    labels = voronoi((200, 200), 40, seed=3, gap=1.15)
    cells = W.cells_from(labels, W.class_map(labels, separate_touching=True))
    a = W.border_weight(cells, W.WeightParams(method="kdtree", w0=50, sigma_px=6))
    b = W.border_weight(cells, W.WeightParams(method="bbox", w0=50, sigma_px=6))
    np.testing.assert_array_equal(a, b)


def test_class_map_separates_touching_cells_by_one_pixel():
    labels = np.zeros((4, 6), np.int32)
    labels[:, :3] = 1
    labels[:, 3:] = 2
    classes = W.class_map(labels, separate_touching=True)
    # the smaller label gives way: column 2 (label 1, touching label 2) becomes background
    np.testing.assert_array_equal(classes[0], [1, 1, 0, 1, 1, 1])
    np.testing.assert_array_equal(W.class_map(labels, separate_touching=False), np.ones((4, 6)))


def test_binary_labels_become_components():
    mask = np.array([[255, 255, 0, 255], [0, 0, 0, 255], [255, 0, 255, 0]], np.uint8)
    four = W.instances_from_labels(mask, kind="binary", connectivity=4)
    eight = W.instances_from_labels(mask, kind="binary", connectivity=8)
    assert four.dtype == np.int32 and four.max() == 4  # diagonal (1,3)-(2,2) not joined
    assert eight.max() == 3


def test_binary_all_background_slice_uses_stack_foreground():
    mask = np.full((4, 4), 255, np.uint8)
    assert W.instances_from_labels(mask, kind="binary", foreground=255).max() == 1
    assert W.instances_from_labels(np.zeros((4, 4), np.uint8), kind="binary", foreground=255).max() == 0


@pytest.mark.parametrize(
    "labels,kind,msg",
    [
        pytest.param(np.zeros((3, 3), np.float32), "instance", "integers", id="float"),
        pytest.param(-np.ones((3, 3), np.int16), "instance", "negative", id="negative"),
        pytest.param(np.arange(9, dtype=np.uint8).reshape(3, 3), "binary", "more than two", id="binary-3-values"),
        pytest.param(np.zeros((3, 3, 3), np.int32), "instance", "2-D", id="3d"),
        pytest.param(np.zeros((3, 3), np.int32), "semantic", "kind", id="bad-kind"),
    ],
)
def test_bad_labels_raise_user_errors(labels, kind, msg):
    with pytest.raises(UserInputError, match=msg):
        W.instances_from_labels(labels, kind=kind)


@pytest.mark.parametrize(
    "labels,expected_class",
    [
        pytest.param(np.zeros((30, 30), np.int32), 0, id="no-cells"),
        pytest.param(np.ones((30, 30), np.int32), 1, id="all-one-cell"),
    ],
)
def test_degenerate_slices_get_class_weight_only(labels, expected_class):
    classes = W.class_map(labels, separate_touching=True)
    w = W.weight_map(labels, classes, class_weights=(0.7, 1.8), params=W.WeightParams(w0=10, sigma_px=5))
    assert np.all(np.isfinite(w))
    np.testing.assert_array_equal(w, np.float32((0.7, 1.8)[expected_class]))


def test_single_cell_has_no_border_term():
    labels = np.zeros((40, 40), np.int32)
    labels[10:20, 10:20] = 1
    classes = W.class_map(labels, separate_touching=True)
    w = W.weight_map(labels, classes, class_weights=(0.5, 2.0))
    np.testing.assert_array_equal(w, np.where(classes == 1, 2.0, 0.5).astype(np.float32))


def test_class_weights_mean_one():
    counts = np.array([300, 100])
    wc = W.class_weights_from_counts(counts)
    np.testing.assert_allclose((counts / counts.sum() * wc).sum(), 1.0)
    np.testing.assert_allclose(wc, [2 / 3, 2.0])
    with pytest.raises(UserInputError, match="never occur"):
        W.class_weights_from_counts(np.array([10, 0]))


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"w0": -1.0}, id="neg-w0"),
        pytest.param({"sigma_px": 0.0}, id="zero-sigma"),
        pytest.param({"tolerance": 0.0}, id="zero-tol"),
        pytest.param({"border_pixels": "cells"}, id="bad-pixels"),
        pytest.param({"method": "fast"}, id="bad-method"),
    ],
)
def test_bad_parameters(kwargs):
    with pytest.raises(UserInputError):
        W.border_weight(np.zeros((5, 5), np.int32), W.WeightParams(**kwargs))
