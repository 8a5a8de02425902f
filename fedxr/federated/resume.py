"""Resume a federated stage from its last completed round.

A federation killed part-way (`fedxr run` stopped by Ctrl-C, an out-of-memory kill, a reboot of the coordinator's
machine) loses only the round it was in. After every round:

- the server (:class:`fedxr.federated.controller.SiteDeadlineFedAvg`) writes ``STAGE/resume/``: the global model as
  it holds it after that round, NVFlare's best global model so far, and ``point.json`` (the round, the job's digest,
  the best-model selection's score) — the files first, the point last, each atomically;
- each site (:mod:`fedxr.federated.client`) writes, in its work folder, what NVFlare's Lightning patch otherwise
  carries from one round to the next in memory: its model as trained (a FedBN site's own BatchNorm), its
  optimizer, learning-rate schedule and gradient scaler. It keeps the last two rounds: a site may have finished
  round r + 1 while the server had not.

Running the same job again (same recipe, model, initial weights and site data: :func:`job_digest`) starts at the
round after the point; the round records are cut back to the rounds before it. Every round draws its data order
and augmentation from a seed of its own (``site_round_seed``), so in the simulator a resumed federation ends with
the same model, bit for bit, as one never interrupted. A changed recipe does not match the digest and starts
from round 0, as ``--restart-stage`` does.

Not resumable (they start from round 0, and say why): differential privacy (the accountant's state and the
budget already spent: a restarted DP stage spends it again), homomorphic encryption, SCAFFOLD and FedOpt (NVFlare
controllers other than fedxr's FedAvg).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from fedxr.edge.model import sha256_of
from fedxr.data.atomic import copy_file_atomic, save_torch_atomic, write_json_atomic

#: The stage's resume folder, and what it holds.
RESUME_DIR = "resume"
POINT_FILE = "point.json"
#: Left in the resume folder by a finished run: which job it was.
DONE_FILE = "done.json"
#: A site's state after a round, in its work folder.
SITE_STATE = "resume_round{round}.pt"


def resumable(recipe) -> str | None:
    """Why a stage of this recipe cannot resume (None: it can)."""
    if recipe.privacy.dp:
        return "privacy.dp: the accountant's state is not kept between runs"
    if recipe.privacy.he:
        return "privacy.he: NVFlare's encrypted-aggregation controller has no resume"
    if recipe.federated.algorithm not in ("fedavg", "fedprox"):
        return f"federated.algorithm {recipe.federated.algorithm}: only fedavg and fedprox resume"
    return None


def _file_digest(path: Path, h) -> None:
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                h.update(str(p.relative_to(path)).encode())
                _file_digest(p, h)
    elif path.is_file():
        h.update(sha256_of(path).encode())


def job_digest(recipe_yaml: str, model: dict, sites_dir: Path | None, inputs: list[Path], extra: str = "") -> str:
    """What makes two runs of a stage the same job: the resolved recipe, the model description, the sites'
    manifests, every input file (initial weights, a site's own teacher) and the fedxr, NVFlare and torch versions.
    The images themselves are not read: a manifest names each image, and images changed in place under the same
    names are not noticed."""
    import nvflare
    import torch

    from fedxr import __version__

    h = hashlib.sha256()
    h.update(recipe_yaml.encode())
    h.update(json.dumps(model, sort_keys=True, default=str).encode())
    h.update(extra.encode())
    h.update(f"{__version__}|{nvflare.__version__}|{torch.__version__}".encode())
    for path in ([Path(sites_dir)] if sites_dir else []) + sorted(Path(p) for p in inputs):
        h.update(str(path.name).encode())
        _file_digest(path, h)
    return h.hexdigest()[:20]


def read_point(folder: Path) -> dict | None:
    """``point.json``: the job's digest and its points, newest first (the last round and the one before it)."""
    try:
        point = json.loads((folder / POINT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(point, dict) or not isinstance(point.get("points"), list) or not point["points"]:
        return None
    return point


def last_round(folder: Path) -> int | None:
    """The newest round a resume point was kept for (None: none)."""
    point = read_point(folder)
    return point["points"][0].get("round") if point else None


def _usable(folder: Path, entry: dict, rounds: int, site_works: list[Path]) -> str | None:
    """Why a kept point cannot be resumed from (None: it can)."""
    done = entry.get("round")
    if not isinstance(done, int) or not 0 <= done < rounds:
        return f"the resume point's round {done!r} is not one of this job's {rounds}"
    missing = [name for name in (entry.get("global"), entry.get("best")) if name and not (folder / name).is_file()]
    if not entry.get("global") or missing:
        return f"the resume point of round {done} lacks {', '.join(missing) or 'its global model'}"
    late = [str(w.name) for w in site_works if not site_state_file(w, done).is_file()]
    if late:
        return f"site(s) {', '.join(late)} kept no state for round {done}"
    return None


def next_round(folder: Path, digest: str, rounds: int, site_works: list[Path], finished_too: bool = True
               ) -> tuple[int, str]:
    """The round a run of this job starts at (0: from the beginning) and why. The newest point is used if every site
    kept its state for that round, else the one before (the server may aggregate a round before a site has written
    its state: the site sends its update from inside its fit and keeps its state after it). A point that a
    production server marked finished (:func:`mark_finished`) counts only with ``finished_too``."""
    point = read_point(folder)
    if point is None:
        return 0, "no resume point"
    if point.get("job") != digest:
        return 0, "the recipe, the model or the sites' data changed since the interrupted run"
    if point.get("finished") and not finished_too:
        return 0, "the run that kept the resume point finished all its rounds; this is a new submission"
    reasons = []
    for entry in point["points"]:
        why_not = _usable(folder, entry, rounds, site_works)
        if why_not is None:
            return entry["round"] + 1, f"rounds 0-{entry['round']} were completed by an interrupted run"
        reasons.append(why_not)
    return 0, "; ".join(reasons)


def write_point(folder: Path, digest: str, rnd: int, model: dict, selection: dict, best: Path | None) -> None:
    """The server's state after round ``rnd``: ``model`` (the global model's params, meta and metrics as the
    server holds them) and its best model file so far, named by round, then the point that lists them with the
    previous round's, then older files removed: a kill at any moment leaves a whole point."""
    folder.mkdir(parents=True, exist_ok=True)
    entry: dict[str, Any] = {"round": rnd, "global": f"global_round{rnd}.pt", "best": None, "selection": selection}
    save_torch_atomic(folder / entry["global"], model)
    if best is not None and best.is_file():
        entry["best"] = f"best_round{rnd}.pt"
        copy_file_atomic(best, folder / entry["best"])
    old = read_point(folder)
    previous = [e for e in (old["points"] if old and old.get("job") == digest else []) if e.get("round") == rnd - 1]
    points = [entry] + previous[:1]
    write_json_atomic(folder / POINT_FILE, {"job": digest, "points": points})
    kept = {name for e in points for name in (e["global"], e["best"]) if name}
    for leftover in folder.glob("*_round*.pt"):
        if leftover.name not in kept:
            leftover.unlink(missing_ok=True)


def mark_finished(folder: Path, digest: str, last: int) -> None:
    """A production server's job that finished round ``last``, its last: its point stays (a job the submitter sends
    again after losing it during the final evaluation resumes there) but marked, so that a new submission of the
    same job trains from round 0."""
    point = read_point(folder)
    if point is not None and point.get("job") == digest and point["points"][0].get("round") == last:
        write_json_atomic(folder / POINT_FILE, {**point, "finished": True})


def load_global(folder: Path, rnd: int) -> tuple[dict, dict]:
    """(the kept point of round ``rnd``, the global model saved with it: params, meta, metrics)."""
    import torch

    point = read_point(folder)
    entry = next((e for e in (point or {}).get("points", []) if e.get("round") == rnd), None)
    if point is None or entry is None:
        raise FileNotFoundError(f"{folder}: no resume point for round {rnd}; rerun the stage from round 0 "
                                "(fedxr run --restart-stage)")
    return {**entry, "job": point["job"]}, torch.load(folder / entry["global"], map_location="cpu", weights_only=False)


def mark_done(folder: Path, digest: str, summary_file: Path) -> None:
    """A finished stage: its resume state is not needed any more, and a rerun of the same job can take its
    outputs (:func:`finished`) instead of training again."""
    shutil.rmtree(folder, ignore_errors=True)
    write_json_atomic(folder / DONE_FILE, {"job": digest, "summary": str(summary_file)})


def finished(folder: Path, digest: str) -> Path | None:
    """The summary of a finished run of this very job, if it and its outputs are still there."""
    try:
        done = json.loads((folder / DONE_FILE).read_text())
    except (OSError, ValueError):
        return None
    summary = Path(done.get("summary", "")) if isinstance(done, dict) and done.get("job") == digest else None
    return summary if summary is not None and summary.is_file() else None


def site_state_file(work: Path, rnd: int) -> Path:
    return Path(work) / SITE_STATE.format(round=rnd)


def site_states(work: Path) -> list[tuple[int, Path]]:
    """(round, file) of every state a site kept in ``work``."""
    prefix = SITE_STATE.split("{")[0]
    found = ((p.stem.removeprefix(prefix), p) for p in Path(work).glob(SITE_STATE.format(round="*")))
    return [(int(number), p) for number, p in found if number.isdigit()]


def save_site_state(work: Path, rnd: int, state: dict[str, Any]) -> None:
    """A site's state after training round ``rnd``; states before ``rnd - 1`` are removed."""
    save_torch_atomic(site_state_file(work, rnd), state)
    for number, old in site_states(work):
        if number < rnd - 1:
            old.unlink(missing_ok=True)


def load_site_state(work: Path, rnd: int) -> dict[str, Any]:
    import torch

    path = site_state_file(work, rnd)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: this site kept no state for round {rnd}, which the resumed federation "
                                "starts after; rerun the stage from round 0 (fedxr run --restart-stage)")
    return torch.load(path, map_location="cpu", weights_only=False)


def prune_from(folder: Path, site_works: list[Path], start: int) -> None:
    """A run resuming at ``start`` drops what an earlier attempt kept for rounds from ``start`` on (a point or a
    site state of a round whose records are being cut): this run writes them again, and a later resume must not
    mix the two attempts'."""
    point = read_point(folder)
    if point is not None:
        kept = [e for e in point["points"] if isinstance(e.get("round"), int) and e["round"] < start]
        if kept != point["points"]:
            write_json_atomic(folder / POINT_FILE, {**point, "points": kept})
            names = {name for e in kept for name in (e.get("global"), e.get("best")) if name}
            for leftover in folder.glob("*_round*.pt"):
                if leftover.name not in names:
                    leftover.unlink(missing_ok=True)
    for work in site_works:
        for number, state in site_states(work):
            if number >= start:
                state.unlink(missing_ok=True)


def drop_site_states(work: Path) -> None:
    for old in Path(work).glob(SITE_STATE.format(round="*")):
        old.unlink(missing_ok=True)


def discard(folder: Path, site_works: list[Path]) -> None:
    """Throw a stage's resume state away (a fresh start, or a stage that finished)."""
    shutil.rmtree(folder, ignore_errors=True)
    for work in site_works:
        drop_site_states(work)
