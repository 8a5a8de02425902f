"""Turn an NVFlare server result into fedxr outputs: checkpoints, round table, cross-site matrix, plots."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedxr.artifacts import FederateSummary
from fedxr.config import Recipe
from fedxr.errors import FedxrError
from fedxr.labels import VAL_AUROC
from fedxr.layout import GLOBAL_BEST, GLOBAL_LAST, chosen_checkpoint
from fedxr.records import read_records, round_table
from fedxr.records import OUTGOING
from fedxr.models.checkpoint import save_checkpoint
from fedxr.plots import saved_figure
from fedxr.data.atomic import write_json_atomic

#: NVFlare's file names for the last and the best global model, and how fedxr names them.
GLOBAL_MODELS = {"FL_global_model.pt": GLOBAL_LAST, "best_FL_global_model.pt": GLOBAL_BEST}
SERVER_MODEL_LABELS = {"SRV_FL_global_model.pt": "global (last)", "SRV_best_FL_global_model.pt": "global (best)"}


def _model_state(recipe: Recipe) -> dict:
    """The names, shapes and types of the job's model (what an encrypted global model decrypts into)."""
    from fedxr.federated.job import model_config
    from fedxr.federated.client import import_class

    described = model_config(recipe)
    return import_class(described["class_path"])(**described["args"]).state_dict()


def nvflare_to_checkpoint(src: Path, dst: Path, recipe: Recipe, metrics: dict, source: str = "federate",
                          he_workspace: Path | None = None) -> Path:
    """Convert an NVFlare PyTorch global model (``{"model": LightningModule state_dict}``) to fedxr format.

    The thresholds are the global model's ``thresholds`` buffer: FedAvg's step-weighted mean of the
    thresholds each site chose on its own validation split. The preprocessing is the one the job's model
    description carried (the recipe's, resolved by :attr:`Recipe.preprocessing`).
    """
    blob = torch.load(src, map_location="cpu", weights_only=False)
    state = blob.get("model", blob)
    from fedxr.privacy.he import decrypt_state, find_client_context, is_encrypted

    if is_encrypted(state):  # privacy.he: the server saved ciphertexts; a site's secret context reads them
        state = decrypt_state(state, _model_state(recipe), find_client_context(he_workspace), src)
    net = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    if not net:
        raise FedxrError(f"{src}: no 'model.*' weights in the NVFlare checkpoint")
    return save_checkpoint(dst, model_name=recipe.model.name, state_dict=net, preprocessing=recipe.preprocessing,
                           thresholds=state["thresholds"], metrics=metrics, recipe=recipe.resolved(), source=source,
                           extra={"nvflare_meta": _plain(blob.get("meta_props", {})),
                                  **({"norm": recipe.norm} if recipe.norm != "batch" else {})})


def _plain(obj):
    """JSON-safe copy (arrays → lists), so the checkpoint stays loadable with weights_only=True."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def read_cross_site(server_dir: Path) -> dict | None:
    """``cross_val_results.json`` → {"by_data_site": {site: {model label: val_auroc}}, "models": [...]}."""
    path = server_dir / "cross_site_val" / "cross_val_results.json"
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    if not raw:
        return None
    table = {site: {SERVER_MODEL_LABELS.get(m, f"{m} (local)"): (metrics or {}).get(VAL_AUROC) for m, metrics in models.items()}
             for site, models in raw.items()}
    models = sorted({m for v in table.values() for m in v}, key=lambda m: (not m.startswith("global"), m))
    return {"metric": VAL_AUROC, "by_data_site": table, "models": models, "sites": sorted(table), "raw": raw}


def plot_cross_site(cross: dict, path: Path) -> None:
    import numpy as np

    models, sites = cross["models"], cross["sites"]
    grid = np.array([[cross["by_data_site"][s].get(m) or np.nan for s in sites] for m in models], dtype=float)
    with saved_figure(path, dpi=100, figsize=(1.6 + 1.3 * len(sites), 1.2 + 0.5 * len(models))) as (fig, ax):
        im = ax.imshow(grid, cmap="viridis", vmin=0.5, vmax=1.0)
        ax.set_xticks(range(len(sites)), sites)
        ax.set_yticks(range(len(models)), models)
        for i in range(len(models)):
            for j in range(len(sites)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center",
                            color="white" if grid[i, j] < 0.75 else "black")
        ax.set_xlabel("data of site")
        ax.set_title(f"cross-site {cross['metric']}")
        fig.colorbar(im, ax=ax)


def plot_rounds(table: list[dict], path: Path) -> None:
    numbered = [r for r in table if isinstance(r["round"], int)]
    sites = sorted({s for r in table for s in r["sites"]})
    with saved_figure(path, dpi=100, figsize=(7, 4)) as (fig, ax):
        for s in sites:
            xs = [r["round"] for r in numbered if s in r["sites"] and r["sites"][s]["val_auroc"] is not None]
            ys = [r["sites"][s]["val_auroc"] for r in numbered if s in r["sites"] and r["sites"][s]["val_auroc"] is not None]
            final = next((r["sites"].get(s, {}).get("val_auroc") for r in table if r["round"] == "final"), None)
            if final is not None:
                xs, ys = xs + [len(numbered)], ys + [final]
            ax.plot(xs, ys, "o-", label=s, alpha=0.8)
        agg = [(r["round"], r["aggregate_val_auroc"]) for r in numbered if r["aggregate_val_auroc"] is not None]
        if agg:
            ax.plot(*zip(*agg), "k--", lw=2, label="aggregate")
        ax.set_xlabel("round (validation of the received global model; last point: final global model)")
        ax.set_ylabel(VAL_AUROC)
        ax.axhline(0.5, c="grey", lw=0.7, ls=":")
        ax.legend(fontsize=8)


def choose_global(cross: dict | None, rows: list[dict]) -> dict | None:
    """Which global model fedxr calls best. NVFlare's in-round selection only ever sees the models it sends
    out (each site scores the model it receives), so the model after the last round is never a
    candidate. Cross-site evaluation scores both that and NVFlare's best on every site's validation split;
    the one with the higher validation-size-weighted mean wins (ties: the last, trained longer)."""
    if not cross:
        return None
    sizes = {r["site"]: r["val_images"] for r in rows if r.get("val_images")}
    scores = {}
    for label in ("global (best)", "global (last)"):
        per_site = {s: v.get(label) for s, v in cross["by_data_site"].items() if v.get(label) is not None}
        if per_site:
            weight = {s: sizes.get(s, 1) for s in per_site}
            scores[label] = sum(per_site[s] * weight[s] for s in per_site) / sum(weight.values())
    if len(scores) < 2:
        return None
    chosen = "global (last)" if scores["global (last)"] >= scores["global (best)"] else "global (best)"
    return {"chosen": chosen, "val_auroc": scores, "weighting": "validation images per site"}


def _privacy_outputs(rows: list[dict], records: Path | None, out: Path) -> tuple[str | None, str | None]:
    """``outgoing.json`` (what left each site, from the sites' outgoing audit) and ``privacy.json`` (the DP
    ledger, with ``privacy.png``), when the run has them."""
    from fedxr.privacy.dp import ledger, plot_ledger

    written: dict[str, str] = {}
    outgoing = records / OUTGOING if records is not None else None
    if outgoing is not None and outgoing.is_dir():
        from fedxr.privacy.audit import read_outgoing, summarise

        write_json_atomic(out / "outgoing.json", summarise(read_outgoing(outgoing)))
        written["outgoing"] = str(out / "outgoing.json")
    book = ledger(rows)
    if book is not None:
        write_json_atomic(out / "privacy.json", book)
        plot_ledger(book, out / "privacy.png")
        written["privacy"] = str(out / "privacy.json")
    return written.get("outgoing"), written.get("privacy")


def collect(recipe: Recipe, server_dir: Path, out: Path, records: Path | None, workspace: Path,
            source: str = "federate", env: str = "sim") -> FederateSummary:
    """Write fedxr's federated outputs into ``out`` from the server's run folder ``server_dir``; their summary
    is the caller's to complete (the run's wall time) and write."""
    app = next((p for p in server_dir.glob("app_*") if (p / "FL_global_model.pt").is_file()), None)
    if app is None:
        raise FedxrError(f"{server_dir}: no FL_global_model.pt; the job did not finish — see the logs under {workspace}")
    cross = read_cross_site(server_dir)
    rows = read_records(records) if records and records.is_dir() else []
    table = round_table(rows, cross) if rows else []
    checkpoints: dict[str, str] = {}
    selection = choose_global(cross, rows)
    for nv_name, ours in GLOBAL_MODELS.items():
        label = SERVER_MODEL_LABELS[f"SRV_{nv_name}"]
        if ours == GLOBAL_BEST and selection and selection["chosen"] == "global (last)":
            nv_name = "FL_global_model.pt"  # the last model validated better than the in-round best
        if (app / nv_name).is_file():
            metrics = {"cross_site_val_auroc": {s: v.get(label) for s, v in cross["by_data_site"].items()}} if cross else {}
            if ours == GLOBAL_BEST and selection:
                metrics["selection"] = selection
            nvflare_to_checkpoint(app / nv_name, out / ours, recipe, metrics, source, he_workspace=workspace)
            checkpoints[ours.removesuffix(".ckpt")] = str(out / ours)
    if table:
        write_json_atomic(out / "rounds.json", table)
        plot_rounds(table, out / "rounds.png")
    if cross:
        write_json_atomic(out / "cross_site.json", cross)
        plot_cross_site(cross, out / "cross_site.png")
    outgoing, privacy = _privacy_outputs(rows, records, out)
    return FederateSummary(
        checkpoint=str(chosen_checkpoint(out)),  # the model this run stands for: best, else last
        checkpoints=checkpoints, workspace=str(workspace), server_run=str(server_dir),
        tensorboard=str(server_dir / "tb_events"), env=env, selection=selection or None,
        rounds=str(out / "rounds.json") if table else None, cross_site=str(out / "cross_site.json") if cross else None,
        outgoing=outgoing, privacy=privacy)
