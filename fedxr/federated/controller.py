"""NVFlare's FedAvg controller with a deadline for each site's round and a quorum for each round.

NVFlare's FedAvg sends each round's task without a deadline, and it notices a hospital that vanished
(a crashed machine, a cut network) only when the server's heartbeat timeout runs out: 600 s by default,
and a setting of the server's startup kit, not of the job. Until then every round waits. Here a round's
task carries ``federated.timeout_s`` as its deadline: a site that has not answered by then is left out of
that round's aggregate, as a site whose task failed is, and the federation goes on while
``federated.min_clients`` sites answer. A round that fewer answer stops the federation with a message
that says so, instead of averaging what came back (or nothing).

With ``resume_dir`` it also keeps a resume point after every round, and a job built with ``start_round`` > 0
starts from that point (fedxr.federated.resume): NVFlare 2.9's own job snapshots restore nothing for this
controller. In production (``resume_at_start``) the submitter cannot read the server's disk: ``resume_dir`` is then
a folder under the server's workspace (its startup kit folder) and the server itself chooses, when the job starts,
the round after its newest point of the same job (``job_digest``); a point whose rounds all finished is resumed
(to its final evaluation) only by a job the submitter sent again after a loss (``resume_finished``), a new
submission of the same job trains it anew.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.fedavg import FedAvg


#: The words that end the server's log line of a round without quorum (fedxr.federated.run looks for them).
QUORUM_LOST = "so the federation stops here"


#: How a production server's log says where it resumed its job (fedxr.federated.run reads it back).
RESUMING = "resuming from round"

#: The component id NVFlare's job API gives the best-model selector.
MODEL_SELECTOR = "model_selector"


class SiteDeadlineFedAvg(FedAvg):
    def __init__(self, *args, site_timeout_s: int = 0, quorum: int = 0, resume_dir: str = "", job_digest: str = "",
                 resume_at_start: bool = False, resume_finished: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.site_timeout_s = site_timeout_s
        self.quorum = quorum
        self.resume_dir = resume_dir
        self.job_digest = job_digest
        self.resume_at_start = resume_at_start
        self.resume_finished = resume_finished
        self._in_rounds = False

    def _selector(self):
        return self.engine.get_component(MODEL_SELECTOR) if self.engine else None

    def _best_file(self) -> Path | None:
        persistor = self.persistor
        if persistor is None or not hasattr(persistor, "best_global_model_file_name"):
            return None
        return Path(persistor.log_dir) / persistor.best_global_model_file_name

    def run(self) -> None:
        if self.resume_at_start:
            self._choose_start()
        if self.start_round > 0:
            self._resume()
        self._in_rounds = True
        super().run()
        self._in_rounds = False
        if self.resume_at_start:
            from fedxr.federated.resume import mark_finished

            # Every round done: a new submission of this job trains it anew; a resubmission after a loss during the
            # final evaluation still finds the last round's model.
            mark_finished(Path(self.resume_dir), self.job_digest, self.start_round + self.num_rounds - 1)

    def _choose_start(self) -> None:
        """Production: the round this job starts at, from the server's own resume point (the folder relative to
        the server's workspace root, the startup kit folder, which a restart keeps)."""
        from fedxr.federated.resume import discard, next_round, read_point

        folder = Path(self.resume_dir)
        if not folder.is_absolute():
            folder = Path(self.fl_ctx.get_workspace().get_root_dir()) / folder
        self.resume_dir = str(folder)
        planned: Any = self  # NVFlare's FedAvg sets these in its __init__ without types
        total = int(planned.start_round) + int(planned.num_rounds)
        start, why = next_round(folder, self.job_digest, total, [], finished_too=self.resume_finished)
        if start:
            self.info(f"{RESUMING} {start} of {total} ({why})")
            self.start_round, self.num_rounds = start, total - start
        else:
            self.info(f"starting from round 0 ({why}); resume point: {folder}")
            if read_point(folder) is not None:
                # A finished run's point, or another job's: a resubmission of this run after a loss in its first
                # round must not find it (it would take the finished run's model as this one's).
                discard(folder, [])

    def _resume(self) -> None:
        """Start from the point the interrupted run kept: its global model (as this controller held it — params,
        meta, metrics — so the sites receive exactly what they would have), the best-model selection's score and
        NVFlare's best model file."""
        from nvflare.app_common.abstract.model import make_model_learnable
        from nvflare.app_common.app_constant import AppConstants

        from fedxr.data.atomic import copy_file_atomic
        from fedxr.federated.resume import load_global

        folder = Path(self.resume_dir)
        entry, saved = load_global(folder, self.start_round - 1)
        if entry["job"] != self.job_digest:
            raise RuntimeError(f"{folder}: the resume point is job {entry['job']}'s, not this job's ({self.job_digest})")
        self.model = FLModel(params_type=ParamsType.FULL, params=saved["params"], meta=saved.get("meta") or {},
                             metrics=saved.get("metrics"))
        # What NVFlare's FedAvg keeps in the context after each round (the persistor saves it as the best model).
        self.fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(self.model.params, self.model.meta),
                             private=True, sticky=True)
        selector, selection = self._selector(), entry.get("selection") or {}
        if selector is not None and selection.get("best_val_metric") is not None:
            selector.best_val_metric = selection["best_val_metric"]
            selector.best_raw_val_metric = selection.get("best_raw_val_metric")
        best = self._best_file()
        if entry.get("best") and best is not None:
            copy_file_atomic(folder / entry["best"], best)
        # The persistor's last model is the resumed one (what a final evaluation scores if no round is left).
        super().save_model(self.model)
        self.info(f"resumed from round {entry['round']} of an interrupted run ({folder})")

    def save_model(self, model) -> None:
        super().save_model(model)
        if self.resume_dir and self._in_rounds:
            from fedxr.federated.resume import write_point

            selector = self._selector()
            best = getattr(selector, "best_val_metric", None)
            raw = getattr(selector, "best_raw_val_metric", None)
            selection = ({"best_val_metric": float(best), "best_raw_val_metric": None if raw is None else float(raw)}
                         if best is not None and best != float("-inf") else {})
            write_point(Path(self.resume_dir), self.job_digest, self.current_round,
                        {"params": model.params, "meta": model.meta, "metrics": model.metrics}, selection,
                        self._best_file())


    def send_model(self, *args, **kwargs):
        if self.site_timeout_s and not kwargs.get("timeout"):
            kwargs["timeout"] = self.site_timeout_s
        return super().send_model(*args, **kwargs)

    def _get_aggregated_result(self):
        if self.quorum and self._received_count < self.quorum:
            reason = (f"round {self.current_round}: {self._received_count} of {self._expected_count} sites answered "
                      f"(within federated.timeout_s = {self.site_timeout_s} s, or without an error); federated.min_clients "
                      f"is {self.quorum}, {QUORUM_LOST}; the sites' logs say why they did not answer")
            self.panic(reason)
            raise RuntimeError(reason)
        return super()._get_aggregated_result()


def with_site_deadline(controller: FedAvg, site_timeout_s: int, quorum: int, resume_dir: str = "",
                       job_digest: str = "", resume_at_start: bool = False,
                       resume_finished: bool = False) -> SiteDeadlineFedAvg:
    """The controller NVFlare's recipe built, as a :class:`SiteDeadlineFedAvg` with every argument it was built
    with (NVFlare writes a component into the job from its class and its attributes, so the recipe's own
    argument list need not be repeated here and stays NVFlare's)."""
    if type(controller) is not FedAvg:  # a subclass would silently lose its own behaviour
        raise TypeError(f"expected NVFlare's FedAvg controller, got {type(controller).__name__}")
    controller.__class__ = SiteDeadlineFedAvg
    controller.site_timeout_s = site_timeout_s
    controller.quorum = quorum
    controller.resume_dir = resume_dir
    controller.job_digest = job_digest
    controller.resume_at_start = resume_at_start
    controller.resume_finished = resume_finished
    controller._in_rounds = False
    return controller
