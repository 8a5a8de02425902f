"""On-device training with ExecuTorch: the student's training step exported for phones and boards, and checked.

NVFlare's ExecuTorch path (``ETFedBuffRecipe``) ships a device an ExecuTorch program holding the model's forward
*and* backward pass; the device's runtime (ExecuTorch's training library on Android, iOS or Linux) runs it and
takes an SGD step. fedxr's step is the student's masked multi-label BCE (unknown labels left out), not NVFlare's
single-label cross-entropy. :func:`step_parity` checks that one ExecuTorch step on a batch updates the weights as
PyTorch's does.

Limits of ExecuTorch 1.5.1 (the version on the package index), both refused here with the reason:

* BatchNorm in training mode does not export (``_native_batch_norm_legit_functional`` is not core ATen): a
  student trained on devices uses GroupNorm (``norm="group"``, as differential privacy does);
* its max-pool backward kernel does not clear its output (pytorch/executorch#21686, fixed after 1.5.1), so every
  Conv → MaxPool graph — ResNet's stem — gets corrupted gradients: the same batch twice gives different ones.

ExecuTorch is not a fedxr dependency (its package requires coremltools, torchao and more); install it with
``pip install --no-deps executorch==1.5.1 ruamel.yaml tabulate`` (``make test`` does).
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from fedxr.errors import FedxrError
from fedxr.models.loss import masked_bce_with_logits  # the one loss every fedxr training uses

INSTALL = "pip install --no-deps executorch==1.5.1 ruamel.yaml tabulate"
#: The last ExecuTorch release without the max-pool backward fix (pytorch/executorch PR #21878, merged 2026-08-16).
#: Only max-pool *modules* are found (a functional F.max_pool2d in a forward is not).
MAXPOOL_FIXED_AFTER = (1, 5, 1)


class TrainingStep(nn.Module):
    """What the device runs: the student's logits and its masked BCE (NaN label = unknown, left out)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(x)
        return masked_bce_with_logits(logits, y), logits.detach()


def executorch_version() -> tuple[int, ...] | None:
    try:
        from importlib.metadata import version

        return tuple(int(p) for p in version("executorch").split("+")[0].split(".")[:3])
    except Exception:
        return None


def check_trainable_on_device(net: nn.Module, name: str) -> None:
    """A clear error for a network ExecuTorch 1.5.1 cannot train correctly (see the module docstring)."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        raise FedxrError(f"{name}: BatchNorm cannot be trained by ExecuTorch (its training-mode op does not export); "
                         "build the student with GroupNorm (norm='group') for on-device training")
    found = executorch_version()
    if any(isinstance(m, nn.MaxPool2d) for m in net.modules()) and (found is None or found <= MAXPOOL_FIXED_AFTER):
        raise FedxrError(f"{name}: its max-pool layer would get corrupted gradients from ExecuTorch "
                         f"{'.'.join(map(str, found or ()))} (pytorch/executorch#21686, fixed after 1.5.1); "
                         "train a student without max-pooling on devices, or a later ExecuTorch")


def export_training_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> bytes:
    """The ExecuTorch program (.pte bytes) of one training step of ``net`` at the shapes of ``x`` and ``y``."""
    try:
        from executorch.exir import to_edge
    except ImportError:
        raise FedxrError(f"on-device training needs ExecuTorch: {INSTALL}") from None
    from torch.export import export
    from torch.export.experimental import _export_forward_backward

    program = _export_forward_backward(export(TrainingStep(net), (x, y), strict=True))
    return to_edge(program).to_executorch().buffer


def executorch_sgd_step(program: bytes, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[float, dict]:
    """One step as a device takes it: ExecuTorch's forward-backward and its SGD optimizer. Returns the loss and the
    updated parameters (names as in the network, without the step's ``net.`` prefix)."""
    from executorch.extension.training import _load_for_executorch_for_training_from_buffer, get_sgd_optimizer

    module = _load_for_executorch_for_training_from_buffer(program)
    loss, _ = module.forward_backward("forward", (x, y))
    # Keywords, not positions: NVFlare's ETTaskProcessor passes weight_decay where the binding reads dampening.
    optimizer = get_sgd_optimizer(module.named_parameters(), lr=lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                                  nesterov=False)
    optimizer.step(module.named_gradients())
    return float(loss), {k.removeprefix("net."): v.detach().clone() for k, v in module.named_parameters().items()}


def torch_sgd_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[float, dict]:
    step = TrainingStep(net)
    loss, _ = step(x, y)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach()), {k: v.detach().clone() for k, v in net.named_parameters()}


def step_parity(model_name: str, size: int = 32, batch: int = 4, lr: float = 0.1, seed: int = 0) -> dict:
    """One SGD step on a random batch (an unknown label included) by ExecuTorch and by PyTorch from the same
    weights: the largest parameter difference, the losses, and the largest parameter change (for scale)."""
    import copy

    from fedxr.labels import NUM_LABELS
    from fedxr.models.registry import build_model

    torch.manual_seed(seed)
    net = build_model(model_name, norm="group")
    check_trainable_on_device(net, model_name)
    net.train()
    x = torch.randn(batch, 1, size, size)
    y = torch.rand(batch, NUM_LABELS).round()
    y[0, :3] = float("nan")
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    program = export_training_step(copy.deepcopy(net), x, y)
    et_loss, et_params = executorch_sgd_step(program, x, y, lr)
    pt_loss, pt_params = torch_sgd_step(net, x, y, lr)
    if set(et_params) != set(pt_params):
        raise FedxrError(f"{model_name}: ExecuTorch's parameters {sorted(set(et_params) ^ set(pt_params))} differ "
                         "from PyTorch's")
    return {"model": model_name, "size": size, "batch": batch, "lr": lr, "program_bytes": len(program),
            "loss_executorch": et_loss, "loss_torch": pt_loss,
            "max_abs_param_diff": max(float((et_params[k] - pt_params[k]).abs().max()) for k in pt_params),
            "max_abs_param_change": max(float((pt_params[k] - before[k]).abs().max()) for k in pt_params),
            "executorch": ".".join(map(str, executorch_version() or ()))}


_first_pass = threading.Lock()
_first_pass_done = threading.Event()


def load_training_program(program: bytes):
    """An ExecuTorch training module from a program's bytes (each device task loads its own: not shared by threads)."""
    try:
        from executorch.extension.training import _load_for_executorch_for_training_from_buffer
    except ImportError:
        raise FedxrError(f"on-device training needs ExecuTorch: {INSTALL}") from None
    return _load_for_executorch_for_training_from_buffer(program)


def train_with_executorch(program: bytes, weights: dict[str, torch.Tensor], images, labels, mean: float, std: float,
                          lr: float, momentum: float, epochs: int, batch_size: int,
                          generator: torch.Generator) -> tuple[int, dict[str, torch.Tensor]]:
    """A device's local training as a phone or board runs it: the student's ExecuTorch training program (exported
    once, for ``batch_size`` images, by :func:`export_training_step`) and ExecuTorch's SGD, from ``weights``.

    The same films in the same order with the same augmentation as :func:`fedxr.crossdevice.device.train_on_device`
    (the order from ``generator``, augmentation from torch's global generator). The program has one batch shape: a
    last batch with fewer films is filled up with films drawn again from the device's own (a device with 5 films
    and batches of 16 trains on each about three times). Returns the steps taken and the trained parameters
    (checkpoint names)."""
    from executorch.extension.training import get_sgd_optimizer

    from fedxr.data.augment import augment_batch

    from fedxr.labels import NUM_LABELS

    module = load_training_program(program)
    # ExecuTorch 1.5.1 hands out a program's parameters only after a first forward-backward: one on a blank batch
    # (its gradients are never used: each step below computes its own).
    size = images.shape[-1]
    blank = (torch.zeros(batch_size, 1, size, size), torch.zeros(batch_size, NUM_LABELS))
    if _first_pass_done.is_set():
        module.forward_backward("forward", blank)
    else:
        # The first forward-backward in a process sets ExecuTorch up; two device threads doing it at once hang for
        # ever (seen in the simulator): the first one runs alone.
        with _first_pass:
            module.forward_backward("forward", blank)
            _first_pass_done.set()
    params = module.named_parameters()
    foreign = sorted(n for n in params if n.removeprefix("net.") not in weights)
    if foreign:
        raise FedxrError(f"the device's ExecuTorch program has parameters the received model has not: {foreign[:5]}; "
                         "the program was exported from another student — export it again from this one")
    with torch.no_grad():
        for name, tensor in params.items():
            tensor.copy_(weights[name.removeprefix("net.")])  # the version the device received
    optimizer = get_sgd_optimizer(params, lr=lr, momentum=momentum, dampening=0.0, weight_decay=0.0, nesterov=False)
    x_all, y_all = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            if len(batch) < batch_size:
                batch = torch.cat([batch, order[torch.randint(len(order), (batch_size - len(batch),),
                                                              generator=generator)]])
            module.forward_backward("forward", (augment_batch(x_all[batch], mean, std), y_all[batch]))
            optimizer.step(module.named_gradients())
            steps += 1
    return steps, {k.removeprefix("net."): v.detach().clone() for k, v in module.named_parameters().items()}
