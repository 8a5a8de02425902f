"""Training-step ceilings of fedxr's models on one GPU, why depthwise students are slow, and torch.compile.

    python benchmarks/gpu_suite.py                   # on the GPU machine: ~7 min, writes results/gpu_suite.json
    python benchmarks/gpu_suite.py --budget-s 300    # a shorter run (rows that no longer fit are recorded as skipped)
    python benchmarks/gpu_suite.py --smoke           # CPU rehearsal, < 1 min: results/gpu_suite.smoke.json

On a lent machine, where only $OUT comes back (copy the JSON to benchmarks/results/gpu_suite.json after):

    python benchmarks/gpu_suite.py --out "$OUT/gpu_suite.json" 2>&1 | tee "$OUT/gpu_suite.log"

What is timed is the model alone, with no data loader: forward, BCE-with-logits loss on 14 labels, backward
and an AdamW step on random (N, 1, S, S) images kept on the device, as XRayClassifier trains them
(one input channel, autocast, channels_last). Images/s = batch × timed steps / the timed window, which
opens and closes with torch.cuda.synchronize() after a few warm-up steps. Three parts, in this order:

1. ceilings at 224 px, batch 256, bf16 autocast, channels_last and cudnn.benchmark off (fedxr's current
   training settings: Lightning leaves cudnn.benchmark alone) for densenet121, resnet18,
   mobilenetv3_small_100 and resnet18_quarter;
2. why depthwise is slow: MobileNetV3-Small over channels_last on/off × bf16 / fp16 / fp32 ×
   cudnn.benchmark on/off at batch 256; the ¼ ResNet-18 and ResNet-18 (the reference) over channels_last ×
   dtype with cudnn.benchmark on; then each model's best configuration again at batch 512;
3. torch.compile (default mode) of mobilenetv3_small_100 and densenet121 at the ceiling configuration:
   each in its own process under a timeout, so a compile that hangs or runs long cannot eat the budget;
   the compile time (the first step) is reported apart from the steady-state images/s.

The whole run keeps to --budget-s (default 420 s, counted from the start of the process): a row that no
longer fits is recorded as skipped with the reason, and a watchdog ends the process if something hangs
past the budget. The JSON is rewritten after every row, so a run that is killed keeps what it measured.
It needs only torch and timm: models come from fedxr.models.registry, or, where that module cannot be
imported, from timm built the same way (same names, one input channel, 14 outputs).
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # the budget counts the imports too: they are part of the wall time on the device

import argparse  # noqa: E402
import faulthandler  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # fedxr from the repository root
sys.path.insert(0, str(HERE))          # benchmarks/common.py

import torch  # noqa: E402

NUM_LABELS = 14
CEILING_MODELS = ["densenet121", "resnet18", "mobilenetv3_small_100", "resnet18_quarter"]
REFERENCE = "resnet18"
STUDENTS = ["mobilenetv3_small_100", "resnet18_quarter"]
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
GOAL_SHARE_PCT = 50.0


# ---------------------------------------------------------------------------------------------- models

def _timm_mirror(name: str):
    """fedxr.models.registry.build_model for the models measured here, for a machine where the registry
    cannot be imported: the same timm calls, one input channel, 14 logits."""
    import timm

    slim = {"resnet18_quarter": 16, "resnet18_eighth": 8}
    if name in slim:
        from timm.models.resnet import BasicBlock, ResNet

        width = slim[name]
        return ResNet(BasicBlock, [2, 2, 2, 2], in_chans=1, num_classes=NUM_LABELS,
                      channels=tuple(width * 2**i for i in range(4)), stem_width=width)
    return timm.create_model(name, pretrained=False, in_chans=1, num_classes=NUM_LABELS)


def model_builder():
    """(build(name) -> nn.Module, where it comes from)."""
    try:
        from fedxr.models.registry import build_model
    except Exception as exc:  # pydantic, PIL, numpy ... missing on the device image
        return _timm_mirror, f"timm (mirror of fedxr.models.registry; registry import failed: {type(exc).__name__}: {exc})"
    return (lambda name: build_model(name, pretrained=False, num_classes=NUM_LABELS)), "fedxr.models.registry.build_model"


# ------------------------------------------------------------------------------------------ measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory(device: torch.device) -> None:
    """Release the previous row's model and optimiser so each row's peak memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def config(model: str, size: int, batch: int, dtype: str, channels_last: bool, cudnn_benchmark: bool,
           compiled: bool = False) -> dict:
    return {"model": model, "image_size": size, "batch": batch, "dtype": dtype, "channels_last": channels_last,
            "cudnn_benchmark": cudnn_benchmark, "compiled": compiled}


def key(cfg: dict) -> tuple:
    return tuple(cfg[k] for k in ("model", "image_size", "batch", "dtype", "channels_last", "cudnn_benchmark",
                                  "compiled"))


def measure(cfg: dict, build, device: torch.device, warmup: int, steps: int, timed_cap_s: float,
            backend: str = "inductor", on_compiled=None, deadline: float = float("inf")) -> dict:
    """One training-step measurement. Warm-up stops early when its steps after the first have taken
    ``timed_cap_s`` (a slow configuration), and the timed window closes after ``steps`` steps or ``timed_cap_s`` seconds, whichever
    comes first (at least 2 steps), or at ``deadline`` (perf_counter). With ``compiled`` the first step is the compile time and
    ``on_compiled(partial)`` is called right after it, so a caller killed during the measurement keeps it."""
    torch.backends.cudnn.benchmark = cfg["cudnn_benchmark"]
    free_memory(device)
    model = build(cfg["model"]).to(device).train()
    x = torch.randn(cfg["batch"], 1, cfg["image_size"], cfg["image_size"], device=device)
    if cfg["channels_last"]:
        # Both the weights and the input, as XRayClassifier does: otherwise every conv converts layouts.
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(cfg["batch"], NUM_LABELS, device=device) < 0.1).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = AMP_DTYPES[cfg["dtype"]]
    # fp16 needs loss scaling to train at all (Lightning's 16-mixed uses it); its inf check syncs every step.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["dtype"] == "fp16")
    net = torch.compile(model, backend=backend) if cfg["compiled"] else model

    def step():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = net(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    out = {}
    warm = []
    for i in range(max(1, warmup)):
        t = time.perf_counter()
        step()
        sync(device)
        warm.append(time.perf_counter() - t)
        if i == 0 and cfg["compiled"]:
            out["compile_s"] = round(warm[0], 2)  # dynamo + AOTAutograd + inductor for forward and backward
            if on_compiled:
                on_compiled({**out, "status": "compiled, measuring"})
        # The first step is one-off work (compiling, cudnn.benchmark's search, allocator growth): the warm-up
        # cap counts the steps after it, and at least one of them runs.
        if i >= 1 and (sum(warm[1:]) > timed_cap_s or time.perf_counter() > deadline):
            break
    # No sync inside the window: the host runs ahead of the device by a bounded queue, so checking the
    # clock on the host only decides when to stop; the synchronize() after the loop closes the window.
    sync(device)
    t0 = time.perf_counter()
    n = 0
    while n < steps:
        step()
        n += 1
        if n >= 2 and (time.perf_counter() - t0 > timed_cap_s or time.perf_counter() > deadline):
            break
    sync(device)
    elapsed = time.perf_counter() - t0
    out.update({"status": "ok", "images_per_s": round(cfg["batch"] * n / elapsed, 1),
                "step_ms": round(1000 * elapsed / n, 2), "timed_steps": n, "timed_s": round(elapsed, 2),
                "warmup_steps": len(warm), "first_step_s": round(warm[0], 3),
                "peak_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None})
    if cfg["compiled"] and len(warm) > 1:
        out["second_step_s"] = round(warm[1], 3)  # a recompile shows here
    return out


# --------------------------------------------------------------------------------------------- plan

def grid(smoke: bool, size: int, batch: int) -> list[dict]:
    """Part 2 at the base batch, most telling rows first (the budget skips from the end).
    Full grid for MobileNetV3-Small; cudnn.benchmark on only for the ¼ ResNet-18 and the reference."""
    layouts, dtypes, benches = ([True, False], ["bf16", "fp16", "fp32"], [False, True]) if not smoke else \
        ([True, False], ["bf16", "fp32"], [False])
    rows = [config("mobilenetv3_small_100", size, batch, d, cl, b) for cl in layouts for d in dtypes for b in benches]
    if smoke:  # the benchmark switch once, and fp16 once, so the rehearsal runs every code path
        rows.append(config("mobilenetv3_small_100", size, batch, "bf16", True, True))
        rows.append(config("resnet18_quarter", size, batch, "fp16", True, True))
    for model in ("resnet18_quarter", REFERENCE):
        rows += [config(model, size, batch, d, cl, True) for cl in layouts for d in (dtypes if not smoke else ["fp32"])]
    return rows


def best_row(rows: list[dict], model: str, batch: int | None = None, compiled: bool | None = None) -> dict | None:
    ok = [r for r in rows if r["model"] == model and r.get("status") == "ok"
          and (batch is None or r["batch"] == batch) and (compiled is None or r["compiled"] == compiled)]
    return max(ok, key=lambda r: r["images_per_s"], default=None)


# ------------------------------------------------------------------------------------------- output

def device_facts(device: torch.device) -> dict:
    import timm

    facts = {"torch": torch.__version__, "timm": timm.__version__, "cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
             # fp32 rows: convolutions may use TF32 (cudnn.allow_tf32), matmuls only if this says so
             "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
             "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    if device.type == "cuda":
        facts["name"] = torch.cuda.get_device_name(0)
        facts["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        facts["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
            facts["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
            facts["driver"] = smi.stdout.split(",")[1].strip() if smi.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, IndexError) as exc:
            facts["nvidia_smi"] = f"unavailable ({type(exc).__name__})"
        if not facts.get("driver"):
            facts["driver"] = f"unknown (CUDA runtime {torch.version.cuda})"
    else:
        facts["name"], facts["capability"], facts["driver"] = "cpu", None, None
    return facts


def machine() -> dict:
    try:
        from common import machine_info

        return machine_info()
    except Exception as exc:  # numpy missing: the facts that matter are in "device" anyway
        return {"error": f"benchmarks/common.machine_info failed: {type(exc).__name__}: {exc}"}


def summary(rows: list[dict]) -> dict:
    best = {}
    for model in CEILING_MODELS:
        r = best_row(rows, model)
        if r:
            best[model] = {k: r[k] for k in ("batch", "dtype", "channels_last", "cudnn_benchmark", "compiled",
                                             "images_per_s", "step_ms")}
    shares, eager_shares = {}, {}
    ref, ref_eager = best_row(rows, REFERENCE), best_row(rows, REFERENCE, compiled=False)
    for s in STUDENTS:
        r, e = best_row(rows, s), best_row(rows, s, compiled=False)
        if r and ref:
            shares[s] = round(100 * r["images_per_s"] / ref["images_per_s"], 1)
        if e and ref_eager:
            eager_shares[s] = round(100 * e["images_per_s"] / ref_eager["images_per_s"], 1)
    compile_gain = {}
    for r in rows:
        if r["compiled"] and r.get("status") == "ok":
            eager = next((e for e in rows if e.get("status") == "ok" and key(e) == key({**r, "compiled": False})), None)
            if eager:
                compile_gain[r["model"]] = round(r["images_per_s"] / eager["images_per_s"], 2)
    return {"best": best, "share_of_resnet18_best_pct": shares, "share_of_resnet18_best_eager_pct": eager_shares,
            "goal": f"each student's best img/s >= {GOAL_SHARE_PCT:.0f} % of ResNet-18's best",
            "goal_met": {s: v >= GOAL_SHARE_PCT for s, v in shares.items()},
            "compile_speedup_vs_same_config_eager": compile_gain}


class Results:
    """The JSON document, rewritten (atomically) after every row."""

    def __init__(self, path: Path, head: dict):
        self.path, self.doc = path, {**head, "rows": [], "finished": False}

    @property
    def rows(self) -> list[dict]:
        return self.doc["rows"]

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.save()
        print(fmt_row(row), flush=True)

    def save(self, finished: bool = False) -> None:
        self.doc.update(elapsed_s=round(time.perf_counter() - T0, 1), finished=finished, summary=summary(self.rows))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.doc, indent=2))
        os.replace(tmp, self.path)  # a kill mid-write leaves the previous complete file


HEADER = (f"{'phase':<12}{'model':<23}{'px':>4}{'batch':>6} {'dtype':<5}{'CL':<3}{'bm':<3}{'cmp':<4}"
          f"{'img/s':>9}{'step ms':>9}{'peak MiB':>10}{'compile s':>10}  status")


def fmt_row(r: dict) -> str:
    def num(k, f):
        return format(r[k], f) if r.get(k) is not None else "-"
    yn = {True: "y", False: "n"}
    status = r.get("status", "")
    if r.get("reason"):
        status += f": {r['reason']}"
    return (f"{r.get('phase', ''):<12}{r['model']:<23}{r['image_size']:>4}{r['batch']:>6} {r['dtype']:<5}"
            f"{yn[r['channels_last']]:<3}{yn[r['cudnn_benchmark']]:<3}{yn[r['compiled']]:<4}"
            f"{num('images_per_s', '9.1f'):>9}{num('step_ms', '9.2f'):>9}{num('peak_mem_mib', '10.0f'):>10}"
            f"{num('compile_s', '10.1f'):>10}  {status}")


def print_table(res: Results) -> None:
    print("\n" + HEADER)
    for r in res.rows:
        print(fmt_row(r))
    s = summary(res.rows)
    print("\nbest configuration per model:")
    for model, b in s["best"].items():
        print(f"  {model:<23}{b['images_per_s']:>9.1f} img/s  batch {b['batch']} {b['dtype']} "
              f"channels_last={b['channels_last']} cudnn.benchmark={b['cudnn_benchmark']} compiled={b['compiled']}")
    for st in STUDENTS:
        share, eager = s["share_of_resnet18_best_pct"].get(st), s["share_of_resnet18_best_eager_pct"].get(st)
        if share is None:
            print(f"  {st}: no share (a best row is missing)")
            continue
        print(f"  {st} best = {share:.1f} % of ResNet-18's best (eager only: {eager} %); goal >= {GOAL_SHARE_PCT:.0f} %: "
              f"{'met' if share >= GOAL_SHARE_PCT else 'not met'}")
    for model, g in s["compile_speedup_vs_same_config_eager"].items():
        print(f"  torch.compile {model}: {g}x the same configuration in eager mode")


# ------------------------------------------------------------------------------------ compile rows

def compile_in_subprocess(cfg: dict, args, cap_s: float) -> dict:
    """Run one compile measurement in its own process group, killed at ``cap_s``: a compile cannot be
    interrupted from Python, and inductor's compile workers must go with it. The child writes its row to a
    file as soon as it has compiled, and again when it has measured."""
    with tempfile.TemporaryDirectory() as tmp:
        row_file, log_file = Path(tmp) / "row.json", Path(tmp) / "log.txt"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg), "--child-row", str(row_file),
               "--child-deadline-s", str(cap_s), "--compile-backend", args.compile_backend]
        if args.smoke:
            cmd.append("--smoke")
        t = time.perf_counter()
        with open(log_file, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=cap_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the group this call created: the child and its workers
                proc.wait()
                rc = None
        wall = round(time.perf_counter() - t, 1)
        row = json.loads(row_file.read_text()) if row_file.exists() else {}
        tail = log_file.read_text(errors="replace")[-1500:]
    row["process_wall_s"] = wall
    if rc is None:
        row["status"] = "timeout"
        row["reason"] = (f"killed at the {cap_s:.0f} s cap "
                         + ("after compiling, while measuring" if "compile_s" in row else "while compiling"))
        row["log_tail"] = tail
    elif rc != 0 or row.get("status") != "ok":
        row["status"] = "error"
        row["reason"] = row.get("reason") or f"child exit code {rc}"
        row["log_tail"] = tail
    return row


def child_main(args) -> None:
    """The compile measurement inside the subprocess: writes its row to --child-row."""
    cfg = json.loads(args.child)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    row_file = Path(args.child_row)
    # Close the measurement before the parent's kill (the parent's clock started a little earlier).
    deadline = T0 + args.child_deadline_s - (1.0 if args.smoke else 4.0)

    def write(partial: dict) -> None:
        tmp = row_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(partial))
        os.replace(tmp, row_file)

    build, _ = model_builder()
    warmup, steps, cap = steps_for(args)
    holder = {}

    def on_compiled(partial: dict) -> None:
        holder.update(partial)
        write(partial)

    try:
        out = measure(cfg, build, device, warmup, steps, cap, backend=args.compile_backend, on_compiled=on_compiled,
                      deadline=deadline)
        if time.perf_counter() > deadline:
            out["note"] = "finished after the cap"
    except Exception as exc:
        out = {**holder, "status": "error", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
    write(out)


def steps_for(args) -> tuple[int, int, float]:
    """(warm-up steps, most timed steps, timed-window cap in seconds)."""
    return (1, 2, 1.0) if args.smoke else (3, 20, 4.0)


# ------------------------------------------------------------------------------------------------ main

def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, 32 px, batch 4, tiny grid, dynamo-only compile")
    ap.add_argument("--budget-s", type=float, default=None, help="wall-time budget of the whole run (default 420; smoke 50)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/gpu_suite.json)")
    ap.add_argument("--no-compile", action="store_true", help="skip part 3")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; smoke: eager)")
    ap.add_argument("--compile-cap-s", type=float, nargs=2, default=None, metavar=("MOBILENET", "DENSENET"),
                    help="per-compile caps in seconds (default 100 300), each further bounded by the budget left")
    # the compile subprocess
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-row", help=argparse.SUPPRESS)
    ap.add_argument("--child-deadline-s", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.compile_backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    return args


def main() -> None:
    args = parse()
    if args.smoke:
        # The rehearsal runs on a small CPU shared with other jobs, where torch's threads spin against them
        # (10-50x slower steps here); one thread keeps it to seconds. The device run is unaffected.
        torch.set_num_threads(1)
    if args.child:
        child_main(args)
        return
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_suite: no CUDA device here (torch.cuda.is_available() is False). This suite is for the GPU "
                 "machine; on a CPU run `python benchmarks/gpu_suite.py --smoke` to rehearse it.")
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    budget = args.budget_s or (50.0 if smoke else 420.0)
    size, batch = (32, 4) if smoke else (224, 256)
    warmup, steps, timed_cap = steps_for(args)
    # What a row is assumed to need before it starts (model build + warm-up + timed window): a row is skipped
    # when it would eat into the time kept for part 3.
    row_need = 4.0 if smoke else 12.0
    compile_models = ["mobilenetv3_small_100"] if smoke else ["mobilenetv3_small_100", "densenet121"]
    compile_caps = dict(zip(["mobilenetv3_small_100", "densenet121"], args.compile_cap_s or ((25.0, 25.0) if smoke else (100.0, 300.0))))
    min_compile = 15.0 if smoke else 45.0
    compile_reserve = 0.0 if args.no_compile else (20.0 if smoke else 150.0)
    margin = 3.0 if smoke else 8.0  # the table and the last write
    # The watchdog: if a CUDA call hangs, dump the stacks and exit; the JSON holds every finished row.
    watchdog = budget + (20 if smoke else 60)
    faulthandler.dump_traceback_later(max(1.0, watchdog - (time.perf_counter() - T0)), exit=True)

    build, source = model_builder()
    out = args.out or HERE / "results" / f"gpu_suite{'.smoke' if smoke else ''}.json"
    res = Results(out, {
        "machine": machine(), "device": device_facts(device), "smoke": smoke,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model_builder": source,
        "setup": {"input": f"(N, 1, S, S) random on the device, S = {size}", "num_classes": NUM_LABELS,
                  "loss": "binary_cross_entropy_with_logits (fp32 logits)", "optimizer": "AdamW(lr=1e-4), foreach default",
                  "dtypes": "bf16/fp16 = torch.autocast (fp16 with GradScaler, which skips the steps it finds inf in), "
                            "fp32 = no autocast (convolutions may use TF32, see device.cudnn_allow_tf32)",
                  "base_batch": batch, "large_batch": 2 * batch,
                  "ceiling_config": "bf16 autocast, channels_last, cudnn.benchmark off (fedxr's training settings)",
                  "compile": f"torch.compile(model, backend={args.compile_backend!r}) default mode, ceiling config, "
                             "own process; compile_s = the first step's wall time"},
        "caps": {"budget_s": budget, "warmup_steps": warmup, "timed_steps_max": steps, "timed_window_cap_s": timed_cap,
                 "row_need_s": row_need, "compile_reserve_s": compile_reserve, "compile_caps_s": compile_caps,
                 "min_compile_s": min_compile, "final_margin_s": margin, "watchdog_s": watchdog},
    })

    def left() -> float:
        return budget - (time.perf_counter() - T0)

    done: set[tuple] = set()

    def run_row(cfg: dict, phase: str) -> None:
        if key(cfg) in done:
            return
        done.add(key(cfg))
        row = {"phase": phase, **cfg}
        if left() - compile_reserve - margin < row_need:
            row.update(status="skipped", reason=f"budget: {left():.0f} s left, {compile_reserve:.0f} s kept for torch.compile")
        else:
            try:
                row.update(measure(cfg, build, device, warmup, steps, timed_cap))
            except Exception as exc:  # an OOM or an unsupported kernel: record it and go on
                row.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
        res.add(row)

    print(f"gpu_suite on {res.doc['device']['name']} ({source}); budget {budget:.0f} s, {left():.0f} s left after imports")
    print(HEADER, flush=True)
    # 1. ceilings
    for model in CEILING_MODELS:
        run_row(config(model, size, batch, "bf16", True, False), "ceiling")
    # 2. the grid, then each model's best configuration at twice the batch
    for cfg in grid(smoke, size, batch):
        run_row(cfg, "grid")
    for model in ["mobilenetv3_small_100", "resnet18_quarter", REFERENCE]:
        b = best_row(res.rows, model, batch=batch, compiled=False)
        if b:
            run_row(config(model, size, 2 * batch, b["dtype"], b["channels_last"], b["cudnn_benchmark"]), "large_batch")
    free_memory(device)
    # 3. torch.compile, each in its own process under a timeout
    for model in compile_models:
        cfg = config(model, size, batch, "bf16", True, False, compiled=True)
        row = {"phase": "compile", **cfg}
        cap = min(compile_caps[model], left() - margin)
        if args.no_compile:
            row.update(status="skipped", reason="--no-compile")
        elif cap < min_compile:
            row.update(status="skipped", reason=f"budget: {left():.0f} s left, a compile needs >= {min_compile:.0f} s")
        else:
            row.update(compile_in_subprocess(cfg, args, cap), compile_cap_s=round(cap, 1), phase="compile", **cfg)
        res.add(row)
    faulthandler.cancel_dump_traceback_later()
    res.save(finished=True)
    print_table(res)
    print(f"\nwrote {out} in {time.perf_counter() - T0:.0f} s (budget {budget:.0f} s)")


if __name__ == "__main__":
    main()
