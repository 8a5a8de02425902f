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


def _boxed_items(n: int, size: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    labels = ["Mass", "Nodule", "Effusion", "Cardiomegaly"]
    items = []
    for i in range(n):
        x0, y0 = (int(v) for v in rng.integers(0, size - 16, 2))
        items.append({"label": labels[i % 4], "gray": rng.integers(0, 256, (size, size), dtype=np.uint8),
                      "box_px": (x0, y0, x0 + 16, y0 + 16)})
    return items


def test_batched_heatmaps_equal_one_image_at_a_time():
    from fedxr.explain import CAM_BATCH, heatmaps
    from fedxr.preprocessing import Preprocessing

    torch.manual_seed(0)
    model, ckpt = build_model("resnet18").eval(), {"preprocessing": Preprocessing(64)}
    items = _boxed_items(CAM_BATCH + 3, 64)  # two batches, the second partial; labels differ within a batch
    together = heatmaps(model, ckpt, items)
    alone = [heatmaps(model, ckpt, [item])[0] for item in items[:4] + items[-2:]]
    assert np.allclose(np.stack(together[:4] + together[-2:]), np.stack(alone), atol=1e-4)


def test_cam_layer_chosen_on_validation_boxes():
    from fedxr.explain import MIN_VAL_BOXES, cam_candidates, choose_cam_layer
    from fedxr.preprocessing import Preprocessing

    torch.manual_seed(0)
    model, ckpt = build_model("resnet18").eval(), {"preprocessing": Preprocessing(96)}
    candidates = cam_candidates(model, 96)
    assert [c for _n, _m, c in candidates] == [3, 6, 12, 24]  # the stem's 48-cell maps are not offered
    few = _boxed_items(MIN_VAL_BOXES - 1, 96)
    layer, record = choose_cam_layer(model, ckpt, few)
    assert layer is cam_layer(model, 96) and record["chosen_on"].startswith("resolution rule") and not record["candidates"]
    layer, record = choose_cam_layer(model, ckpt, _boxed_items(MIN_VAL_BOXES, 96))
    scored = record["candidates"]
    assert [c["cells"] for c in scored] == [3, 6, 12, 24]
    best = max(scored, key=lambda c: (c["score"], c["energy"]))
    assert (record["layer"], record["cells"]) == (best["layer"], best["cells"])
    assert layer is dict(model.named_modules())[best["layer"]]
    assert record["chosen_on"] == f"validation boxes ({MIN_VAL_BOXES})"


def test_chosen_layer_is_saved_beside_the_checkpoint(tmp_path):
    """The console's heatmaps use the layer `fedxr explain` chose, unless the checkpoint changed since."""
    import json
    import os

    from fedxr.explain import cam_layer_file, saved_cam_layer

    model = build_model("resnet18").eval()
    ckpt = tmp_path / "global_best.ckpt"
    ckpt.write_bytes(b"weights")
    assert saved_cam_layer(model, ckpt) is None                       # nothing chosen yet
    cam_layer_file(ckpt).write_text(json.dumps({"layer": "layer2.1.act2", "cells": 12}))
    assert saved_cam_layer(model, ckpt) is dict(model.named_modules())["layer2.1.act2"]
    cam_layer_file(ckpt).write_text(json.dumps({"layer": "no.such.layer"}))
    assert saved_cam_layer(model, ckpt) is None
    cam_layer_file(ckpt).write_text(json.dumps({"layer": "layer2.1.act2"}))
    later = cam_layer_file(ckpt).stat().st_mtime + 10
    os.utime(ckpt, (later, later))                                    # retrained after the choice
    assert saved_cam_layer(model, ckpt) is None
