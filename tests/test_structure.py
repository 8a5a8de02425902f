"""The package's shape: no import cycles, the federated engine independent of distillation, and each
fact that used to be spelled in many places defined in one module."""

import ast
import re
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest

from helpers import ROOT

PACKAGE = ROOT / "fedxr"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every fedxr module → the fedxr modules it imports, anywhere in the file (function-level imports too)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t in modules and t != name and not name.startswith(t + "."):
                    graph[name].add(t)
        graph.setdefault(name, set())
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_fedxr():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


def test_federated_engine_does_not_know_about_distillation():
    graph = import_graph()
    federated = [m for m in graph if m.startswith("fedxr.federated")]
    assert federated
    for module in federated:
        assert not any(t.startswith("fedxr.distill") for t in graph[module]), module


# The package's layers, lowest first; a module imports only its own layer and those below (function-level imports
# count too). The README's Layout section says the same.
LAYERS = [
    ("foundation: file formats, names, errors (torch-free)",
     ["fedxr", "fedxr.labels", "fedxr.imaging", "fedxr.preprocessing", "fedxr.layout", "fedxr.errors", "fedxr.defaults",
      "fedxr.results", "fedxr.artifacts", "fedxr.plots", "fedxr.precision", "fedxr.records", "fedxr.devices",
      "fedxr.data.atomic", "fedxr.data.provenance", "fedxr.energy"]),
    ("the edge runtime and the rules it reads (torch-free)",
     ["fedxr.edge", "fedxr.trust.calibration", "fedxr.trust.operating", "fedxr.trust.card"]),
    ("data, models, recipes, privacy, trust fitting", ["fedxr.data", "fedxr.models", "fedxr.config", "fedxr.privacy",
                                                       "fedxr.trust"]),
    ("training and evaluation", ["fedxr.training", "fedxr.evaluation", "fedxr.explain", "fedxr.trust.fit"]),
    ("the federated engine", ["fedxr.federated"]),
    ("distillation", ["fedxr.distill"]),
    ("cross-device federation (NVFlare edge)", ["fedxr.crossdevice"]),
    ("products: export, pipeline, report, CLI, console",
     ["fedxr.export", "fedxr.pipeline", "fedxr.report", "fedxr.cli", "fedxr.console", "fedxr.__main__"]),
]
# Imports that go up a layer, each inside the one function that needs it, and why.
UPWARD_ALLOWED = {
    ("fedxr.trust.operating", "fedxr.models.metrics"):
        "Youden's threshold rule (torch) is imported only when an export fits operating points; the edge reads rules",
}


def layer_of(module: str) -> int:
    """The layer of the longest prefix that names the module (fedxr.trust.fit is not fedxr.trust)."""
    found = [(len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
             if module == p or module.startswith(p + ".")]
    assert found, f"{module} is in no layer: add it to LAYERS"
    return max(found)[1]


def test_each_module_imports_only_its_layer_and_those_below():
    graph = import_graph()
    upward = {(m, d): f"{LAYERS[layer_of(m)][0]} -> {LAYERS[layer_of(d)][0]}" for m, deps in graph.items()
              for d in deps if layer_of(d) > layer_of(m)}
    assert {k: v for k, v in upward.items() if k not in UPWARD_ALLOWED} == {}
    assert set(UPWARD_ALLOWED) <= set(upward), "an allowed exception is gone: remove it from UPWARD_ALLOWED"


def test_light_modules_import_without_the_training_stack():
    """`fedxr --help`, the edge runtime and whatever reads run folders (the console) work where torch,
    pydantic, yaml and pandas are absent (an edge-only install)."""
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "pydantic", "yaml", "pandas", "lightning", "nvflare"):
                    raise ImportError(name + " is not installed here")
        sys.meta_path.insert(0, Block())
        import fedxr.cli, fedxr.pipeline, fedxr.layout, fedxr.results, fedxr.preprocessing
        import fedxr.edge.cli, fedxr.edge.model, fedxr.export.cli
        assert "export" in fedxr.cli.build_parser().format_help()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


# Each fact, and the one module allowed to spell it.
ONE_DEFINITION = {
    r'/\s*"sites"\b|"sites\.json"': "fedxr/layout.py",                 # the run folder's site manifests
    r'"(global_)?(best|last)\.ckpt"': "fedxr/layout.py",              # checkpoint names, best-else-last
    r'"report\.md"|"pipeline\.json"': "fedxr/layout.py",
    r"(?i)(mean|std)\W[^\n]{0,20}\b0\.(5|25)\b|\b0\.5,\s*0\.25\b": "fedxr/preprocessing.py",  # normalisation fallback
    r"timeout_s\s*\*": "fedxr/federated/job.py",                       # how long a job may take
    r'matplotlib\.use\(': "fedxr/plots.py",                            # the plot boilerplate
    r"zlib\.compress": "fedxr/federated/codec.py",                     # what a job carries to its sites
    r'"manifest\.json"': "fedxr/artifacts.py",                          # the export manifest's name
    r'"metrics\.json"': "fedxr/artifacts.py",                           # an evaluation's file (EvalResult)
}


@pytest.mark.parametrize("pattern", list(ONE_DEFINITION))
def test_each_fact_is_defined_in_one_module(pattern):
    owners = sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if re.search(pattern, p.read_text()))
    assert owners == [ONE_DEFINITION[pattern]]
