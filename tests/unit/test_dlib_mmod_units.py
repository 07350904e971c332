"""The pure parts of the ONNX MMOD detector (pipelines/core/models/dlib_mmod.py): dlib's resize,
pyramid sizes and tiling, the mapping of scores to boxes, and dlib's non-maximum suppression.
The expected values are worked out by hand from dlib's source (image_pyramid.h, loss.h)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.core.models.dlib_mmod import (
    MmodSpec,
    Rect,
    _lround,
    level_sizes,
    output_size,
    output_to_input,
    overlaps,
    rect_down,
    resize_float,
    resize_rgb,
    suppress,
    tile_layout,
    upsampled_size,
    window_box,
)

dlib = pytest.importorskip("dlib")

# dlib's face detector: 80x80 window, NMS at 0.338, convolutions (kernel, stride, padding)
SPEC = MmodSpec(
    means=(122.782, 117.001, 104.298),
    padding=10,
    outer_padding=11,
    window=(80, 80),
    iou_thresh=0.3382761351109955,
    covered_thresh=1.0,
    convs=((5, 2, 0), (5, 2, 0), (5, 2, 0), (5, 1, 2), (5, 1, 2), (5, 1, 2), (9, 1, 4)),
)


def _sizes():
    """Shrinking by 5/6 (the pyramid), growing (pyramid_up), odd and 1-pixel sizes."""
    rng = np.random.default_rng(7)
    cases = [(12, 30, 10, 25), (7, 1, 5, 1), (1, 9, 1, 7), (5, 5, 11, 12), (33, 50, 27, 41)]
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        cases.append((h, w, int(rng.integers(1, 90)), int(rng.integers(1, 90))))
    return cases


def test_resize_float_is_dlibs_bit_for_bit():
    rng = np.random.default_rng(0)
    for h, w, out_h, out_w in _sizes():
        plane = rng.standard_normal((h, w)).astype(np.float32)
        expected = dlib.resize_image(plane, out_h, out_w)
        assert np.array_equal(resize_float(plane, out_h, out_w), expected), (h, w, out_h, out_w)
        stacked = resize_float(np.stack([plane, -plane]), out_h, out_w)  # planes resize alike
        assert np.array_equal(stacked[1], dlib.resize_image(-plane, out_h, out_w))


def test_resize_rgb_is_dlibs_bit_for_bit():
    rng = np.random.default_rng(1)
    for h, w, out_h, out_w in _sizes():
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = dlib.resize_image(image, out_h, out_w)
        assert np.array_equal(resize_rgb(image, out_h, out_w), expected), (h, w, out_h, out_w)


def test_pyramid_levels_shrink_by_five_sixths_until_under_five_rows():
    assert level_sizes(12, 30) == [(12, 30), (10, 25), (8, 20), (6, 16), (5, 13)]
    assert level_sizes(40, 60) == [
        (40, 60), (33, 50), (27, 41), (22, 34), (18, 28), (15, 23),
        (12, 19), (10, 15), (8, 12), (6, 10), (5, 8),
    ]  # fmt: skip
    assert level_sizes(4, 100) == [(4, 100)]  # the image itself is always a level
    assert level_sizes(0, 100) == []


def test_tiles_go_down_one_column_then_up_a_second():
    rects, rows, cols = tile_layout(40, 60)
    assert (rows, cols) == (205 + 22, 60 + 22)  # the first column's height, and an 11 px border
    assert rects == [
        Rect(11, 11, 70, 50),  # the image, 11 px in
        Rect(11, 61, 60, 93),  # 10 px below
        Rect(11, 104, 51, 130),
        Rect(11, 141, 44, 162),
        Rect(11, 173, 38, 190),
        Rect(11, 201, 33, 215),  # the first column ends: the rest fit beside the last ones
        Rect(52, 204, 70, 215),  # the second column, from the bottom right upwards
        Rect(56, 184, 70, 193),
        Rect(59, 166, 70, 173),
        Rect(61, 150, 70, 155),
        Rect(63, 135, 70, 139),
    ]
    assert tile_layout(0, 5) == ([], 0, 0)


def test_upsampling_sizes_and_boxes_back_down():
    assert upsampled_size(100, 200) == (201, 402)  # pyramid_down<2>::rect_up of the image, rounded
    assert upsampled_size(0, 7) == (0, 0)
    # the image's own rectangle goes up and comes back to itself
    assert rect_down(Rect(3, 2, 401, 200), 1) == Rect(0, 0, 199, 99)
    # per level p / 2 - (1.25, 0.75): left 10 -> 3.75 -> 0.625, bottom 89 -> 43.75 -> 21.125
    assert rect_down(Rect(10, 10, 89, 89), 2) == Rect(1, 1, 20, 21)


def test_lround_takes_halves_away_from_zero():
    assert [_lround(v) for v in (2.5, -2.5, 0.5, 1.4999, -0.4)] == [3, -3, 1, 1, 0]


def test_output_positions_map_to_window_centres():
    # (x, y) = (8c + 14, 8r + 14)
    assert [output_to_input(r, c, SPEC) for r, c in ((0, 0), (2, 5))] == [(14.0, 14.0), (54.0, 30.0)]
    # three 5x5 stride-2 convolutions without padding, then same-size ones
    assert output_size(227, 82, SPEC) == (25, 7)
    assert output_size(20, 20, SPEC) == (0, 0)


def test_windows_become_boxes_in_the_level_they_fall_in():
    rects, _, _ = tile_layout(40, 60)
    # level 0: the 80x80 window about (x, y) minus the tile's corner, corners +-39.5, rounded
    assert window_box(11 + 100, 11 + 50, rects, SPEC) == Rect(61, 11, 140, 90)
    # level 1: local (20, 10), each corner scaled up once by p * 6/5 + 0.3
    assert window_box(11 + 20, 61 + 10, rects, SPEC) == Rect(-23, -35, 72, 60)
    # between tiles: the nearest one, level 1 (3 px away; level 0 is 8 px): local (20, -3)
    assert window_box(11 + 20, 58, rects, SPEC) == Rect(-23, -51, 72, 44)


def test_overlap_is_intersection_over_the_bounding_box_of_both():
    a = Rect(0, 0, 79, 79)
    assert overlaps(a, Rect(30, 0, 109, 79), SPEC.iou_thresh, 1.0)  # 4000 / 8800 = 0.45
    assert not overlaps(a, Rect(50, 0, 129, 79), SPEC.iou_thresh, 1.0)  # 2400 / 10400
    # IoU 3364 / 9436 = 0.357 would suppress; dlib's 3364 / (102 * 102) = 0.323 does not
    assert not overlaps(a, Rect(22, 22, 101, 101), SPEC.iou_thresh, 1.0)
    assert overlaps(a, Rect(20, 20, 99, 99), SPEC.iou_thresh, 1.0)  # 3600 / 10000
    assert not overlaps(a, Rect(80, 0, 159, 79), 0.0, 0.0)  # touching is not overlapping
    big, inside = Rect(0, 0, 199, 199), Rect(50, 50, 69, 69)
    assert not overlaps(big, inside, SPEC.iou_thresh, 1.0)  # fully covered, but 1.0 is not exceeded
    assert overlaps(big, inside, SPEC.iou_thresh, 0.9)  # dlib's "covered" rule


def test_suppression_keeps_the_best_of_each_overlapping_group():
    a, b, c = Rect(0, 0, 79, 79), Rect(10, 5, 89, 84), Rect(200, 0, 279, 79)
    kept = suppress([(a, 0.5), (b, 0.9), (c, 0.7), (a, 0.2)], SPEC.iou_thresh, SPEC.covered_thresh)
    assert kept == [(b, 0.9), (c, 0.7)]
    assert suppress([], SPEC.iou_thresh, SPEC.covered_thresh) == []
