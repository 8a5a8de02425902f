"""Federated overhead: the share of each round's wall time that is not site work, and bytes per round.

    python benchmarks/federated_overhead.py           # teacher- and student-size models, NVFlare simulator
    python benchmarks/federated_overhead.py --smoke   # tiny_cnn, one round (CI)

A round's wall time runs from the first site receiving the global model to the first site receiving
the next one (so it includes sending, aggregation, persisting and dispatch). Site work is the slowest
site's validation + training. Overhead = 1 − site work / wall time. Bytes per round = the float
weights sent down to and up from every site (what FedAvg moves; NVFlare adds small headers).
The overhead is mostly a fixed cost per round, so its share shrinks as site work grows: the JSON
also gives the fixed cost in seconds, from which the share at NIH scale follows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from fedxr.config import load_recipe  # noqa: E402
from fedxr.data.prepare import ensure_dataset, ensure_sites  # noqa: E402
from fedxr.federated.run import federate  # noqa: E402
from fedxr.models.classifier import XRayClassifier  # noqa: E402

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def model_bytes(name: str) -> int:
    return sum(t.numel() * t.element_size() for t in XRayClassifier(name).state_dict().values())


def run(model: str, tmp: Path, rounds: int, patients: int, size: int) -> dict:
    recipe = load_recipe(QUICKSTART, [
        f"data.root={tmp / 'phantom'}", f"data.phantom.patients={patients}", "data.phantom.size=128",
        f"data.image_size={size}", "data.sites=2", "data.scheme=iid", "federated.min_clients=2",
        f"federated.rounds={rounds}", "federated.cross_site_eval=false", "data.num_workers=0",
        f"data.cache_dir={tmp / 'cache'}", f"output.runs_dir={tmp / 'runs'}", f"output.name={model}", f"model.name={model}"])
    ensure_dataset(recipe, progress=False)
    ensure_sites(recipe)
    return measure(model, size, federate(recipe, "sim", restart=True))  # a measurement: never a kept earlier run


def measure(model: str, size: int, summary) -> dict:
    """Per-round wall time, site work and overhead from a finished federation's round table (``summary``: its
    FederateSummary); the bytes a round moves for 2 sites."""
    table = [r for r in json.loads(Path(summary.rounds).read_text()) if isinstance(r["round"], int)]
    per_round = []
    for r in table[:-1]:  # the last round has no "next receive" to close it
        work = max(s["train_s"] + s["validate_s"] for s in r["sites"].values())
        per_round.append({"round": r["round"], "wall_s": r["wall_s"], "site_work_s": round(work, 3),
                          "overhead_s": round(r["wall_s"] - work, 3), "overhead_share": r["overhead_share"]})
    nbytes = model_bytes(model)
    return {"model": model, "image_size": size, "rounds": per_round, "model_bytes": nbytes,
            "bytes_per_round": 2 * 2 * nbytes, "sites": 2, "job_wall_s": summary.wall_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--from-federate", metavar="DIR", help="with --smoke: measure this finished tiny_cnn federation "
                    "at 32 px with 2 sites (a stage folder, e.g. CI's tiny run) instead of running one")
    args = ap.parse_args()
    plan = [("tiny_cnn", 2, 30, 32)] if args.smoke else [("mobilenetv3_small_100", 3, 300, 96), ("densenet121", 3, 300, 96)]
    results = []
    for model, rounds, patients, size in plan:
        if args.smoke and args.from_federate:
            from fedxr.artifacts import FederateSummary

            res = measure(model, size, FederateSummary.read(Path(args.from_federate) / FederateSummary.FILE))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                res = run(model, Path(tmp), rounds, patients, size)
        results.append(res)
        for r in res["rounds"]:
            print(f"{model:<24} round {r['round']}: wall {r['wall_s']:.2f} s, site work {r['site_work_s']:.2f} s, "
                  f"overhead {r['overhead_s']:.2f} s ({100 * (r['overhead_share'] or 0):.1f} %)")
        print(f"{model:<24} {res['bytes_per_round'] / 1e6:.1f} MB moved per round (2 sites, down + up)")
    print(f"wrote {write_result('federated_overhead', {'results': results}, smoke=args.smoke)}")


if __name__ == "__main__":
    main()
