"""`/runs/new`: a coordinator starts a recipe (sim or POC) from the console, one run at a time.

The run is `fedxr run RECIPE key=value…` in its own process, from the console's working folder, with its
output in the runs folder the console shows; its progress is read from the run folder like any run's.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedxr.errors import FedxrError

_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=[^\n\r]{0,200}$")
_RECIPE = re.compile(r"^[A-Za-z0-9_.-]+\.ya?ml$")
#: Recipe keys the console sets itself (where runs and their models go, which environment).
_RESERVED = ("output.runs_dir", "export.out", "federated.env")


def _yaml_str(path: Path) -> str:
    return "'" + str(Path(path).resolve()).replace("'", "''") + "'"


def _tail(path: Path, limit: int) -> str:
    from fedxr.console.data import tail

    return tail(path, limit)


class RunLauncher:
    def __init__(self, recipes: Path, runs: Path, exports: Path = Path("export")):
        self.recipes, self.runs, self.exports = Path(recipes), Path(runs), Path(exports)
        self._proc: subprocess.Popen | None = None
        self._current: dict | None = None
        self._lock = threading.Lock()

    def recipe_names(self) -> list[str]:
        return sorted(p.name for p in self.recipes.glob("*.y*ml") if _RECIPE.match(p.name))

    def status(self) -> dict | None:
        """The run started last: name, who, when, running or its exit code, and the tail of its output."""
        with self._lock:
            if self._current is None:
                return None
            rc = self._proc.poll() if self._proc else None
            log = Path(self._current["log"])
            tail = _tail(log, 4000) if log.is_file() else ""
            return {**self._current, "running": rc is None, "returncode": rc, "output_tail": tail}

    def start(self, recipe: str, overrides: list[str], env: str, user: str) -> dict:
        if env not in ("sim", "poc"):
            raise FedxrError(f"environment {env!r}: the console starts runs in sim or poc")
        if not _RECIPE.match(recipe) or recipe not in self.recipe_names():
            raise FedxrError(f"no recipe {recipe!r} under {self.recipes}/")
        for item in overrides:
            if not _OVERRIDE.match(item):
                raise FedxrError(f"override {item!r}: write section.key=value, e.g. federated.rounds=2")
            if item.split("=", 1)[0] in _RESERVED:
                raise FedxrError(f"override {item!r}: the console sets {item.split('=', 1)[0]} itself")
        # Quoted: the values are read as YAML.
        args = [*overrides, f"output.runs_dir={_yaml_str(self.runs)}", f"export.out={_yaml_str(self.exports)}",
                f"federated.env={env}"]
        from fedxr.config import load_recipe  # validates everything before a process starts

        name = load_recipe(self.recipes / recipe, args).output.name
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                assert self._current is not None  # set together with _proc
                raise FedxrError(f"a run is already going ({self._current['name']}, started by {self._current['user']}); "
                                 "wait for it to finish")
            log = self.runs / name / "console_run.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as fh:
                self._proc = subprocess.Popen([sys.executable, "-u", "-m", "fedxr", "run", str(self.recipes / recipe), *args],
                                              stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            self._current = {"name": name, "recipe": recipe, "overrides": overrides, "env": env, "user": user,
                             "started": time.time(), "log": str(log), "pid": self._proc.pid}
            return dict(self._current)

    def stop(self) -> None:
        """End a run the console started (when the console itself shuts down)."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
