"""The plain install is the edge runtime only: no torch in its dependencies or its imports."""

import subprocess
import sys
import tomllib

from helpers import ROOT


def test_base_dependencies_are_edge_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    for heavy in ("torch", "lightning", "nvflare", "timm"):
        assert heavy not in base, f"{heavy} must not be a base dependency"
    assert {"train", "dev"} <= set(project["optional-dependencies"])
    assert "fedxr" in project["scripts"]


def test_torch_free_modules_do_not_import_torch():
    code = ("import sys, fedxr, fedxr.labels, fedxr.imaging, fedxr.errors, fedxr.models.registry; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "fedxr", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "federate" in proc.stdout
    assert "data" in proc.stdout
