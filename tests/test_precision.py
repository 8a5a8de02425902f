"""`model.precision: auto`: bf16 autocast where the CPU (AMX, AVX512-BF16) or GPU does bf16 natively, FP32
elsewhere and under differential privacy; the precision a run trained in is recorded."""

from __future__ import annotations

import pytest
import torch

from fedxr.config import load_recipe
from fedxr.precision import BF16_CPU_FLAGS, cpu_bf16_flags, resolve_precision

from helpers import QUICKSTART


@pytest.fixture
def cpu_flags(monkeypatch):
    """Set FEDXR_CPU_BF16 for one test (the flag check is cached per process)."""
    def set_to(value: str | None):
        if value is None:
            monkeypatch.delenv("FEDXR_CPU_BF16", raising=False)
        else:
            monkeypatch.setenv("FEDXR_CPU_BF16", value)
        cpu_bf16_flags.cache_clear()
    yield set_to
    cpu_bf16_flags.cache_clear()


def test_flags_are_read_from_the_kernels_cpu_flags(cpu_flags, tmp_path):
    """Whole flag names on the flags line only: avx512bw alone (bf16 emulated) or a model name that mentions
    bf16 is not native bf16."""
    cpu_flags(None)
    head = "processor\t: 0\nmodel name\t: Example avx512_bf16 CPU\n"
    cases = {"fpu avx2 avx512f avx512bw avx512_bf16 sse": ("avx512_bf16",),
             "fpu avx512f avx512bw amx_tile amx_bf16 avx512_bf16": ("amx_bf16", "avx512_bf16"),
             "fpu avx2 avx512f avx512bw avx512_bf16x": ()}
    for i, (flags, want) in enumerate(cases.items()):
        info = tmp_path / f"cpuinfo{i}"
        info.write_text(f"{head}flags\t\t: {flags}\nbugs\t\t: avx512_bf16\n\nprocessor\t: 1\n")
        assert cpu_bf16_flags(info) == want, flags
    assert cpu_bf16_flags(tmp_path / "absent") == ()
    assert set(cpu_bf16_flags()) <= set(BF16_CPU_FLAGS)  # this machine's own file parses too


def test_auto_is_bf16_on_a_bf16_cpu_and_fp32_elsewhere(cpu_flags):
    cpu_flags("1")
    assert resolve_precision("auto", "cpu")[0] == "bf16-mixed"
    assert resolve_precision("auto", "cpu", dp=True) == ("32-true", "privacy.dp: per-image clipping in FP32")
    cpu_flags("0")
    precision, why = resolve_precision("auto", "cpu")
    assert precision == "32-true" and "AMX" in why
    # what the recipe says is what runs
    assert resolve_precision("bf16-mixed", "cpu") == ("bf16-mixed", "as the recipe says")
    assert resolve_precision("32-true", "cpu")[0] == "32-true"


def test_the_trainer_trains_in_the_resolved_precision(cpu_flags, tmp_path):
    from fedxr.precision import recipe_precision
    from fedxr.training import make_trainer

    recipe = load_recipe(QUICKSTART, [f"output.runs_dir={tmp_path}", "model.accelerator=cpu"])
    assert recipe.model.precision == "auto"
    for flag, want in (("1", "bf16-mixed"), ("0", "32-true")):
        cpu_flags(flag)
        assert recipe_precision(recipe)[0] == want
        trainer = make_trainer(recipe, tmp_path, progress=False, logger=False)
        assert str(trainer.precision) == want
        with trainer.precision_plugin.forward_context():
            y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
        assert y.dtype == (torch.bfloat16 if want == "bf16-mixed" else torch.float32)
    dp = load_recipe(QUICKSTART, [f"output.runs_dir={tmp_path}", "model.accelerator=cpu", "privacy.dp=true",
                                   "distill.students=[]"])
    cpu_flags("1")
    assert recipe_precision(dp)[0] == "32-true"
