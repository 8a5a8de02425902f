"""One simulated point-of-care device: NVFlare's ``DeviceTaskProcessor`` for fedxr's student.

A device receives the current model version, trains the student a few local steps on its own films with plain
PyTorch on CPU (no Lightning: a phone has none) and sends back the difference to the version it received — for
every tensor of the state dict, BatchNorm statistics included (NVFlare's FedBuff drops a tensor no update
carries). Its behaviour for a task is drawn from (seed, device, version), so a rerun asks the same devices to
drop out and to straggle:

* **dropped** (share ``dropout``): the device goes away mid-task. NVFlare keeps a device that never answers in
  its selection for ever (a synchronous job then stalls), so a dropped device answers with an empty update
  (``count`` 0): it frees its slot and adds nothing to the average;
* **straggler** (share ``stragglers``): it trains, then answers ``straggler_delay_s`` later — by then the
  server may have made newer versions, and the update arrives stale.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from nvflare.apis.dxo import DXO, DataKind, from_dict
from nvflare.edge.simulation.device_task_processor import DeviceTaskProcessor

from fedxr.crossdevice.network import EdgeStudent, to_checkpoint_names
from fedxr.crossdevice.population import Population
from fedxr.records import append_line

TASK_LOG = "device_tasks.jsonl"
#: Every message a device sent, described (no values): the edge counterpart of a site's records/outgoing audit.
OUTGOING_LOG = "device_outgoing.jsonl"
DROPPED, STRAGGLER, TRAINED = "dropped", "straggler", "trained"
#: A DP device that has sent all the updates its privacy budget allows answers like a dropped one.
BUDGET_SPENT = "budget_spent"


def device_index(device_id: str) -> int:
    """NVFlare's simulated device ids are ``<uuid>#<index>``."""
    return int(device_id.rsplit("#", 1)[-1])


def behaviour(seed: int, device: int, version: int, dropout: float, stragglers: float) -> str:
    u = np.random.default_rng([seed, device, version]).random(2)
    if u[0] < dropout:
        return DROPPED
    return STRAGGLER if u[1] < stragglers else TRAINED


def train_on_device(net: torch.nn.Module, images: np.ndarray, labels: np.ndarray, mean: float, std: float,
                    lr: float, momentum: float, epochs: int, batch_size: int, generator: torch.Generator) -> int:
    """Local SGD on one device's films (augmented as every fedxr training is); returns the steps taken. The order
    of the films is drawn from ``generator``; the augmentation from torch's global generator, shared by the
    simulator's device threads — so a device's training is not reproducible, as on a real device."""
    from fedxr.data.augment import augment_batch
    from fedxr.models.loss import masked_bce_with_logits

    x_all, y_all = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=lr, momentum=momentum)
    net.train()
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            if len(batch) < 2:  # BatchNorm in training mode needs two images
                continue
            loss = masked_bce_with_logits(net(augment_batch(x_all[batch], mean, std)), y_all[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    return steps


class StudentDevice(DeviceTaskProcessor):
    """Deep-copied once per simulated device (keep it small: settings only, the films stay in the cache)."""

    def __init__(self, population: str, model_name: str, mean: float, std: float, norm: str = "batch",
                 lr: float = 0.01, momentum: float = 0.0, local_epochs: int = 1, batch_size: int = 16,
                 dropout: float = 0.0, stragglers: float = 0.0, straggler_delay_s: float = 0.0, seed: int = 0,
                 log_dir: str = "", dp_clip: float = 0.0, dp_std: float = 0.0, dp_max_updates: int = 0,
                 executorch_program: str = ""):
        super().__init__()
        self.population, self.model_name, self.norm, self.mean, self.std = population, model_name, norm, mean, std
        self.lr, self.momentum, self.local_epochs, self.batch_size = lr, momentum, local_epochs, batch_size
        self.dropout, self.stragglers, self.straggler_delay_s = dropout, stragglers, straggler_delay_s
        self.seed, self.log_dir = seed, log_dir
        # Differential privacy (fedxr.crossdevice.privacy), off when dp_clip is 0; this device's updates sent so far
        # (NVFlare's simulator keeps one copy of this processor per device for the whole run).
        self.dp_clip, self.dp_std, self.dp_max_updates = dp_clip, dp_std, dp_max_updates
        self.dp_sent = 0
        # On-device training (edge_federation.runtime: executorch): the student's ExecuTorch training program, a
        # file the server exported once; every task loads it, as a phone would, and trains with ExecuTorch.
        self.executorch_program = executorch_program

    def setup(self, job) -> None:
        # Devices train in threads of one simulator process: one intra-op thread each, or they fight for cores.
        torch.set_num_threads(1)

    def shutdown(self) -> None:
        pass

    def process_task(self, task) -> dict:
        started = time.time()
        received = from_dict(task.task_data)
        version = int(received.get_meta_prop("model_version"))
        device = device_index(self.device.device_id)
        weights = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in received.data.items()}
        what = behaviour(self.seed, device, version, self.dropout, self.stragglers)
        if self.dp_clip and what != DROPPED and self.dp_sent >= self.dp_max_updates:
            what = BUDGET_SPENT  # one more update would spend more than the device's epsilon
        record = {"device": device, "version": version, "behaviour": what, "films": 0, "steps": 0}
        if what in (DROPPED, BUDGET_SPENT):
            diff = {k: np.zeros(v.shape, dtype=np.float32) for k, v in weights.items()}
            count = 0
        else:
            population = Population.read(self.population)
            images, labels = population.films_of(device % population.devices)
            net = EdgeStudent(self.model_name, norm=self.norm)
            net.load_state_dict(weights)
            generator = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, device, version, 1])
                                                          .integers(2**62)))
            if self.executorch_program:
                from fedxr.crossdevice.ondevice import train_with_executorch

                steps, trained = train_with_executorch(
                    Path(self.executorch_program).read_bytes(), to_checkpoint_names(weights), images, labels,
                    self.mean, self.std, self.lr, self.momentum, self.local_epochs, self.batch_size, generator)
                # Parameters only (a GroupNorm student has no buffers; any would stay as received).
                unexpected = net.net.load_state_dict(trained, strict=False).unexpected_keys
                assert not unexpected, f"ExecuTorch returned tensors the student has not: {unexpected[:5]}"
            else:
                steps = train_on_device(net, images, labels, self.mean, self.std, self.lr, self.momentum,
                                        self.local_epochs, self.batch_size, generator)
            diff = {k: (v.detach().float() - weights[k]).numpy() for k, v in net.state_dict().items()}
            # With PyTorch a device with one film takes no step (BatchNorm needs two) and adds nothing; with ExecuTorch
            # its batch is that film repeated.
            count = int(steps > 0)
            if self.dp_clip and count:
                from fedxr.crossdevice.privacy import privatise
                from fedxr.privacy.dp import unpredictable_generator

                buffers = {name for name, _ in net.named_buffers()}
                diff, norm = privatise(diff, buffers, self.dp_clip, self.dp_std, unpredictable_generator())
                self.dp_sent += 1
                record.update(norm=round(norm, 6), clipped=norm > self.dp_clip, dp_updates=self.dp_sent)
            record.update(films=len(images), steps=steps)
            if what == STRAGGLER:
                time.sleep(self.straggler_delay_s)
        record["seconds"] = round(time.time() - started, 3)
        # float32 arrays, not the lists a phone's JSON would carry: in the simulator's one process a 0.7 M-value
        # update as Python lists costs ~1 s to make and more to serialise, and the device threads wait on the GIL
        # for it (NVFlare's aggregator takes either).
        message = DXO(data_kind=DataKind.WEIGHT_DIFF,
                      data={"dict": {k: np.asarray(v, dtype=np.float32) for k, v in diff.items()}, "count": count}
                      ).to_dict()
        if self.log_dir:
            # fedxr's record lines (with digests, read back checked); one write per line lands whole from any thread.
            append_line(Path(self.log_dir) / TASK_LOG, record)
            append_line(Path(self.log_dir) / OUTGOING_LOG,
                        {"device": device, "version": version, **describe_message(message)})
        return message


def describe_message(message: dict) -> dict:
    """What a device sends, described as a site's outgoing audit describes its messages (fedxr.privacy.audit): the
    payload kind, every tensor's name, shape and bytes (as float32), and every other value with its key."""
    from fedxr.privacy.audit import _plain

    data = message.get("data") or {}
    tensors = {name: {"shape": list(np.shape(value)), "dtype": "float32", "bytes": int(np.size(value)) * 4}
               for name, value in (data.get("dict") or {}).items()}
    values = {k: _plain(v) for k, v in data.items() if k != "dict"}
    return {"kind": message.get("kind"), "tensors": tensors, "values": values, "meta": _plain(message.get("meta") or {}),
            "other_keys": sorted(k for k in message if k not in ("kind", "data", "meta")),
            "bytes": sum(t["bytes"] for t in tensors.values())}
