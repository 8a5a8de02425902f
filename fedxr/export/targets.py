"""Export targets: where the model will run decides its shape and file format.

* ``laptop`` — ONNX with a dynamic batch axis (batch inference of folders), INT8 kept when it is measurably
  faster here. What `python -m fedxr.export` always wrote.
* ``board`` — an embedded ARM board: input fixed at 1×1×H×W, plus the ORT format file of each model
  (``convert_onnx_models_to_ort``, optimisations baked in for ARM) and the ``required_operators.config``
  that a minimal onnxruntime build for the board is made from (``build.sh --minimal_build
  --include_ops_by_config``).
* ``mobile`` — a phone: input fixed (NNAPI cannot run nodes with dynamic shapes), ORT format with runtime
  optimisations (the style onnxruntime recommends with NNAPI/CoreML), and onnxruntime's mobile usability
  checker's verdict for NNAPI and CoreML, recorded in ``manifest.json``.

Speed measured on this machine says nothing about an ARM core's kernels: on board and mobile, INT8 is
kept or dropped on accuracy alone unless the export itself runs on ARM, and the manifest says so.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedxr.errors import FedxrError

#: The operators list a minimal onnxruntime build takes (one file for every model of the export).
OPERATORS_CONFIG = "required_operators.config"


@dataclass(frozen=True)
class Target:
    name: str
    fixed_batch: int | None   # None: dynamic batch axis
    ort_style: str | None     # convert_onnx_models_to_ort --optimization_style; None: no ORT file
    ort_platform: str | None  # --target_platform
    usability_check: bool     # run onnxruntime's mobile usability checker
    help: str


TARGETS = {
    "laptop": Target("laptop", None, None, None, False, "dynamic batch ONNX; INT8 when faster here (default)"),
    "board": Target("board", 1, "Fixed", "arm", False,
                    "fixed 1x1xHxW, ORT format for ARM + required operators for a minimal onnxruntime build"),
    "mobile": Target("mobile", 1, "Runtime", "arm", True,
                     "fixed 1x1xHxW, ORT format for NNAPI/CoreML, mobile usability check in manifest.json"),
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise FedxrError(f"unknown export target {name!r}; choose one of {', '.join(TARGETS)}") from None


def runs_on_arm() -> bool:
    """True when this process runs on an ARM CPU, where INT8 speed is the board's own."""
    return platform.machine().lower() in ("aarch64", "arm64") or platform.machine().lower().startswith("armv")


def convert_to_ort(onnx_files: dict[Path, dict], out: Path, target: Target) -> tuple[dict[Path, Path], Path]:
    """ORT format copies of ONNX files (``NAME.ort`` beside them in ``out``) and one operators config.

    ``onnx_files`` maps each file to the fedxr metadata its ORT copy carries (its own ``format``). Runs
    onnxruntime's own converter (``python -m onnxruntime.tools.convert_onnx_models_to_ort``) on copies in a
    temporary folder, so its intermediate files never land in the export folder."""
    from fedxr.export.onnx import set_metadata

    assert target.ort_style is not None, f"target {target.name} has no ORT format"  # callers check tgt.ort_style
    with tempfile.TemporaryDirectory(prefix="fedxr-ort-") as tmp_name:
        tmp = Path(tmp_name)
        for f, meta in onnx_files.items():
            shutil.copy2(f, tmp / f.name)
            set_metadata(tmp / f.name, meta)
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(tmp),
               "--output_dir", str(tmp / "ort"), "--optimization_style", target.ort_style]
        if target.ort_platform:
            cmd += ["--target_platform", target.ort_platform]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise FedxrError(f"onnxruntime's ORT converter did not finish within 900 s on {out}; "
                             "export without --target or report the model") from None
        if proc.returncode != 0:
            raise FedxrError(f"onnxruntime could not convert {', '.join(f.name for f in onnx_files)} to ORT format:\n"
                             + (proc.stderr or proc.stdout)[-2000:])
        made = {}
        for f in onnx_files:
            src = next((tmp / "ort").glob(f"{f.stem}.*ort"), None)  # NAME.ort or NAME.with_runtime_opt.ort
            if src is None:
                raise FedxrError(f"{f.name}: onnxruntime's converter wrote no .ort file:\n{proc.stdout[-2000:]}")
            made[f] = Path(shutil.move(str(src), out / f"{f.stem}.ort"))
        configs = sorted((tmp / "ort").glob("required_operators*.config"))
        if not configs:
            raise FedxrError(f"onnxruntime's converter wrote no operators config:\n{proc.stdout[-2000:]}")
        config = Path(shutil.move(str(configs[0]), out / OPERATORS_CONFIG))
    return made, config


#: The execution providers the usability checker knows, and the operator table each is checked against.
_MOBILE_EPS = {"NNAPI": None, "CoreML MLProgram": "coreml_supported_mlprogram_ops.md",
               "CoreML NeuralNetwork": "coreml_supported_neuralnetwork_ops.md"}


def mobile_usability(path: Path) -> dict:
    """onnxruntime's mobile usability checker (the code behind ``check_onnx_model_mobile_usability``) on one
    ONNX file: for NNAPI and both CoreML flavours, how many nodes the EP can take, in how many partitions,
    and its verdict (YES / MAYBE / NO: "should perform well with this EP as is")."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    with tempfile.TemporaryDirectory(prefix="fedxr-usability-") as tmp:
        basic = Path(tmp) / path.name  # the checker looks at the model after basic optimisation, as the tool does
        optimize_model(path, basic)
        model = ModelProtoWithShapeInfo(basic).model_with_shape_info
        dynamic_inputs, dynamic_values = uc.check_shapes(model.graph)
        result = {"dynamic_inputs": [i.name for i in dynamic_inputs], "dynamic_values": dynamic_values, "eps": {}}
        for ep, table in _MOBILE_EPS.items():
            info = (uc.check_nnapi_partitions(model, require_fixed_input_sizes=True) if table is None
                    else uc.check_coreml_partitions(model, require_fixed_input_sizes=True, config_filename=table))
            result["eps"][ep] = {"verdict": info.suitability().name, "nodes": info.num_nodes,
                                 "supported_nodes": info.num_supported_nodes, "partitions": info.num_partitions,
                                 "unsupported_ops": sorted(info.unsupported_ops),
                                 "unsupported_for_dynamic_shape": info.nodes_unsupported_due_to_dynamic_input}
    return result


def format_usability(file: str, result: dict) -> list[str]:
    lines = [f"mobile usability of {file} (onnxruntime's checker; YES = should perform well with the EP as is):"]
    for ep, r in result["eps"].items():
        extra = f", unsupported ops: {', '.join(r['unsupported_ops'])}" if r["unsupported_ops"] else ""
        lines.append(f"  {ep:<21}{r['verdict']:<6} {r['supported_nodes']}/{r['nodes']} nodes in "
                     f"{r['partitions']} partition(s){extra}")
    return lines
