"""Grad-CAM helpers: the layer choice for any CNN, box mapping, and the pointing game's arithmetic."""

import numpy as np
import pytest
import torch

from fedxr.explain import _box_in_pixels, cam_layer, pointing_game
from fedxr.models.registry import build_model


@pytest.mark.parametrize("name", ["tiny_cnn", "mobilenetv3_small_100", "resnet18"])
def test_cam_layer_is_the_last_spatial_map(name):
    model = build_model(name).eval()
    layer = cam_layer(model, 64)
    shapes = []
    hook = layer.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    with torch.no_grad():
        model(torch.zeros(1, 1, 64, 64))
    hook.remove()
    assert len(shapes[-1]) == 4
    assert shapes[-1][-1] > 1  # not the pooled 1×1 head (MobileNetV3's conv_head)


@pytest.mark.parametrize("size,cells", [(224, 7), (96, 6), (128, 8)])
def test_cam_layer_is_fine_enough_to_point(size, cells):
    # ResNet-18's last stage is 7 x 7 at 224 px, but only 3 x 3 at 96 px and 4 x 4 at 128 px: there the
    # map of the stage before (6 x 6, 8 x 8) is used.
    model = build_model("resnet18").eval()
    shapes = []
    hook = cam_layer(model, size).register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    with torch.no_grad():
        model(torch.zeros(1, 1, size, size))
    hook.remove()
    assert shapes[-1][-2:] == (cells, cells)


def test_boxes_map_from_the_1024_frame_and_clip():
    assert _box_in_pixels(("Mass", 512, 256, 128, 64), 128) == (64, 32, 80, 40)
    assert _box_in_pixels(("Mass", 1000, 1000, 100, 100), 64) == (62, 62, 64, 64)


def test_pointing_game_scores_hits_misses_and_random_baseline():
    hit = np.zeros((32, 32)); hit[10, 12] = 1.0           # peak at x=12, y=10
    miss = np.zeros((32, 32)); miss[30, 30] = 1.0
    flat = np.zeros((32, 32))                              # no evidence at all: a miss, not a peak at (0, 0)
    box = (8, 8, 16, 16)                                   # x0, y0, x1, y1
    items = [{"label": "Mass", "box_px": box}, {"label": "Mass", "box_px": box},
             {"label": "Nodule", "box_px": (0, 0, 4, 4)}]
    result = pointing_game(items, [hit, miss, flat])
    assert result["per_class"]["Mass"]["score"] == 0.5
    assert result["per_class"]["Nodule"]["score"] == 0.0
    assert result["per_class"]["Mass"]["random"] == pytest.approx(64 / 1024)
    assert result["boxes"] == 3
    assert result["overall"] == pytest.approx(1 / 3)


def test_ceiling_margin_and_energy_scores():
    """At 4 x 4 CAM cells on a 32-px input the cell centres are 4, 12, 20, 28: a 3-px box between them cannot be
    hit by any heatmap (ceiling 0); a peak one cell outside the box counts within the margin; energy is the map's
    share inside the box."""
    small = (5, 5, 8, 8)                                    # holds no cell centre
    big = (8, 8, 16, 16)                                    # holds (12, 12)
    near = np.zeros((32, 32)); near[20, 12] = 1.0          # peak 5 px below the big box: inside one 8-px cell
    half = np.zeros((32, 32)); half[8:16, 8:16] = 1.0; half[0:8, 0:8] = 0.999
    items = [{"label": "Nodule", "box_px": small}, {"label": "Mass", "box_px": big}, {"label": "Mass", "box_px": big}]
    result = pointing_game(items, [near, near, half], cells=4)
    assert result["cam_cells"] == 4
    assert result["per_class"]["Nodule"]["ceiling"] == 0.0 and result["per_class"]["Mass"]["ceiling"] == 1.0
    assert result["per_class"]["Mass"]["score"] == pytest.approx(0.5)          # `half` peaks inside, `near` does not
    assert result["per_class"]["Mass"]["margin_score"] == 1.0
    assert result["per_class"]["Mass"]["energy"] == pytest.approx((0.0 + 0.5) / 2, abs=1e-3)
    assert result["per_class"]["Mass"]["margin_random"] == pytest.approx(24 * 24 / 1024)
    assert pointing_game(items, [near, near, half])["per_class"]["Mass"]["ceiling"] is None  # resolution unknown
