"""Artifacts read back are the ones written: a round-records line or an outgoing-audit line that was altered or cut,
and a site manifest that differs from the one `fedxr data split` wrote, are clear errors naming the file (and the
line), never figures computed from wrong data. (Checkpoints: tests/test_models.py; ONNX files and manifests:
tests/test_export_edge.py, tests/test_artifacts.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedxr.cli import main
from fedxr.data.manifest import read_manifest, site_manifest_paths
from fedxr.errors import DataError
from fedxr.records import RecordsError, append_line, read_lines, read_records

ROWS = [{"site": "site-1", "round": r, "rank": 0, "val_auroc": 0.5 + r / 10, "val_images": 10, "steps": 4,
         "t_receive": 1.0 + r, "t_trained": 1.5 + r, "train_s": 0.4, "validate_s": 0.1} for r in range(3)]


def _written(tmp_path: Path) -> Path:
    path = tmp_path / "records" / "site-1.jsonl"
    path.parent.mkdir()
    for row in ROWS:
        append_line(path, row)
    return path


def test_records_read_back_as_written_and_a_line_being_written_is_skipped(tmp_path):
    path = _written(tmp_path)
    assert read_lines(path) == ROWS
    assert all("sha" in json.loads(line) for line in path.read_text().splitlines())
    with open(path, "a") as fh:  # a site appending its next line right now: no newline yet
        fh.write('{"site": "site-1", "round": 3, "val_au')
    assert read_records(path.parent) == ROWS
    # Lines from before the digest existed are read as they are.
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert read_lines(old) == ROWS


@pytest.mark.parametrize("damage, expected", [
    (lambda t: t.replace('"val_auroc": 0.6', '"val_auroc": 0.9'), "line 2: changed since it was written"),
    (lambda t: t.replace('"steps": 4', '"steps": 5', 1), "line 1: changed since it was written"),
    (lambda t: t.splitlines()[0] + "\n" + t.splitlines()[1][:40] + "\n" + t.splitlines()[2] + "\n",
     "line 2: not a complete record"),
    (lambda t: t[: len(t) // 2] + "\n", "line 2: not a complete record"),  # cut, then a newline: not being written
    (lambda t: t + "[1, 2]\n", "line 4: not a record object"),
])
def test_an_altered_or_cut_records_line_names_the_file_and_line(tmp_path, damage, expected):
    path = _written(tmp_path)
    path.write_text(damage(path.read_text()))
    with pytest.raises(RecordsError, match=expected) as err:
        read_records(path.parent)
    assert str(path) in str(err.value) and "rerun the stage" in str(err.value)


def test_a_bit_flip_in_any_records_byte_is_caught(tmp_path):
    """Flip one bit in every byte of a line in turn: each flip is an error (bad JSON or a digest that differs)
    or, where JSON still parses to the same record (whitespace), harmless."""
    path = _written(tmp_path)
    raw = path.read_bytes()
    first_line_end = raw.index(b"\n")
    caught = harmless = 0
    for i in range(first_line_end):
        flipped = bytearray(raw)
        flipped[i] ^= 0x04
        path.write_bytes(bytes(flipped))
        try:
            rows = read_lines(path)
        except (RecordsError, UnicodeDecodeError):
            caught += 1
            continue
        assert rows == ROWS, f"byte {i}: a changed record was read as if it were the one written"
        harmless += 1
    assert caught > 0.9 * first_line_end


@pytest.fixture()
def sites(tmp_path, mini_nih):
    out = tmp_path / "sites"
    assert main(["data", "split", str(mini_nih), "--sites", "2", "--scheme", "iid", "--out", str(out)]) == 0
    return out


def test_a_site_manifest_is_checked_against_the_digest_written_beside_it(sites, tmp_path):
    paths = site_manifest_paths(sites)
    summary = json.loads((sites / "sites.json").read_text())
    assert all(len(row["sha256"]) == 64 for row in summary["sites"])
    clean = read_manifest(paths["site-1"])
    text = paths["site-1"].read_text()
    # One label flipped in one row, and a manifest cut short: both refused, naming the file and the fix.
    line = text.splitlines()[1]
    changed = line[:-1] + ("0" if line.endswith("1") else "1")
    for damaged in (text.replace(line, changed, 1), text[: len(text) // 2]):
        paths["site-1"].write_text(damaged)
        with pytest.raises(DataError, match="not the site manifest that was written .*fedxr data split .*fedxr data "
                                            "prepare"):
            read_manifest(paths["site-1"])
    # The other site is untouched and still reads.
    assert len(read_manifest(paths["site-2"])) > 0
    # An unreadable sites.json is not a reason to skip the check.
    saved = (sites / "sites.json").read_text()
    (sites / "sites.json").write_text(saved[:100])
    with pytest.raises(DataError, match="sites.json: unreadable, so site-2.csv cannot be checked"):
        read_manifest(paths["site-2"])
    (sites / "sites.json").write_text(saved)
    # A manifest with no sites.json beside it is read as it is.
    own = tmp_path / "own"
    own.mkdir()
    shutil.copy(sites / "site-2.csv", own / "site-2.csv")
    assert len(read_manifest(own / "site-2.csv")) == len(read_manifest(paths["site-2"]))
    paths["site-1"].write_text(text)
    assert read_manifest(paths["site-1"]).equals(clean)


DISK_FULL = """
import resource, signal, sys
import torch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
from fedxr.data.atomic import write_json_atomic
from fedxr.models.checkpoint import save_checkpoint
from fedxr.preprocessing import Preprocessing
what, path = sys.argv[1], sys.argv[2]
if what == "checkpoint":
    save_checkpoint(path, model_name="tiny_cnn", state_dict={"w": torch.ones(200_000)},
                    preprocessing=Preprocessing(32), thresholds=[0.5] * 14)
else:
    write_json_atomic(path, {"rows": list(range(100_000))})
"""


@pytest.mark.parametrize("what", ["checkpoint", "json"])
def test_a_full_disk_during_a_write_keeps_the_previous_file_and_leaves_no_partial_one(tmp_path, what):
    import subprocess
    import sys

    import torch

    from fedxr.models.checkpoint import load_checkpoint, save_checkpoint
    from fedxr.preprocessing import Preprocessing

    path = tmp_path / ("best.ckpt" if what == "checkpoint" else "summary.json")
    if what == "checkpoint":
        save_checkpoint(path, model_name="tiny_cnn", state_dict={"w": torch.zeros(3)}, preprocessing=Preprocessing(32),
                        thresholds=[0.5] * 14)
    else:
        path.write_text('{"rows": [1, 2, 3]}')
    before = path.read_bytes()
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, what, str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr[-2000:]
    assert path.read_bytes() == before  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind
    if what == "checkpoint":
        assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.zeros(3))


def test_in_a_folder_fedxr_started_a_line_cannot_shed_its_digest(tmp_path):
    """Stripping the digest (or flipping a bit of its key) and editing a value does not pass where fedxr wrote the
    records; a value whose keys JSON turns into strings still reads back as written."""
    from fedxr.records import OUTGOING, start_records

    folder = tmp_path / "records"
    start_records(folder)
    for path in (folder / "site-1.jsonl", folder / OUTGOING / "site-1.jsonl"):
        path.parent.mkdir(exist_ok=True)
        append_line(path, {"site": "site-1", "round": 0, "counts": {2: 1, 10: 3}})
        assert read_lines(path) == [{"site": "site-1", "round": 0, "counts": {"2": 1, "10": 3}}]
        for damaged in (json.dumps({"site": "site-1", "round": 1, "counts": {}}) + "\n",
                        path.read_text().replace('"sha"', '"sla"')):
            path.write_text(damaged)
            with pytest.raises(RecordsError, match="line 1: has no digest, which every line here must have"):
                read_lines(path)
