"""What leaves a site: an NVFlare output filter that records every result a site sends to the server.

The filter sits last in the site's outgoing filter chain (after any privacy filter or encryption), in the
site's own FLARE client process, so it sees exactly what goes on the wire. For each message it writes one
JSON line: the task, the round, the kind of payload, every tensor's name, shape, type and bytes, and every
other value (metrics, meta data, headers) with its key — numbers as numbers, text as text (cut at 200
characters), so anything that is not a weight or a declared score stands out. It never changes the message.

Where the lines go: ``folder`` when the job names one (simulation and POC on one machine: the run's
``records/outgoing/``), else the job's own run folder at the site (``outgoing.jsonl``), for the hospital's
own inspection. :func:`summarise` turns the lines into the report's "What left each site" table.
"""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.filter import Filter

from fedxr.records import OUTGOING, append_line, read_lines  # noqa: F401  (OUTGOING: the records subfolder these files go to)
_TEXT_LIMIT = 200


def _describe_value(value):
    """(is_tensor, description) of one payload value, without its numbers."""
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        nbytes = int(getattr(value, "nbytes", 0) or (value.numel() * value.element_size() if hasattr(value, "numel") else 0))
        size = int(getattr(value, "size", 0)) if not callable(getattr(value, "size", None)) else int(value.numel())
        nonzero = int((value != 0).sum())
        # Zeros show what a sparsifying privacy filter withheld (its values are not recorded).
        return True, {"shape": [int(d) for d in shape], "dtype": str(value.dtype), "bytes": nbytes, "zeros": size - nonzero}
    if isinstance(value, (bytes, bytearray)):
        return True, {"shape": None, "dtype": "bytes", "bytes": len(value)}
    if hasattr(value, "serialize"):  # an encrypted vector (TenSEAL CKKSVector): only its size is known
        return True, {"shape": None, "dtype": type(value).__name__, "bytes": len(value.serialize())}
    return False, _plain(value)


def _plain(value):
    """A JSON-safe copy of a non-tensor value: numbers and short text as they are, containers recursively."""
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, str):
        return value[:_TEXT_LIMIT]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value[:50]]
    if hasattr(value, "item") and getattr(value, "size", 2) == 1:
        return value.item()
    return f"<{type(value).__name__}>"


def describe(shareable) -> dict:
    """One outgoing message, described: payload kind, tensors (name → shape, dtype, bytes), other values."""
    from nvflare.apis.dxo import from_shareable

    entry: dict = {"headers": _plain(dict(shareable.get("__headers__", {}) or {}))}
    try:
        dxo = from_shareable(shareable)
    except Exception:  # an error reply or a non-DXO message: only its keys are known
        entry.update(kind=None, tensors={}, values={k: _plain(v) for k, v in shareable.items() if k != "__headers__"})
        return entry
    tensors: dict[str, dict] = {}
    values: dict[str, object] = {}
    data = dxo.data if isinstance(dxo.data, dict) else {"<data>": dxo.data}
    for name, value in data.items():
        is_tensor, described = _describe_value(value)
        (tensors if is_tensor else values)[str(name)] = described
    entry.update(kind=str(getattr(dxo.data_kind, "value", dxo.data_kind)), tensors=tensors, values=values,
                 meta=_plain(dxo.meta or {}), bytes=sum(t["bytes"] for t in tensors.values()))
    return entry


class OutgoingAudit(Filter):
    """Records what a site sends (see the module docstring); the message passes unchanged."""

    def __init__(self, folder: str = ""):
        super().__init__()
        self.folder = folder

    def _path(self, fl_ctx, site: str) -> Path:
        if self.folder:
            return Path(self.folder) / f"{site}.jsonl"
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        return Path(run_dir) / "outgoing.jsonl"

    def process(self, shareable, fl_ctx):
        from nvflare.apis.fl_constant import FLContextKey
        from nvflare.app_common.app_constant import AppConstants

        site = fl_ctx.get_identity_name()
        try:
            entry = {"site": site, "task": fl_ctx.get_prop(FLContextKey.TASK_NAME),
                     "round": shareable.get_header(AppConstants.CURRENT_ROUND), **describe(shareable)}
            path = self._path(fl_ctx, site)
            path.parent.mkdir(parents=True, exist_ok=True)
            append_line(path, entry)
        except Exception as exc:  # the audit must never be the reason a round fails; the log says it missed one
            self.log_error(fl_ctx, f"fedxr outgoing audit could not record a message: {type(exc).__name__}: {exc}")
        return shareable


def read_outgoing(folder: Path) -> list[dict]:
    """Every recorded message of every site under ``folder`` (records/outgoing), in file order."""
    rows = []
    for path in sorted(Path(folder).glob("*.jsonl")):
        rows += read_lines(path)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per site, task and round: messages, tensors, bytes, payload kinds and the non-tensor keys sent."""
    table: dict[tuple, dict] = {}
    for r in rows:
        key = (r["site"], r.get("task") or "?", r.get("round"))
        row = table.setdefault(key, {"site": key[0], "task": key[1], "round": key[2], "messages": 0, "tensors": 0,
                                     "bytes": 0, "kinds": set(), "keys": set()})
        row["messages"] += 1
        row["tensors"] += len(r.get("tensors", {}))
        row["bytes"] += int(r.get("bytes") or 0)
        encrypted = any(t.get("dtype") == "CKKSVector" for t in r.get("tensors", {}).values())
        row["kinds"].add((r.get("kind") or "none") + (" (CKKS-encrypted)" if encrypted else ""))
        row["keys"] |= set(r.get("values", {})) | set(_flat_keys(r.get("meta", {})))
    out = []
    for key in sorted(table, key=lambda k: (k[0], k[1], -1 if k[2] is None else k[2])):
        row = table[key]
        out.append({**row, "kinds": sorted(row["kinds"]), "keys": sorted(row["keys"])})
    return out


def compact_keys(keys: list[str]) -> list[str]:
    """Keys for reading: per-class scores (``val_auroc/Effusion``) and per-tensor flags (``PROCESSED_KEYS.model.x``)
    folded into one entry each with their count."""
    groups: dict[str, int] = {}
    for k in keys:
        if "/" in k:
            k = k.split("/")[0] + "/*"
        elif k.startswith("PROCESSED_KEYS."):
            k = "PROCESSED_KEYS.*"
        groups[k] = groups.get(k, 0) + 1
    return [k if n == 1 or not k.endswith("*") else f"{k} ({n})" for k, n in sorted(groups.items())]


def _flat_keys(meta: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in meta.items():
        keys += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return keys
