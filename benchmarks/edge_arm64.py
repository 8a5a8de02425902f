"""ARM64 check without a board: the edge runtime on an emulated aarch64 Debian, against this machine.

    python benchmarks/edge_arm64.py                    # the quickstart student of `make demo`, real NIH images
    python benchmarks/edge_arm64.py --checkpoint CKPT --data SITES_DIR

What it does (as root, on Linux x86_64):
1. Makes an arm64 Debian root with `debootstrap` (Debian's package), run under `qemu-user-static` (binfmt_misc
   registration with the F flag, so the emulator needs no copy inside the root), and installs into a venv
   there, with pip, the aarch64 wheels of onnxruntime, numpy, Pillow and pydicom at the versions this
   machine runs. The root is cached (``--cache``, default ``~/.cache/fedxr/arm64``) and reused while the
   versions match; the first build takes about 3 minutes, later runs reuse it.
2. Exports the checkpoint for every target (laptop, board, mobile) here, installs the fedxr wheel built from
   this checkout into the root, and runs ``python -m fedxr.edge predict MODEL IMAGES --json`` inside it for
   every exported file, on the real NIH PNGs and a 12-bit DICOM made from one, once per emulated CPU
   (``--cpu``; default Cortex-A76 = Raspberry Pi 5 and Cortex-A53 = Raspberry Pi 3 / Zero 2 W, which lacks the
   dot-product instructions onnxruntime's INT8 kernels use where present).
3. Compares every probability with the same command on this machine: the check passes when all agree within
   ``--tolerance`` (1e-4) and no input failed. Versions used are recorded in ``results/edge_arm64.json``.

No latency is measured or reported: time under emulation says nothing about a board.
Emulation detail: qemu 7.2 does not emulate ``/proc/cpuinfo`` for aarch64 and the host's is x86's, which
onnxruntime's cpuinfo cannot parse (with /proc and /sys mounted it crashes, without them it falls back to
generic kernels). The root therefore gets a ``/proc/cpuinfo`` and ``/sys/devices/system/cpu/{possible,present}``
describing the emulated core, so onnxruntime picks that core's kernels as it would on the board.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
#: What `pip install fedxr` needs on the board, pinned to this machine's versions so both run the same code.
EDGE_PACKAGES = ("onnxruntime", "numpy", "Pillow", "pydicom")
VENV = "/opt/edge"  # inside the root
#: Emulated cores: qemu's CPU model → what /proc/cpuinfo says on such a board (part number, variant, features).
CPUS = {
    "cortex-a76": ("0xd0b", "0x4", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                                   "asimdrdm lrcpc dcpop asimddp", "Raspberry Pi 5 (Cortex-A76, with dot product)"),
    "cortex-a72": ("0xd08", "0x0", "fp asimd evtstrm crc32 cpuid", "Raspberry Pi 4 (Cortex-A72)"),
    "cortex-a53": ("0xd03", "0x4", "fp asimd evtstrm crc32 cpuid", "Raspberry Pi 3 / Zero 2 W (Cortex-A53)"),
}
QUICKSTART_STUDENT = REPO / "runs" / "quickstart" / "distill" / "resnet18_quarter" / "global_best.ckpt"
SHARED_NIH = (REPO / ".." / "shared" / "data" / "nih").resolve()


def sh(cmd: list[str], what: str, timeout: int = 1800, **kw) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{what} did not finish within {timeout} s: {' '.join(cmd)}") from None
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{(proc.stderr or proc.stdout)[-3000:]}")
    return proc


def host_tools() -> None:
    """debootstrap and qemu-user-static, installed from Debian's packages when missing (needs root)."""
    if os.geteuid() != 0:
        raise SystemExit("the ARM64 check needs root (debootstrap, chroot and binfmt_misc); run it as root")
    if not shutil.which("debootstrap") or not shutil.which("qemu-aarch64-static"):
        print("installing Debian's debootstrap and qemu-user-static ...", flush=True)
        proc = subprocess.run(["apt-get", "install", "-y", "debootstrap", "qemu-user-static"], capture_output=True, text=True)
        if proc.returncode != 0:
            sh(["apt-get", "update"], "apt-get update")
            sh(["apt-get", "install", "-y", "debootstrap", "qemu-user-static"], "apt-get install debootstrap qemu-user-static")


def binfmt() -> str:
    """Register qemu-aarch64 with binfmt_misc (F flag: the kernel keeps the emulator open, so it works in a
    chroot) unless it already is; returns the registration. The registration is the kernel's, for every
    process of this machine, and stays after the run (`echo -1 > /proc/sys/fs/binfmt_misc/qemu-aarch64`
    removes it) — as installing Debian's qemu-user-static on a normal system does."""
    base = Path("/proc/sys/fs/binfmt_misc")
    if not (base / "status").exists():
        sh(["mount", "-t", "binfmt_misc", "binfmt_misc", str(base)], "mounting binfmt_misc")
    entry = base / "qemu-aarch64"
    if not entry.exists():
        conf = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
        if not conf.is_file():
            raise SystemExit(f"{conf} not found: install Debian's qemu-user-static")
        (base / "register").write_text(conf.read_text().strip())
    text = entry.read_text()
    if not text.startswith("enabled"):
        raise SystemExit(f"{entry} is registered but disabled; enable it: echo 1 > {entry}")
    flags = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("flags:")), "")
    if "F" not in flags:
        raise SystemExit(f"{entry} is registered without the F flag ({flags!r}); the emulator cannot run inside a chroot")
    return text


def edge_pins() -> list[str]:
    return [f"{p}=={version(p)}" for p in EDGE_PACKAGES]


def mounts_under(folder: Path) -> list[str]:
    """Mount points inside ``folder`` (a debootstrap killed part-way leaves its /proc and /sys mounted)."""
    base = str(folder.resolve())
    points = [line.split()[4].replace("\\040", " ") for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [m for m in points if m == base or m.startswith(base + "/")]


def ensure_root(cache: Path) -> Path:
    """The cached arm64 root with the edge packages, built when missing or when the pinned versions changed."""
    root, marker = cache / "root", cache / "root" / ".fedxr-root.json"
    pins = edge_pins()
    if marker.is_file() and json.loads(marker.read_text()).get("pins") == pins:
        return root
    if not (root / "usr" / "bin" / "python3").exists():
        partial = cache / "root.partial"
        if mounts_under(cache):  # never delete through a mount into the host's /proc, /sys or /dev
            raise SystemExit(f"file systems are mounted under {cache}: {mounts_under(cache)}; unmount them "
                             "(umount -R PATH) and run again")
        shutil.rmtree(partial, ignore_errors=True)
        cache.mkdir(parents=True, exist_ok=True)
        print(f"debootstrap {SUITE} arm64 into {partial} (about 2 minutes) ...", flush=True)
        sh(["debootstrap", "--arch=arm64", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
            SUITE, str(partial), MIRROR], "debootstrap")
        if mounts_under(partial):
            raise SystemExit(f"debootstrap left file systems mounted under {partial}: {mounts_under(partial)}")
        partial.rename(root)
    # pip inside the root reaches PyPI through this machine's resolver and certificate authorities.
    shutil.copy2("/etc/resolv.conf", root / "etc" / "resolv.conf")
    shutil.copy2("/etc/ssl/certs/ca-certificates.crt", root / "etc" / "ssl" / "certs" / "ca-certificates.crt")
    if not (root / VENV.lstrip("/") / "bin" / "python").exists():
        sh(["chroot", str(root), "/usr/bin/python3", "-m", "venv", VENV], "python3 -m venv inside the root")
    print(f"pip install {' '.join(pins)} (aarch64 wheels) ...", flush=True)
    sh(["chroot", str(root), "/usr/bin/env", "PIP_CERT=/etc/ssl/certs/ca-certificates.crt", f"{VENV}/bin/pip",
        "install", "--no-cache-dir", "--disable-pip-version-check", *pins], "pip install inside the root")
    marker.write_text(json.dumps({"pins": pins}))
    return root


def set_cpu(root: Path, cpu: str) -> None:
    """What the emulated board's /proc/cpuinfo and CPU lists say (plain files: nothing is mounted)."""
    part, variant, features, _ = CPUS[cpu]
    proc, cpus = root / "proc", root / "sys" / "devices" / "system" / "cpu"
    if os.path.ismount(proc) or os.path.ismount(root / "sys"):
        raise SystemExit(f"{proc} or {root / 'sys'} is a mount point; unmount it (the check writes plain files there)")
    proc.mkdir(exist_ok=True)
    cpus.mkdir(parents=True, exist_ok=True)
    (proc / "cpuinfo").write_text("".join(
        f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
        f"CPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: 1\n\n" for i in range(2)))
    for name in ("possible", "present", "online"):
        (cpus / name).write_text("0-1\n")


def install_fedxr(root: Path) -> str:
    """This checkout's fedxr wheel (pure Python) into the root's venv, without dependencies: the edge needs
    only the pinned packages already there."""
    with tempfile.TemporaryDirectory() as tmp:
        sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO), "-w", tmp],
           "building the fedxr wheel")
        wheel = next(Path(tmp).glob("fedxr-*.whl"))
        shutil.copy2(wheel, root / "tmp" / wheel.name)
    sh(["chroot", str(root), f"{VENV}/bin/pip", "install", "-q", "--no-deps", "--force-reinstall",
        "--disable-pip-version-check", f"/tmp/{wheel.name}"], "pip install fedxr inside the root")
    (root / "tmp" / wheel.name).unlink()
    return wheel.name


def arm_versions(root: Path) -> dict:
    code = ("import json, platform, sys; from importlib.metadata import version as v; "
            f"print(json.dumps({{'machine': platform.machine(), 'python': platform.python_version(), "
            f"**{{p: v(p) for p in {list(EDGE_PACKAGES) + ['fedxr']!r}}}}}))")
    out = sh(["chroot", str(root), f"{VENV}/bin/python", "-c", code], "reading versions inside the root").stdout
    info = json.loads(out.strip().splitlines()[-1])
    info["debian"] = (root / "etc" / "debian_version").read_text().strip()
    info["qemu"] = sh(["qemu-aarch64-static", "--version"], "qemu version").stdout.splitlines()[0]
    return info


def predict(cmd_prefix: list[str], model: str, images: list[str], env: dict | None = None) -> dict[str, dict]:
    proc = subprocess.run([*cmd_prefix, "-m", "fedxr.edge", "predict", model, *images, "--json"], capture_output=True,
                          text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        return {"_error": {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}}
    return {Path(r["input"]).name: r for r in json.loads(proc.stdout)}


def max_difference(a: dict[str, dict], b: dict[str, dict]) -> tuple[float, list[str]]:
    """Largest |probability difference| over images and labels, and every problem found."""
    problems = [f"{k}: {r['error']}" for side in (a, b) for k, r in side.items() if r.get("error")]
    if set(a) != set(b):
        problems.append(f"different inputs: {sorted(set(a) ^ set(b))}")
    worst = 0.0
    for k in set(a) & set(b):
        if not a[k].get("error") and not b[k].get("error"):
            worst = max(worst, max(abs(a[k]["probabilities"][l] - b[k]["probabilities"][l]) for l in a[k]["probabilities"]))
    return worst, problems


def input_images(work: Path, sources: list[Path]) -> list[Path]:
    """The real NIH PNGs and a 12-bit DICOM (MONOCHROME2, with a window) made from the first."""
    from fedxr.data.dicom import write_dicom

    work.mkdir(parents=True, exist_ok=True)
    out = []
    for s in sources:
        out.append(Path(shutil.copy2(s, work / s.name)))
    gray = np.asarray(Image.open(sources[0]).convert("L"), dtype=np.uint16) * 16
    out.append(write_dicom(work / f"{sources[0].stem}.dcm", gray, window=(2048, 4096)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=QUICKSTART_STUDENT,
                    help="fedxr checkpoint to export and check (default: the quickstart student of `make demo`)")
    ap.add_argument("--data", help="site manifests for the export's validation images (default: the checkpoint's run)")
    ap.add_argument("--images", type=Path, nargs="+", help="PNG/JPEG inputs (default: the real NIH PNGs in ../shared)")
    ap.add_argument("--cpu", nargs="+", choices=list(CPUS), default=["cortex-a76", "cortex-a53"])
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("FEDXR_ARM64_CACHE", "~/.cache/fedxr/arm64")).expanduser())
    ap.add_argument("--tolerance", type=float, default=1e-4)
    ap.add_argument("--smoke", action="store_true", help="write results/edge_arm64.smoke.json (tests)")
    args = ap.parse_args()
    if not args.checkpoint.is_file():
        raise SystemExit(f"{args.checkpoint}: checkpoint not found; run `make demo` first or pass --checkpoint")
    sources = args.images or sorted(SHARED_NIH.glob("*.png"))
    if not sources:
        raise SystemExit(f"no input images: {SHARED_NIH} has no PNGs; pass --images")

    host_tools()
    registration = binfmt()
    root = ensure_root(args.cache)
    wheel = install_fedxr(root)
    versions = arm_versions(root)
    print(f"arm64 root: {root} — {versions}", flush=True)

    from fedxr.export.exporter import export_checkpoint
    from fedxr.export.targets import TARGETS

    work = root / "work"  # seen as /work inside the root
    shutil.rmtree(work, ignore_errors=True)
    images = input_images(work / "images", sources)
    models: list[Path] = []
    for target in TARGETS:
        manifest = export_checkpoint(args.checkpoint, work / target, int8="on", data=args.data, target=target)
        if not manifest["ok"]:
            raise SystemExit(f"export for {target} failed its checks: {work / target / 'manifest.json'}")
        models += [work / target / f["file"] for f in manifest["files"] if f["kept"]]

    inside = lambda p: "/" + str(p.relative_to(root))  # noqa: E731
    rows, ok, arm_results = [], True, {}
    for model in models:
        x86 = predict([sys.executable], str(model), [str(i) for i in images])
        for cpu in args.cpu:
            set_cpu(root, cpu)
            env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "QEMU_CPU": cpu}
            arm = arm_results[model.name, model.parent.name, cpu] = predict(
                ["chroot", str(root), f"{VENV}/bin/python"], inside(model), [inside(i) for i in images], env)
            worst, problems = max_difference(x86, arm)
            passed = not problems and worst <= args.tolerance
            ok &= passed
            rows.append({"file": f"{model.parent.name}/{model.name}", "cpu": cpu, "board": CPUS[cpu][3],
                         "images": len(images), "max_abs_probability_difference": worst, "passed": passed,
                         "problems": problems})
            print(f"{rows[-1]['file']:<44} {cpu:<11} max |Δp| {worst:.2e}  {'PASS' if passed else 'FAIL ' + '; '.join(problems)}",
                  flush=True)
    # A control: the comparison does see a difference where there is one (FP32 against INT8 on the same core).
    fp32, int8 = (next(m.name for m in models if m.parent.name == "laptop" and m.name.endswith(f"_{k}.onnx"))
                  for k in ("fp32", "int8"))
    control = {cpu: max_difference(arm_results[fp32, "laptop", cpu], arm_results[int8, "laptop", cpu])[0] for cpu in args.cpu}
    print(f"control, FP32 vs INT8 on the same emulated core: max |Δp| {control}", flush=True)
    result = {"ok": ok, "control_fp32_vs_int8_max_abs_difference": control, "tolerance": args.tolerance, "checkpoint": str(args.checkpoint),
              "inputs": [i.name for i in images], "arm64": versions, "fedxr_wheel": wheel,
              "host": {"machine": platform.machine(), **{p: version(p) for p in EDGE_PACKAGES}},
              "binfmt": registration.splitlines()[:3], "rows": rows,
              "latency": "not measured: time under emulation says nothing about a board"}
    print(f"{sum(r['passed'] for r in rows)}/{len(rows)} model x CPU checks passed; "
          f"wrote {write_result('edge_arm64', result, smoke=args.smoke)}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
