"""NVFlare client script: one hospital's side of a federated round. NVFlare runs it; users do not.

The client is generic: it builds its LightningModule from the model description the job carries
(``--model-b64``: ``{class_path, args}``, the same description the server builds the round-0 model
from), adds the recipe's training settings and this site's label balance, and trains whatever that is —
the teacher's classifier or a distillation student alike.

Per round: receive the global model, validate it on this site's validation split (that score is what
the server uses to pick the best global model), train locally for the recipe's epochs or steps, send
the weights back with the number of steps done (FedAvg weights sites by it). One Lightning Trainer
is reused across rounds via ``flare.patch``; the image cache is opened once.

Only weights and metrics leave the site. With ``--records DIR`` (simulation and POC on one machine)
the site also writes a JSON line per round (validation AUROC, timings, steps) for fedxr's round table.

With ``model.devices`` > 1 the site trains with Lightning DDP under torchrun (see fedxr.federated.ranks):
rank 0 talks to NVFlare and tells the other ranks what to do; each rank writes its own records.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import os
import time
from pathlib import Path

#: The epoch limit of a round limited by steps (never reached).
UNBOUNDED_EPOCHS = 1_000_000

#: Fault injection for resilience tests: ``site-3:2`` makes site-3 fail from round 2 on (0-based).
FAIL_ENV = "FEDXR_TEST_FAIL_SITE"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--recipe-b64", required=True, help="the resolved recipe, as shipped in the job")
    p.add_argument("--model-b64", required=True,
                   help="the model to train: {class_path, args} as base64 JSON (the server's round-0 model)")
    p.add_argument("--sites-dir", help="manifest folder (simulation); otherwise see fedxr.federated.site")
    p.add_argument("--records", help="folder for per-round JSON lines (simulation/POC)")
    p.add_argument("--threads", type=int, help="torch CPU threads for this site (sites sharing one machine)")
    p.add_argument("--save-updates", action="store_true",
                   help="with --records, also save the weights sent each round (audit/aggregation checks)")
    p.add_argument("--keep-excluded", action="store_true",
                   help="the job excludes some tensors from aggregation (FedBN statistics, a frozen "
                        "teacher): load the global model non-strictly and keep this site's copies of them")
    p.add_argument("--resume-round", type=int, default=0,
                   help="the federation resumes at this round: load this site's state kept after the round before "
                        "(fedxr.federated.resume)")
    p.add_argument("--keep-state",
                   help="production: keep this site's state after every round under this folder of the site's "
                        "workspace root (its startup kit folder), and resume from it when the job's first task is a "
                        "later round (the server chose to resume: fedxr.federated.resume)")
    p.add_argument("--job-digest", default="", help="with --keep-state: the job the kept states belong to")
    p.add_argument("--site-teachers",
                   help="distillation from a FedBN teacher: folder of each site's own teacher (SITE.ckpt); "
                        "this site's replaces the global teacher it received")
    return p.parse_args(argv)


def import_class(class_path: str) -> type:
    """``package.module.Class`` → the class (the model description's ``class_path``)."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def site_round_seed(seed: int, site: str, rnd: int | None) -> int:
    """A 32-bit seed from the recipe's training seed, the site's name and the round (stable across runs
    and machines: no Python hash randomisation)."""
    import zlib

    import numpy as np

    parts = [seed & 0xFFFFFFFF, zlib.crc32(site.encode()), (rnd if rnd is not None else -1) + 1]
    return int(np.random.SeedSequence(parts).generate_state(1)[0])


def _should_fail(site: str, current_round: int | None, rank: int = 0) -> bool:
    """``FEDXR_TEST_FAIL_SITE=SITE:ROUND`` fails every rank of SITE from ROUND on; ``SITE:ROUND@RANK`` only
    that rank (a crashed DDP worker); ``SITE:ROUND@agent`` kills the site's torchrun agent from rank 0."""
    spec = os.environ.get(FAIL_ENV, "")
    if not spec or current_round is None:
        return False
    spec, _, only = spec.partition("@")
    name, _, rnd = spec.partition(":")
    chosen = not only or (only == "agent" and rank == 0) or (only.isdigit() and int(only) == rank)
    return name == site and current_round >= int(rnd or 0) and chosen


def weights_digest(module) -> str:
    """SHA-256 of a module's weights (the records show that every DDP rank held the same model)."""
    from fedxr.models.checkpoint import state_dict_sha256

    return state_dict_sha256(module.state_dict())[:16]


def sample_counter():
    """A callback counting the training images this process saw (under DDP, its shard), so each rank's
    record shows that it trained. Built here because Lightning is imported only inside the client."""
    import lightning as L

    class SampleCounter(L.Callback):
        samples = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.samples += len(batch[0])

    return SampleCounter()


def round_steps(fed, train_images: int, batch_size: int) -> int | None:
    """Steps this site trains per round, or None for its whole local epochs.

    ``federated.local_steps`` fixes the steps of every site. ``federated.max_local_steps`` caps them: a site
    whose epochs hold more batches trains the cap, a smaller site its whole epochs. FedAvg weights each site by
    its steps, so without a cap the site with most of the images (the pediatric set: 126 of 157 steps) sets
    the average almost alone; with it, the large site still contributes the most steps of any site but no
    longer outweighs every other site together.
    """
    if fed.local_steps:
        return fed.local_steps
    epochs_steps = math.ceil(train_images / batch_size) * fed.local_epochs
    if fed.max_local_steps and epochs_steps > fed.max_local_steps:
        return fed.max_local_steps
    return None


def trainer_devices(recipe, ranks) -> dict:
    """Trainer settings for this site's processes: all of torchrun's workers under DDP, else one device
    (never ``auto``: Lightning would start DDP workers of its own behind NVFlare's back)."""
    from fedxr.devices import runs_ddp

    if ranks.distributed or runs_ddp(recipe.model.devices, recipe.model.strategy):
        strategy = "ddp" if recipe.model.strategy == "auto" else recipe.model.strategy
        return {"devices": ranks.world_size, "num_nodes": 1, "strategy": strategy}
    return {"devices": 1, "strategy": recipe.model.strategy}


def _site_data(recipe, ranks, site: str, sites_dir: str | None):
    """The site's data module (rank 0 builds the image cache once; the other ranks then open it) and the
    steps it trains per round (None: whole local epochs)."""
    from fedxr.federated.site import resolve_site_manifest
    from fedxr.training import make_datamodule

    dm = make_datamodule(recipe, [resolve_site_manifest(site, sites_dir)], progress=False)
    if ranks.is_control:
        dm.setup("fit")
    ranks.share(None)
    return dm, round_steps(recipe.federated, len(dm.split_patients("train")), dm.batch_size * ranks.world_size)


def _site_module(recipe, dm, model_b64: str, local_steps: int | None):
    """The module the job describes, with one learning-rate schedule over every round: NVFlare's patch restores
    the optimizer and scheduler state between rounds, and a schedule sized to one round would leave later
    rounds at zero rate. Built with random weights; the round-0 global model (for a student, with the frozen
    teacher's weights) overwrites them."""
    from fedxr.federated.codec import decode_json
    from fedxr.training import make_classifier

    fed = recipe.federated
    schedule = ({"schedule_steps": fed.rounds * local_steps, "epoch_steps": local_steps} if local_steps
                else {"schedule_epochs": fed.rounds * fed.local_epochs})
    described = decode_json(model_b64)
    return make_classifier(recipe, dm, cls=import_class(described["class_path"]), **described["args"], **schedule)


def _site_privacy(recipe, site: str, dm, module, local_steps: int | None):
    """With ``privacy.dp``: the site's DP accountant, Poisson sampling of its units, and Opacus on the module."""
    if not recipe.privacy.dp:
        return None
    import numpy as np

    from fedxr.privacy.dp import SitePrivacy, attach
    from fedxr.privacy.sampling import units_of

    dp, fed = recipe.privacy.dp, recipe.federated
    train_patients = dm.split_patients("train")
    # Every validation the server asks for releases one score: one per round, then the cross-site (every
    # site's model and the global ones) or final global evaluation.
    releases = fed.rounds + (recipe.data.sites + 2 if fed.cross_site_eval else 1)
    privacy = SitePrivacy.for_site(dp, site, len(dm.datasets["train"]), dm.batch_size, fed.rounds,
                                   fed.local_epochs, local_steps, train_patients=len(set(train_patients)),
                                   val_releases=releases)
    dm.dp_sampling = (units_of(train_patients, dp.unit), privacy.sample_rate)
    dm.dp_copies = dp.augmentations
    if dp.unit == "patient":
        val_patients = dm.split_patients("val")
        module.val_unit_images = int(np.unique(val_patients, return_counts=True)[1].max()) if len(val_patients) else 1
    attach(module, privacy)
    return privacy


def _site_trainer(recipe, work: Path, ranks, local_steps: int | None, counter):
    """One Trainer for every round. A round limited by steps gets an epoch limit it never reaches, not -1:
    NVFlare's Lightning patch re-reads max_steps as "steps per round" every round while max_epochs is -1, so the
    rounds doubled (32, 64, 128…)."""
    from nvflare.app_opt.lightning.loggers.client_logger import ClientLogger

    from fedxr.training import make_trainer

    per_round = ({"max_steps": local_steps, "max_epochs": UNBOUNDED_EPOCHS} if local_steps
                 else {"max_epochs": recipe.federated.local_epochs})
    return make_trainer(recipe, work, callbacks=[counter], progress=False, enable_model_summary=False,
                        logger=[ClientLogger()], num_sanity_val_steps=0, **trainer_devices(recipe, ranks), **per_round)


def _next_task(ranks) -> dict | None:
    """Rank 0 asks NVFlare for the next task; every rank then takes the same branch (None: the job is over)."""
    import nvflare.client.lightning as flare
    from nvflare.client import is_evaluate, is_submit_model

    task = None
    if ranks.is_control and flare.is_running():
        input_model = flare.receive()
        if input_model is not None:
            # Read the task kind now: the patched trainer clears it once it has answered a validate task.
            task = {"round": input_model.current_round, "evaluate": is_evaluate(), "submit": is_submit_model()}
    return ranks.share(task)


def _fail_as_injected(site: str, rnd: int, ranks) -> None:
    if os.environ.get(FAIL_ENV, "").endswith("@agent") and ranks.is_control:
        # A crashed torchrun agent, its workers otherwise alive (rank 0 waits here, the others in their
        # next collective): they must go with the agent (fedxr.federated.ranks.die_with_parent).
        os.kill(os.getppid(), 9)
        time.sleep(600)
    raise RuntimeError(f"{site}: injected failure at round {rnd} on rank {ranks.rank} ({FAIL_ENV})")


def main(argv=None) -> None:
    import lightning as L
    import nvflare.client.lightning as flare
    from nvflare.app_common.abstract.fl_model import FLModel
    from nvflare.client import send

    from fedxr.federated.codec import decode_recipe
    from fedxr.federated.fedbn import batchnorm_of, keep_personal
    from fedxr.federated.job import job_deadline_s
    from fedxr.federated.ranks import SiteRanks
    from fedxr.records import append_line, record_file

    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    recipe = decode_recipe(args.recipe_b64)
    ranks = SiteRanks.start(recipe.model.accelerator, wait_s=job_deadline_s(recipe))
    flare.init(rank=str(ranks.rank))
    # Only rank 0 has an NVFlare session; the others learn the site's name from it.
    site = ranks.share(flare.get_site_name() if ranks.is_control else None)
    # Each DDP rank draws its own augmentation (rank 0 keeps the single-process seeds: same results as before).
    rank_name = site if ranks.is_control else f"{site}#rank{ranks.rank}"
    L.seed_everything(site_round_seed(recipe.model.seed, rank_name, -1), workers=True, verbose=False)
    work = Path(args.records or ".") / site
    work.mkdir(parents=True, exist_ok=True)
    dm, local_steps = _site_data(recipe, ranks, site, args.sites_dir)
    module = _site_module(recipe, dm, args.model_b64, local_steps)
    privacy = _site_privacy(recipe, site, dm, module, local_steps)
    counter = sample_counter()
    trainer = _site_trainer(recipe, work, ranks, local_steps, counter)
    flare.patch(trainer, load_state_dict_strict=not args.keep_excluded)
    local_state = None
    if (teacher_state := _site_teacher(args.site_teachers, site)) is not None:
        module.teacher.load_state_dict(teacher_state)
        # Every model NVFlare loads into the module keeps this site's teacher (the job sends the global one).
        module.keep_on_load = {f"teacher.{k}": v for k, v in teacher_state.items()}
    kept_always = module.keep_on_load
    fedbn_on = recipe.federated.fedbn
    records = Path(args.records) / record_file(site, ranks.rank) if args.records else None
    restore = _restore_state_callback(trainer)
    if args.resume_round > 0:
        local_state = _resume_site(work, args.resume_round - 1, module, restore, trainer)
    from fedxr.federated.resume import resumable

    # Where this site keeps its state after every round for a resumed run: its records folder (sim and POC), or in
    # production a folder under its workspace root, whose first task says whether the server resumed.
    state_work = _production_state_folder(args.keep_state, site) if args.keep_state else work
    first_task = args.keep_state is not None
    # Kept after every round (not for the jobs that cannot resume, DP among them).
    keeps_state = (records is not None or args.keep_state is not None) and resumable(recipe) is None and ranks.is_control
    while (task := _next_task(ranks)) is not None:
        rnd = task["round"]
        if first_task:
            first_task = False
            local_state = _resume_at_first_task(state_work, task, args.job_digest, module, restore, trainer)
        if task["submit"]:
            # Cross-site evaluation asks for this site's own last local model.
            if ranks.is_control:
                send(FLModel(params=local_state or module.cpu().state_dict()))
            continue
        if not task["evaluate"] and _should_fail(site, rnd, ranks.rank):
            _fail_as_injected(site, rnd, ranks)
        # Every round starts from a seed of its own (recipe seed, site, round): data order and
        # augmentation do not depend on what ran before in this process.
        L.seed_everything(site_round_seed(recipe.model.seed, rank_name, rnd), workers=True, verbose=False)
        t0 = time.time()
        if fedbn_on and task["evaluate"]:
            # The final evaluation sends the whole global model, BatchNorm included (untrained): the site scores its
            # own model — the final shared layers with its BatchNorm — and reports that.
            module.keep_on_load = {**(kept_always or {}), **batchnorm_of(module)}
        result = trainer.validate(module, datamodule=dm, verbose=False)
        module.keep_on_load = kept_always
        t1 = time.time()
        if fedbn_on and (task["evaluate"] or rnd > 0) and ranks.is_control:
            # From round 1 on: round 0's model is the server's starting point, with no BatchNorm of this site's.
            keep_personal(work, module, rnd if not task["evaluate"] else "final", _val_auroc(result),
                                len(dm.datasets["train"]))
        received = weights_digest(module) if records is not None else None
        if task["evaluate"]:
            continue  # the patched trainer already sent the metrics
        steps_before, samples_before = trainer.global_step, counter.samples
        if privacy is not None:  # refuses a round past the site's ε target, before it touches an image
            privacy.start_round(site, rnd, privacy.planned_steps // recipe.federated.rounds)
        trainer.fit(module, datamodule=dm)
        t2 = time.time()
        spent = privacy.end_round(rnd) if privacy is not None else None
        local_state = copy.deepcopy(module.cpu().state_dict())
        if records is not None and args.save_updates and ranks.is_control:
            import torch

            torch.save({"state_dict": local_state, "steps": trainer.global_step - steps_before},
                       Path(args.records) / f"{site}_round{rnd}.pt")
        if records is not None:
            rec = _round_record(site, rnd, result, dm, trainer, ranks, module, counter, steps_before, samples_before,
                                (t0, t1, t2), received, recipe)
            if privacy is not None and spent is not None:
                rec["privacy"] = {**spent, **privacy.summary()}
            if hasattr(module, "teacher"):
                rec["teacher_digest"] = weights_digest(module.teacher)
            append_line(records, rec)
        if keeps_state:  # after the round's record: a state kept means its record is there too
            from fedxr.federated.resume import save_site_state

            save_site_state(state_work, rnd, {"round": rnd, "job": args.job_digest, "module": local_state,
                                              **_restore_lists(restore), "trainer": _trainer_counters(trainer)})
    ranks.finish()


#: What NVFlare's RestoreState callback carries from one round's fit to the next.
RESTORED = ("optimizer_states", "scaler_states", "lr_scheduler_states")


def _restore_state_callback(trainer):
    """NVFlare's callback that carries the optimizer, scaler and schedule across rounds (``flare.patch`` adds it)."""
    from nvflare.app_opt.lightning.callbacks import RestoreState

    found = [cb for cb in trainer.callbacks if isinstance(cb, RestoreState)]
    if len(found) != 1:
        raise RuntimeError(f"expected NVFlare's RestoreState callback once in the trainer, found {len(found)}")
    return found[0]


def _restore_lists(restore) -> dict:
    return {name: getattr(restore, name) for name in RESTORED}


#: NVFlare's Lightning callback's round bookkeeping (it sets each round's epoch or step limit from them).
FL_CALLBACK_COUNTERS = ("max_epochs_per_round", "max_steps_per_round", "total_local_epochs", "total_local_steps")


def _fl_callback(trainer):
    from nvflare.app_opt.lightning.api import FLCallback

    return next(cb for cb in trainer.callbacks if isinstance(cb, FLCallback))


def _trainer_counters(trainer) -> dict:
    """Where the reused Trainer stands after a round: its loops' progress (epochs and steps done, which decide how
    the next fit draws its data order: Lightning draws a fresh shuffle at the start of every epoch after the
    first) and the limits NVFlare's patch set for the next round."""
    callback = _fl_callback(trainer)
    return {"fit_loop": trainer.fit_loop.state_dict(), "max_epochs": trainer.fit_loop.max_epochs,
            "max_steps": trainer.fit_loop.epoch_loop.max_steps,
            "fl_callback": {name: getattr(callback, name) for name in FL_CALLBACK_COUNTERS}}


def _set_trainer_counters(trainer, saved: dict) -> None:
    from lightning.pytorch.loops.loop import _Loop

    trainer.fit_loop.load_state_dict(saved["fit_loop"])

    def continuing(loop) -> None:
        # The next round continues the rounds as the reused Trainer would, not as Lightning's restart from a
        # checkpoint (which skips the fresh shuffle that starts an epoch): clear what load_state_dict marked.
        loop.on_iteration_done()
        for child in vars(loop).values():
            if isinstance(child, _Loop):
                continuing(child)

    continuing(trainer.fit_loop)
    trainer.fit_loop.max_epochs = saved["max_epochs"]
    trainer.fit_loop.epoch_loop.max_steps = saved["max_steps"]
    callback = _fl_callback(trainer)
    for name, value in saved["fl_callback"].items():
        setattr(callback, name, value)


def _production_state_folder(relative: str, site: str) -> Path:
    """``relative`` under this site's workspace root (its startup kit folder): NVFlare starts the trainer in the
    job's app folder, ``ROOT/JOB_ID/app_SITE``, which a resubmitted job does not share."""
    app = Path.cwd()
    if app.name != f"app_{site}":
        raise RuntimeError(f"--keep-state: expected to run in NVFlare's app folder app_{site}, not {app}")
    return app.parent.parent / relative / site


def _resume_at_first_task(work: Path, task: dict, digest: str, module, restore, trainer) -> dict | None:
    """Production: the server chose the round this job starts at, and its first task says which. A training task of
    round 0: states an earlier run of the job left are thrown away. A later round: this site continues from the state
    it kept after the round before (of the same job). A site that kept none for that round (it was left out of it, or
    joins late) continues from the global model with a fresh optimizer, and says so — taking its own tensors (FedBN
    BatchNorm, a distillation teacher) from the newest state of this job it did keep. It fails the task rather than
    send untrained weights when it has none at all and is asked for its own model (cross-site scoring) or would
    distil from a teacher that only round 0's model carried. Returns the model state to submit for scoring."""
    from fedxr.federated.resume import drop_site_states, load_site_state, site_states

    training = not (task["evaluate"] or task["submit"])
    if training and not task["round"]:
        drop_site_states(work)
        return None
    kept_rounds = sorted((number for number, _ in site_states(work)), reverse=True)
    # Asked to evaluate or submit first: every round was done before, so the state after the newest one kept.
    rnd = task["round"] if training else (kept_rounds[0] + 1 if kept_rounds else None)
    kept, kept_round = None, None
    for number in (n for n in kept_rounds if rnd is None or n < rnd):
        try:
            state = load_site_state(work, number)
        except Exception as exc:  # noqa: BLE001 - a damaged state is passed over, and said
            print(f"could not read this site's state of round {number} in {work} ({exc})", flush=True)
            continue
        if state.get("job") == digest:
            kept, kept_round = state, number
            break
    if rnd is not None and kept_round == rnd - 1:
        return _resume_site(work, rnd - 1, module, restore, trainer, kept)
    # The global teacher travels only in round 0's model (the job excludes it from aggregation after that).
    needs_teacher = training and hasattr(module, "teacher") and not getattr(module, "keep_on_load", None)
    if kept is None and (task["submit"] or needs_teacher):
        raise RuntimeError(f"the federation resumes after round 0, and this site kept no state of this job in {work}: "
                           "it has no " + ("model of its own to submit" if task["submit"] else "trained teacher")
                           + "; it rejoins when the stage is run again (fedxr run / fedxr federate --restart-stage)")
    print(f"the federation resumes after round 0, and this site kept no state of the round before in {work}: it "
          "continues from the global model with a fresh optimizer"
          + (f", its own tensors (e.g. FedBN BatchNorm) from round {kept_round}" if kept is not None else
             " (its own tensors, e.g. FedBN BatchNorm, as initialised)"), flush=True)
    if kept is None:
        return None
    module.load_state_dict(kept["module"])  # the global layers are replaced by the model it receives next
    return kept["module"]


def _resume_site(work: Path, rnd: int, module, restore, trainer, state: dict | None = None) -> dict:
    """This site as it was after round ``rnd`` of the interrupted run: its trained model (its own BatchNorm under
    FedBN; the global layers are replaced by the global model it receives next), the optimizer, scaler and
    schedule states the next fit restores, and the Trainer's counters. Returns the model state (what the site
    submits for cross-site scoring)."""
    from fedxr.federated.resume import load_site_state

    state = state if state is not None else load_site_state(work, rnd)
    module.load_state_dict(state["module"])
    for name in RESTORED:
        setattr(restore, name, state[name])
    _set_trainer_counters(trainer, state["trainer"])
    print(f"resumed this site's state after round {rnd} ({work})", flush=True)
    return state["module"]


def _val_auroc(result) -> float | None:
    from fedxr.labels import VAL_AUROC

    return float(result[0].get(VAL_AUROC, float("nan"))) if result else None


def _site_teacher(folder: str | None, site: str) -> dict | None:
    """This site's own teacher weights (a FedBN teacher's site model), or None to keep the global one."""
    if not folder:
        return None
    path = Path(folder) / f"{site}.ckpt"
    if not path.is_file():
        print(f"{site}: no site teacher at {path}; distilling from the global teacher", flush=True)
        return None
    from fedxr.models.checkpoint import load_checkpoint

    return load_checkpoint(path)["state_dict"]


def _round_record(site: str, rnd: int, result, dm, trainer, ranks, module, counter, steps_before: int,
                  samples_before: int, times: tuple[float, float, float], received: str | None, recipe) -> dict:
    """One line of the site's round records: the received model's validation score, what was trained, timings,
    which rank, digests of the weights received and trained, the learning rate and precision."""
    from fedxr.precision import recipe_precision

    t0, t1, t2 = times
    return {"site": site, "round": rnd, "val_auroc": _val_auroc(result),
            "val_images": len(dm.datasets["val"]), "train_images": len(dm.datasets["train"]),
            "steps": trainer.global_step - steps_before, "t_receive": t0, "t_validated": t1, "t_trained": t2,
            "validate_s": t1 - t0, "train_s": t2 - t1,
            "rank": ranks.rank, "world_size": ranks.world_size, "samples": counter.samples - samples_before,
            "received_digest": received, "trained_digest": weights_digest(module),
            "lr_end": float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else None,
            "precision": str(trainer.precision), "precision_why": recipe_precision(recipe)[1]}


if __name__ == "__main__":
    main()
