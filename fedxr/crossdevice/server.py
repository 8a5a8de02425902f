"""The server's side of the edge federation: NVFlare's FedBuff model manager, keeping what it did.

NVFlare's edge recipe never saves a global model (its persistor saves only on a "best model" event the edge
workflow never fires) and keeps no account of the updates it folds in. This manager is NVFlare's
``BuffModelManager`` with both: every model version is written as it is made, with a record of the device
updates that arrived since the previous version — devices heard from, trained, dropped (an empty update),
stale (trained on an older version than the current one) and ignored (older than ``max_model_history``) — and
no late update is thrown away unused (see :meth:`RecordingModelManager.prune_model_versions`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Dict, Set

import numpy as np
import torch

from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.edge.assessors.buff_model_manager import BuffModelManager
from nvflare.edge.mud import ModelUpdate

from fedxr.crossdevice.network import to_checkpoint_names

VERSIONS_FILE = "versions.jsonl"
VERSIONS_DIR = "versions"


def version_file(out_dir: str | os.PathLike, version: int) -> str:
    return os.path.join(out_dir, VERSIONS_DIR, f"v{version:04d}.pt")


class RecordingModelManager(BuffModelManager):
    def __init__(self, num_updates_for_model: int, max_model_history: int | None = None, global_lr: float = 1.0,
                 staleness_weight: bool = False, out_dir: str = ""):
        super().__init__(num_updates_for_model=num_updates_for_model, max_model_history=max_model_history,
                         global_lr=global_lr, staleness_weight=staleness_weight)
        self.out_dir = out_dir
        self._tally = self._empty_tally()
        self._started = time.time()

    @staticmethod
    def _empty_tally() -> dict:
        return {"devices": 0, "trained": 0, "dropped": 0, "stale": 0, "ignored_too_old": 0, "staleness": []}

    def process_updates(self, model_updates: Dict[int, ModelUpdate], fl_ctx: FLContext) -> bool:
        for version, update in model_updates.items():
            if version <= 0 or not update:
                continue
            devices = len(update.devices)
            # Read before NVFlare's aggregator takes the update over (it converts the lists in place).
            trained = int(from_shareable(update.update).data.get("count", 1))
            age = self.current_model_version - version
            t = self._tally
            if self.max_model_history and age >= self.max_model_history:
                t["ignored_too_old"] += devices  # NVFlare turns these away: they make no version and count nowhere
                continue
            t["devices"] += devices
            t["trained"] += trained
            t["dropped"] += devices - trained
            t["staleness"] += [age] * trained
            if age >= 1:
                t["stale"] += trained
        return super().process_updates(model_updates, fl_ctx)

    def prune_model_versions(self, versions_to_keep: Set[int], fl_ctx: FLContext) -> None:
        # NVFlare drops a version's state as soon as no selected device holds that version — which is the moment
        # its last (late) device reports, so that device's update, accepted a moment before, was thrown away
        # unused (seen in the simulator: "processed child update V1 with 2 devices", then "removed model version
        # 1", and version 3 made from 2 of 4 updates). A version whose updates wait to be folded in is kept until
        # the next version is made; only max_model_history still turns updates away.
        waiting = {v for v, state in self.updates.items() if state.aggregator.count > 0}
        super().prune_model_versions(set(versions_to_keep) | waiting, fl_ctx)

    def generate_new_model(self, fl_ctx: FLContext) -> None:
        if self.current_model_version >= 1 and not any(state.aggregator.count > 0 for state in self.updates.values()):
            # Every update since the last version was a dropped device's empty one: NVFlare would make a version
            # with no weights at all (its average of nothing is an empty dict), and every device handed it fails.
            # Make none; the dropped updates stay in the tally of the next version that is made.
            self.num_updates_counter = 0
            for state in self.updates.values():
                state.aggregator.reset(fl_ctx)
            self.log_info(fl_ctx, "no trained update since the last version (all dropped): no new version")
            return
        super().generate_new_model(fl_ctx)
        # NVFlare keeps the version as Python lists (for a phone's JSON); the simulated devices take arrays, which
        # every dispatch serialises at a fraction of the cost.
        made = self.current_model  # type: ignore[has-type]  # (NVFlare's attribute, untyped)
        self.current_model = DXO(data_kind=made.data_kind,
                                 data={k: np.asarray(v, dtype=np.float32) for k, v in made.data.items()})
        if not self.out_dir:
            return
        from fedxr.data.atomic import save_torch_atomic
        from fedxr.records import append_line

        version = self.current_model_version
        weights = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in self.current_model.data.items()}
        save_torch_atomic(version_file(self.out_dir, version), to_checkpoint_names(weights))
        tally, self._tally = self._tally, self._empty_tally()
        ages = tally.pop("staleness")
        record = {"version": version, "seconds": round(time.time() - self._started, 2), **tally,
                  "mean_staleness": float(np.mean(ages)) if ages else None,
                  "max_staleness": int(max(ages)) if ages else None}
        append_line(Path(self.out_dir) / VERSIONS_FILE, record)
