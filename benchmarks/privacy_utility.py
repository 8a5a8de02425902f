"""What privacy costs: the quickstart teacher's test AUROC at ε = ∞ (no DP), 8, 3 and 1, and HE vs plain FedAvg.

    python benchmarks/privacy_utility.py                  # after `make demo`: ε = ∞, 8, 3, 1, the recipe's rounds
    python benchmarks/privacy_utility.py --rounds 5       # every ε with the same, smaller number of rounds
    python benchmarks/privacy_utility.py --he             # HE vs plain in POC: teacher and student architectures
    python benchmarks/privacy_utility.py --epsilons 1e6 --rounds 3 --merge   # add a row to the results
    python benchmarks/privacy_utility.py --smoke          # toy data, ε = ∞ and 3, 1 round (CI)

Utility: for each ε the teacher is trained federatedly in the simulator exactly as `fedxr federate` does
(same data, sites, seed and rounds; ε = ∞ is the recipe without DP, BatchNorm and all; every finite ε is
DP-SGD with GroupNorm), the global model is chosen on validation only, and scored once on the pooled test
split. Reports macro AUROC with its 95 % bootstrap interval, the ε each site actually spent, and the
smallest ε whose AUROC is within 0.05 of no DP (or that none is). Writes results/privacy_utility.json + .png.

HE (``--he``): the recipe's teacher and first student architectures trained plainly and with homomorphic
encryption in POC mode (real server and site processes, mutual TLS), ``--he-rounds`` rounds each: seconds
per round, bytes each site sent per round (its outgoing audit) and the server's peak memory (resident
memory of the server's processes, sampled every 0.2 s). Writes results/privacy_he.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, toy_federation, write_result  # noqa: E402

from fedxr.config import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WITHIN = 0.05


def _variant(recipe, label: str, name: str, **sections):
    """The recipe with privacy/federation changes, its own run folder, and the base run's sites."""
    changed = recipe.changed(label, output={"name": name}, distill={"students": []}, **sections)
    if recipe.layout.sites.exists() and not changed.layout.sites.exists():
        shutil.copytree(recipe.layout.sites, changed.layout.sites)  # the same site manifests as the base run
    return changed


def _prepare(recipe) -> None:
    from fedxr.data.prepare import ensure_dataset, ensure_sites

    ensure_dataset(recipe, progress=False)
    ensure_sites(recipe)


def federate_and_score(recipe) -> dict:
    """Run the recipe's federation in the simulator, score the checkpoint chosen on validation once on the
    pooled test split, and read each site's privacy ledger: the fields every privacy benchmark row has."""
    from fedxr.evaluation import evaluate_checkpoint
    from fedxr.federated.run import federate
    from fedxr.layout import chosen_checkpoint

    t0 = time.time()
    federate(recipe, "sim", restart=True)  # a measurement: never a kept earlier run
    seconds = time.time() - t0
    ckpt = chosen_checkpoint(recipe.layout.federate)
    score = evaluate_checkpoint(ckpt, recipe.layout.sites, split="test", cache_dir=recipe.data.cache_dir,
                                out=recipe.layout.federate / "eval_test", progress=False)
    book_path = recipe.layout.federate / "privacy.json"
    book = json.loads(book_path.read_text()) if book_path.is_file() else None
    return {"macro_auroc": score.macro_auroc, "macro_auroc_ci95": score.macro_auroc_ci95,
            "test_images": score.images, "seconds": round(seconds, 1),
            "epsilon_spent": ({s: v["epsilon_spent"] for s, v in book["sites"].items()} if book else None),
            "noise_multiplier": ({s: v["noise_multiplier"] for s, v in book["sites"].items()} if book else None),
            "val_epsilon_spent": ({s: v.get("val_epsilon_spent") for s, v in book["sites"].items()} if book else None),
            "within_target": book["within_target"] if book else None, "checkpoint": str(ckpt)}


def utility(base, epsilons: list[float], rounds: int) -> list[dict]:
    rows = []
    for eps in epsilons:
        tag = "inf" if math.isinf(eps) else f"{eps:g}".replace("+", "")  # 1e+06 → 1e06: a folder name
        recipe = _variant(base, f"epsilon {tag}", f"{base.output.name}_eps{tag}",
                          privacy={"dp": False if math.isinf(eps) else {"epsilon": eps}},
                          federated={"rounds": rounds})
        _prepare(recipe)
        print(f"--- ε = {tag}: {rounds} rounds of {recipe.model.name} ({recipe.norm} norm)", flush=True)
        rows.append({"epsilon": None if math.isinf(eps) else eps, "label": tag, "norm": recipe.norm,
                     **federate_and_score(recipe)})
        r = rows[-1]
        print(f"    macro AUROC {r['macro_auroc']:.4f} ({r['macro_auroc_ci95'][0]:.3f}–{r['macro_auroc_ci95'][1]:.3f}), "
              f"{r['seconds']:.0f} s" + (f", ε spent {max(r['epsilon_spent'].values()):.2f}" if r["epsilon_spent"] else ""),
              flush=True)
    return rows


def smallest_useful_epsilon(rows: list[dict]) -> float | None:
    """The smallest finite ε whose AUROC is within WITHIN of no DP (None: no finite ε is)."""
    base = next((r["macro_auroc"] for r in rows if r["epsilon"] is None), None)
    ok = [r["epsilon"] for r in rows if r["epsilon"] is not None and base is not None
          and r["macro_auroc"] >= base - WITHIN]
    return min(ok) if ok else None


def plot(rows: list[dict], path: Path) -> None:
    from fedxr.plots import saved_figure

    finite = [r for r in rows if r["epsilon"] is not None]
    base = next((r for r in rows if r["epsilon"] is None), None)
    with saved_figure(path, dpi=100, figsize=(5.5, 3.4)) as (fig, ax):
        if finite:
            xs = [r["epsilon"] for r in finite]
            ys = [r["macro_auroc"] for r in finite]
            err = [[y - r["macro_auroc_ci95"][0] for y, r in zip(ys, finite)],
                   [r["macro_auroc_ci95"][1] - y for y, r in zip(ys, finite)]]
            ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, label="DP-SGD (GroupNorm)")
            ax.set_xscale("log")
        if base:
            ax.axhline(base["macro_auroc"], color="k", ls="--", lw=1, label="no DP (ε = ∞)")
            ax.axhspan(base["macro_auroc"] - WITHIN, base["macro_auroc"], color="0.9", label=f"within {WITHIN} of no DP")
        ax.axhline(0.5, color="r", ls=":", lw=1, label="chance")
        ax.set_xlabel("target ε per site (whole federation)")
        ax.set_ylabel("test macro AUROC")
        ax.set_title("privacy vs utility (quickstart teacher)")
        ax.legend(fontsize=7)


class PeakMemory:
    """Peak resident memory (MB) of the processes whose command line names ``folder`` (POC's server), sampled."""

    def __init__(self, folder: Path, every_s: float = 0.2):
        self.folder, self.every_s, self.peak_mb = folder, every_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        key = str(self.folder)
        while not self._stop.is_set():
            total = 0
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                try:
                    if any(key in a for a in proc.info["cmdline"] or []):
                        total += proc.info["memory_info"].rss
                except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError):
                    continue
            self.peak_mb = max(self.peak_mb, total / 2**20)
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def he_costs(base, rounds: int, save=None) -> list[dict]:
    from fedxr.federated.run import federate

    rows = []
    for role, model in (("student", (base.distill.students or [base.model.name])[0]), ("teacher", base.model.name)):
        for he in (False, True):
            recipe = _variant(base, f"{role} he={he}", f"{base.output.name}_he_{role}_{'on' if he else 'off'}",
                              model={"name": model}, privacy={"he": he},
                              federated={"rounds": rounds, "env": "poc", "cross_site_eval": False})
            _prepare(recipe)
            print(f"--- {role} {model}: HE {'on' if he else 'off'}, {rounds} rounds in POC", flush=True)
            # POC's server kit lives in the run's poc/ folder; its processes name .../prod_00/server in their command line.
            server = (recipe.layout.federate / "poc").resolve() / "example_project" / "prod_00" / "server"
            t0 = time.time()
            with PeakMemory(server) as memory:
                federate(recipe, "poc", restart=True)  # a measurement: never a kept earlier run
            seconds = time.time() - t0
            table = json.loads((recipe.layout.federate / "rounds.json").read_text())
            per_round = [r["wall_s"] for r in table if isinstance(r["round"], int)]
            sent = json.loads((recipe.layout.federate / "outgoing.json").read_text())
            train = [r for r in sent if r["task"] == "train"]
            rows.append({"role": role, "model": model, "he": he, "rounds": rounds, "job_s": round(seconds, 1),
                         "round_s": round(sum(per_round) / len(per_round), 2) if per_round else None,
                         "bytes_per_site_round": round(sum(r["bytes"] for r in train) / len(train)) if train else None,
                         "server_peak_mb": round(memory.peak_mb, 1)})
            r = rows[-1]
            print(f"    {r['round_s']} s/round, {r['bytes_per_site_round']:,} B per site and round, server peak "
                  f"{r['server_peak_mb']} MB", flush=True)
            if save:
                save(rows)  # after every row: a later one that runs out of memory keeps the ones before
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    ap.add_argument("--epsilons", nargs="+", default=["inf", "8", "3", "1"], help="target ε values; inf = no DP")
    ap.add_argument("--rounds", type=int, help="rounds for every ε (default: the recipe's)")
    ap.add_argument("--he", action="store_true", help="measure HE vs plain in POC instead of the ε sweep")
    ap.add_argument("--he-rounds", type=int, default=2)
    ap.add_argument("--merge", action="store_true", help="add these ε rows to the existing results (same rounds)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()
    overrides = list(args.overrides)
    if args.smoke:
        work = ROOT / "runs" / "bench_privacy_smoke"
        overrides = [*toy_federation(work), "federated.cross_site_eval=false", "distill.students=[]", *overrides]
        args.epsilons, args.rounds = ["inf", "3"], 1
    base = load_recipe(args.recipe, overrides)
    if args.he:
        def save(rows):
            return write_result("privacy_he", {"rows": rows, "recipe": base.resolved()}, smoke=args.smoke)

        print(f"wrote {save(he_costs(base, args.he_rounds, save))}")
        return
    epsilons = [float(e) for e in args.epsilons]
    rows = utility(base, epsilons, args.rounds or base.federated.rounds)
    previous = RESULTS / f"privacy_utility{'.smoke' if args.smoke else ''}.json"
    if args.merge and previous.is_file():
        done = {r["label"] for r in rows}
        rows = sorted([r for r in json.loads(previous.read_text())["rows"] if r["label"] not in done] + rows,
                      key=lambda r: -(r["epsilon"] or math.inf))
    useful = smallest_useful_epsilon(rows)
    png = RESULTS / f"privacy_utility{'.smoke' if args.smoke else ''}.png"
    plot(rows, png)
    path = write_result("privacy_utility", {"rows": rows, "rounds": args.rounds or base.federated.rounds,
                                            "within": WITHIN, "smallest_epsilon_within": useful,
                                            "plot": str(png.relative_to(ROOT)), "recipe": base.resolved()},
                        smoke=args.smoke)
    print(("smallest ε within %.2f of no DP: %s" % (WITHIN, f"{useful:g}" if useful is not None else "none")) +
          f"\nwrote {path} and {png}")


if __name__ == "__main__":
    main()
