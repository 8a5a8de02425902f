"""Homomorphic encryption (``privacy.he``): reading the encrypted global model back at a site.

With HE the server only ever holds the global model as CKKS ciphertexts (NVFlare's HE recipe, TenSEAL): it
saves them that way, and only a participant whose startup kit holds the secret key (each site's
``client_context.tenseal``, written by NVFlare's HEBuilder) can read the weights. fedxr turns the saved
model into a fedxr checkpoint with such a context: in POC the first site's kit in the POC workspace; in
production the ``FEDXR_HE_CONTEXT`` file a hospital points it at (the admin's kit has no secret key).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fedxr.errors import FedxrError

#: Environment variable naming a site's ``client_context.tenseal`` (production runs with privacy.he).
HE_CONTEXT_ENV = "FEDXR_HE_CONTEXT"
CLIENT_CONTEXT = "client_context.tenseal"


def is_encrypted(state: dict) -> bool:
    return any(isinstance(v, (bytes, bytearray)) for v in state.values())


def find_client_context(workspace: Path | None) -> Path | None:
    """A site's secret context: the first site kit's under ``workspace`` (POC: the keys of this very run), else
    ``FEDXR_HE_CONTEXT`` (production). A context of another federation would decrypt to noise without an error."""
    found = sorted(Path(workspace).rglob(f"startup/{CLIENT_CONTEXT}")) if workspace and Path(workspace).is_dir() else []
    if found:
        return found[0]
    return Path(os.environ[HE_CONTEXT_ENV]) if os.environ.get(HE_CONTEXT_ENV) else None


def decrypt_state(state: dict, reference: dict[str, torch.Tensor], context_file: Path | None, source: Path) -> dict:
    """The encrypted entries of ``state`` (serialised CKKS vectors) decrypted and shaped like ``reference``
    (the model's own state dict: names, shapes and types); plain entries pass through."""
    import tenseal as ts

    if context_file is None or not Path(context_file).is_file():
        raise FedxrError(
            f"{source}: the global model is encrypted (privacy.he) and needs a site's secret context to read: set "
            f"{HE_CONTEXT_ENV}=/path/to/a/site/startup/{CLIENT_CONTEXT} (the admin's kit has no secret key)"
            + (f"; {context_file} does not exist" if context_file else ""))
    context = ts.context_from(Path(context_file).read_bytes())
    if not context.is_private():
        raise FedxrError(f"{context_file}: this TenSEAL context has no secret key (a server's?); use a site's "
                         f"{CLIENT_CONTEXT}")
    out = {}
    for name, value in state.items():
        if not isinstance(value, (bytes, bytearray)):
            out[name] = value
            continue
        if name not in reference:
            raise FedxrError(f"{source}: encrypted tensor {name!r} is not part of the model")
        like = reference[name]
        flat = np.asarray(ts.ckks_vector_from(context, bytes(value)).decrypt(), dtype=np.float64)
        if flat.size != like.numel():
            raise FedxrError(f"{source}: {name} decrypts to {flat.size} values, the model has {like.numel()}")
        if not like.is_floating_point():
            flat = np.rint(flat)  # counters (BatchNorm's num_batches_tracked) travel as CKKS reals
        out[name] = torch.from_numpy(flat.reshape(tuple(like.shape))).to(like.dtype)
    return out
