"""`fedxr explain`: where did the model look? Grad-CAM heatmaps and the pointing game.

For test images that carry ground-truth boxes (``BBox_List_2017.csv``: the phantom writes one, NIH ships
one for 880 images), each model's Grad-CAM map (pytorch-grad-cam) for the boxed finding is overlaid on
the image with the box drawn, teacher and students side by side (``gradcam_grid.png``). The pointing
game scores, per class, how often the heatmap's peak falls inside a true box; a random heatmap's peak
is a uniformly random pixel, so its expected score is the box's share of the image, reported beside it.

Which layer's map is drawn is chosen per model on the *validation* split's boxes (:func:`choose_cam_layer`):
every stage's last map from 1/4 input resolution down is a candidate and the one with the best pointing game
there is used on test. Too few validation boxes fall back to the resolution rule of :func:`cam_choice`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from fedxr.errors import FedxrError
from fedxr.labels import LABELS
from fedxr.models.checkpoint import model_from_checkpoint
from fedxr.plots import saved_figure
from fedxr.data.atomic import write_json_atomic

#: NIH box coordinates are pixels of the released 1024 × 1024 PNGs (the phantom writes the same frame).
NIH_BOX_SPACE = 1024


#: A Grad-CAM map coarser than this many cells a side cannot point at a finding: at 96 px a ResNet's last
#: stage is 3 x 3, so the heatmap's peak can only be one of nine places.
MIN_CAM_CELLS = 6


#: Fewer validation boxes than this cannot choose a layer (one hit would swing the score by > 5 %).
MIN_VAL_BOXES = 20

#: Grad-CAM runs this many images per forward/backward pass (each image's map is independent in eval mode).
CAM_BATCH = 32


def _spatial_outputs(model: nn.Module, size: int) -> list[tuple[str, nn.Module, tuple]]:
    """(name, leaf module, output shape) in execution order, for one dummy size × size image."""
    order: list[tuple[str, nn.Module, tuple]] = []
    hooks = [m.register_forward_hook(lambda mod, _i, out, name=name: order.append((name, mod, tuple(out.shape)))
                                     if isinstance(out, torch.Tensor) else None)
             for name, m in model.named_modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, size, size))
    finally:
        for h in hooks:
            h.remove()
    return [(n, m, shape) for n, m, shape in order if len(shape) == 4 and shape[-1] > 1 and shape[-2] > 1]


def cam_candidates(model: nn.Module, size: int) -> list[tuple[str, nn.Module, int]]:
    """(name, module, cells a side) of each resolution's last map, from 1/4 of the input side down (the stem's
    finer maps see edges, not findings): a ResNet-18 at 96 px offers 24, 12, 6 and 3 cells."""
    last: dict[int, tuple[str, nn.Module]] = {}
    for name, module, shape in _spatial_outputs(model, size):
        last[int(min(shape[-2:]))] = (name, module)
    return [(name, module, cells) for cells, (name, module) in sorted(last.items()) if cells <= size // 4]


def cam_layer(model: nn.Module, size: int) -> nn.Module:
    """The Grad-CAM layer for any CNN (:func:`cam_choice`)."""
    return cam_choice(model, size)[0]


def cam_choice(model: nn.Module, size: int) -> tuple[nn.Module, int]:
    """(the Grad-CAM layer, its map's cells a side), found by running one dummy image: the last module (in
    execution order) whose output is a spatial map of at least MIN_CAM_CELLS cells a side — the final conv
    before global pooling at the usual input sizes (7 x 7 for a ResNet at 224 px), an earlier stage for small
    inputs — or, if no map is that fine, the last spatial one."""
    spatial = [(m, shape) for _n, m, shape in _spatial_outputs(model, size)]
    if not spatial:
        raise FedxrError("the model has no spatial feature map for Grad-CAM")
    fine = [(m, shape) for m, shape in spatial if min(shape[-2:]) >= MIN_CAM_CELLS]
    module, shape = fine[-1] if fine else spatial[-1]
    return module, int(min(shape[-2:]))


def boxed_test_images(data: Path, boxes_csv: Path | None = None, split: str = "test") -> list[dict]:
    """Rows of the split's images that have at least one box: {image, path, boxes: [(label, x, y, w, h)]}."""
    import pandas as pd

    from fedxr.data.manifest import SUMMARY_FILE, read_manifest
    from fedxr.layout import read_sites_summary
    from fedxr.data.nih import BBOX_FILES, read_bbox_list
    from fedxr.evaluation import manifests_of

    rows = pd.concat([read_manifest(m) for m in manifests_of(data)], ignore_index=True)
    rows = rows[rows["split"] == split]
    if boxes_csv is None:
        folder = Path(data) if Path(data).is_dir() else Path(data).parent
        settings = read_sites_summary(folder)["settings"] if (folder / SUMMARY_FILE).is_file() else {}
        root = Path(settings["root"]) if settings.get("root") else None
        # The recipe's data.boxes_file (a labels-CSV data set), else NIH's file name in the data root.
        names = ([settings["boxes_file"]] if settings.get("boxes_file") else []) + list(BBOX_FILES)
        boxes_csv = next((root / n for n in names if root and (root / n).is_file()), None)
    if boxes_csv is None or not Path(boxes_csv).is_file():
        raise FedxrError(f"no ground-truth boxes for {data}: pass --boxes BBox_List_2017.csv (NIH ships one; "
                         "phantom data sets have one in their root)")
    boxes = read_bbox_list(boxes_csv)
    by_image = defaultdict(list)
    for b in boxes.itertuples(index=False):
        by_image[b.image].append((b.label, float(b.x), float(b.y), float(b.w), float(b.h)))
    found = [{"image": r.image, "path": r.path, "boxes": by_image[r.image]} for r in rows.itertuples() if r.image in by_image]
    if not found:
        raise FedxrError(f"none of the {split} images of {data} has a box in {boxes_csv}")
    return found


def _box_in_pixels(box: tuple, size: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in the model's size × size input. NIH boxes are given in the 1024 × 1024 frame
    of the released PNGs (the phantom follows that), and resize_square maps that frame onto the input."""
    _, x, y, w, h = box
    s = size / NIH_BOX_SPACE
    return (max(0, int(x * s)), max(0, int(y * s)), min(size, int(np.ceil((x + w) * s))),
            min(size, int(np.ceil((y + h) * s))))


def heatmaps(model: nn.Module, ckpt: dict, items: list[dict], layer: nn.Module | None = None) -> list[np.ndarray]:
    """Grad-CAM map (size × size, 0..1) of every (image, boxed label) pair at ``layer`` (default
    :func:`cam_layer`); each item's ``gray`` is the image already decoded at the model's input size."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    prep = ckpt["preprocessing"]
    layer = layer if layer is not None else cam_layer(model, prep.size)
    maps: list[np.ndarray] = []
    with GradCAM(model=model, target_layers=[layer]) as cam:
        for i in range(0, len(items), CAM_BATCH):
            chunk = items[i:i + CAM_BATCH]
            x = torch.from_numpy(prep.batch([item["gray"] for item in chunk]))
            maps.extend(cam(input_tensor=x, targets=[ClassifierOutputTarget(LABELS.index(item["label"]))
                                                     for item in chunk]))
    return maps


def choose_cam_layer(model: nn.Module, ckpt: dict, val_items: list[dict]) -> tuple[nn.Module, dict]:
    """The candidate layer (:func:`cam_candidates`) whose heatmaps point best at the validation boxes: the
    strict pointing game, ties broken by the energy inside the box. Returns (layer, a record of the choice
    with every candidate's validation scores). Fewer than MIN_VAL_BOXES boxes keep :func:`cam_choice`."""
    size = ckpt["preprocessing"].size
    default, default_cells = cam_choice(model, size)
    names = {m: n for n, m in model.named_modules()}
    record = {"layer": names.get(default, "?"), "cells": default_cells, "val_boxes": len(val_items),
              "chosen_on": "resolution rule", "candidates": []}
    if len(val_items) < MIN_VAL_BOXES:
        record["chosen_on"] += f" (only {len(val_items)} validation boxes, fewer than {MIN_VAL_BOXES})"
        return default, record
    best = None
    for name, module, cells in cam_candidates(model, size):
        r = pointing_game(val_items, heatmaps(model, ckpt, val_items, module), cells)
        record["candidates"].append({"layer": name, "cells": cells, "score": r["overall"], "energy": r["energy_overall"],
                                     "ceiling": r["ceiling_overall"]})
        if best is None or (r["overall"], r["energy_overall"]) > best[0]:
            best = ((r["overall"], r["energy_overall"]), module, name, cells)
    if best is None:
        return default, record
    record.update(layer=best[2], cells=best[3], chosen_on=f"validation boxes ({len(val_items)})")
    return best[1], record


def pointing_game(items: list[dict], maps: list[np.ndarray], cells: int | None = None) -> dict:
    """Per class and overall, each beside what a random heatmap gets:

    * ``score``: the heatmap's peak inside the box (strict pointing game); ``random``: the box's share of the image;
    * ``ceiling``: what a perfect heatmap could score at the CAM's resolution (``cells`` a side): its upsampled
      peak sits on a cell centre, so a box that holds no cell centre cannot be hit;
    * ``margin_score``: the peak within one CAM cell of the box (the tolerance its resolution asks for);
      ``margin_random``: the widened box's share;
    * ``energy``: the share of the heatmap's mass inside the box (energy-based pointing game, Wang et al.
      2020); a flat map puts the box's share there (``random``)."""
    keys = ("score", "random", "ceiling", "margin_score", "margin_random", "energy")
    sums: dict[str, defaultdict[str, float]] = {k: defaultdict(float) for k in keys}
    counts: defaultdict[str, int] = defaultdict(int)
    for item, cam in zip(items, maps):
        size = cam.shape[-1]
        x0, y0, x1, y1 = item["box_px"]
        peak_y, peak_x = np.unravel_index(int(np.argmax(cam)), cam.shape)
        label, evidence = item["label"], cam.max() > 0
        step = size / cells if cells else 0.0
        m = int(np.ceil(step))
        wx0, wy0, wx1, wy1 = max(0, x0 - m), max(0, y0 - m), min(size, x1 + m), min(size, y1 + m)
        centres = (np.arange(cells) + 0.5) * step if cells else np.zeros(0)
        row = {"score": float(evidence and x0 <= peak_x < x1 and y0 <= peak_y < y1),
               "random": min(1.0, max(0, x1 - x0) * max(0, y1 - y0) / size**2),
               "ceiling": float(((centres >= x0) & (centres < x1)).any() and ((centres >= y0) & (centres < y1)).any()),
               "margin_score": float(evidence and wx0 <= peak_x < wx1 and wy0 <= peak_y < wy1),
               "margin_random": (wx1 - wx0) * (wy1 - wy0) / size**2,
               "energy": float(cam[y0:y1, x0:x1].sum() / cam.sum()) if evidence else 0.0}
        counts[label] += 1
        for k in keys:
            sums[k][label] += row[k]
    # Values float, or None: the ceiling without a CAM resolution.
    per_class: dict[str, dict[str, float | None]] = {
        c: {"boxes": counts[c], **{k: sums[k][c] / counts[c] for k in keys}} for c in counts}
    total = sum(counts.values())
    overall: dict[str, float | None] = {k: sum(sums[k].values()) / total for k in keys}
    if not cells:
        for v in (*per_class.values(), overall):
            v["ceiling"] = None
    return {"per_class": per_class, "overall": overall["score"], "random_overall": overall["random"],
            **{f"{k}_overall": overall[k] for k in keys if k not in ("score", "random")}, "cam_cells": cells,
            "boxes": total}


def cam_layer_file(checkpoint: str | Path) -> Path:
    """Where `fedxr explain` records the CAM layer it chose for a checkpoint: beside it, ``NAME.cam.json``."""
    return Path(checkpoint).with_suffix(".cam.json")


def saved_cam_layer(model: nn.Module, checkpoint: str | Path) -> nn.Module | None:
    """The layer `fedxr explain` chose on validation boxes for this checkpoint, so that other heatmaps (the
    console's) use it too; None when none was chosen, the choice is older than the checkpoint, or the layer
    is not in the model."""
    path = cam_layer_file(checkpoint)
    try:
        if path.stat().st_mtime < Path(checkpoint).stat().st_mtime:
            return None
        name = json.loads(path.read_text())["layer"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return dict(model.named_modules()).get(name)


def _box_pairs(images: list[dict], rng: np.random.Generator, limit: int) -> list[dict]:
    """One item per (image, box), images in random order, at most ``limit``."""
    order = rng.permutation(len(images))
    return [dict(image=images[i]["image"], path=images[i]["path"], label=b[0], box=b)
            for i in order for b in images[i]["boxes"]][:limit]


def explain(checkpoints: Sequence[str | Path], data: str | Path, out: str | Path, n: int = 16,
            boxes_csv: str | Path | None = None, max_boxes: int = 200, seed: int = 0,
            val_boxes: int = 200) -> dict:
    """Grad-CAM grid for ``n`` boxed test images and the pointing game on up to ``max_boxes`` test boxes, each
    model's CAM layer chosen on up to ``val_boxes`` validation boxes (:func:`choose_cam_layer`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = boxed_test_images(Path(data), Path(boxes_csv) if boxes_csv else None)
    rng = np.random.default_rng(seed)
    pairs = _box_pairs(images, rng, max_boxes)
    try:
        val_pairs = _box_pairs(boxed_test_images(Path(data), Path(boxes_csv) if boxes_csv else None, split="val"),
                               rng, val_boxes)
    except FedxrError:  # no validation image has a box: the resolution rule decides
        val_pairs = []
    results, all_maps, decoded = {}, {}, {}
    for path in checkpoints:
        model, ckpt = model_from_checkpoint(path)
        prep = ckpt["preprocessing"]
        size = prep.size
        for p in pairs + val_pairs:  # each file decoded once per input size, for the maps and the grid alike
            if (p["path"], size) not in decoded:
                decoded[p["path"], size] = prep.load(p["path"])
        items, val_items = ([dict(p, box_px=_box_in_pixels(p["box"], size), gray=decoded[p["path"], size]) for p in ps]
                            for ps in (pairs, val_pairs))
        layer, choice = choose_cam_layer(model, ckpt, val_items)
        if choice["candidates"]:  # chosen on validation boxes: the console's heatmaps use it too
            write_json_atomic(cam_layer_file(path), choice)
        maps = heatmaps(model, ckpt, items, layer)
        key = f"{ckpt['model_name']} ({Path(path).parent.name}/{Path(path).stem})"
        results[key] = {"checkpoint": str(path), "model_name": ckpt["model_name"], "cam_layer": choice,
                        **pointing_game(items, maps, choice["cells"])}
        all_maps[key] = (items, maps, size)
    # One image per row in the grid: the first box of each of the first n images.
    shown: list[int] = []
    seen: set[str] = set()
    for i, p in enumerate(pairs):
        if p["image"] not in seen and len(shown) < n:
            seen.add(p["image"])
            shown.append(i)
    plot_grid(all_maps, shown, out / "gradcam_grid.png")
    report = {"data": str(data), "images_with_boxes": len(images), "boxes_scored": len(pairs),
              "validation_boxes": len(val_pairs), "models": results}
    write_json_atomic(out / "pointing_game.json", report)
    report["out"] = str(out)
    return report


def plot_grid(all_maps: dict, shown: list[int], path: Path) -> None:
    from matplotlib.patches import Rectangle

    models = list(all_maps)
    with saved_figure(path, dpi=80, layout_rect=(0, 0, 1, 1 - 0.25 / len(shown)), nrows=len(shown),
                      ncols=len(models) + 1, figsize=(2.6 * (len(models) + 1), 2.6 * len(shown)),
                      squeeze=False) as (fig, axes):
        for r, idx in enumerate(shown):
            for c, key in enumerate([None] + models):
                ax = axes[r, c]
                items, maps, size = all_maps[key or models[0]]
                item = items[idx]
                ax.imshow(item["gray"], cmap="gray")
                if key is not None:
                    ax.imshow(maps[idx], cmap="jet", alpha=0.4, vmin=0, vmax=1)
                    if maps[idx].max() > 0:  # an all-zero map has no peak (and scores a miss)
                        py, px = np.unravel_index(int(np.argmax(maps[idx])), maps[idx].shape)
                        ax.plot(px, py, "w+", ms=10, mew=2)
                x0, y0, x1, y1 = item["box_px"]
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1.5))
                title = f"{item['image']}\n{item['label']}" if key is None else key.replace(" (", "\n(")
                ax.set_title(title, fontsize=7)
                ax.axis("off")
        fig.suptitle("Grad-CAM for the boxed finding (green: ground-truth box, +: heatmap peak)", fontsize=9)


def format_explain(report: dict) -> str:
    lines = [f"pointing game on {report['boxes_scored']} boxes ({report['images_with_boxes']} boxed test images):"]
    for key, r in report["models"].items():
        lines.append(f"  {key:<40} {r['overall']:.3f}   (random heatmap: {r['random_overall']:.3f}; a perfect heatmap "
                     f"at {r['cam_cells']}x{r['cam_cells']} cells: {r['ceiling_overall']:.3f}); within one cell "
                     f"{r['margin_score_overall']:.3f} (random {r['margin_random_overall']:.3f}); energy in the box "
                     f"{r['energy_overall']:.3f} (random {r['random_overall']:.3f})")
        c = r.get("cam_layer")
        if c:
            lines.append(f"  {'':<40} CAM layer {c['layer']} ({c['cells']}x{c['cells']}), chosen by {c['chosen_on']}")
    lines.append(f"wrote {report['out']}/gradcam_grid.png and pointing_game.json")
    return "\n".join(lines)
