"""The one-shot GPU check: every GPU-only measurement in one short device run.

    bench/gpu_check.sh                  # on the lent GPU (installs the carried wheels first)
    bench/gpu_check.sh --dry-run        # the same parts on the CPU with the tiny presets

A lent GPU comes by chance, with 15 minutes of device time, starts included, and 10 minutes per
command. So the check is one command with a total budget (7 minutes by default, leaving time for a
rerun). It runs its parts in order of importance, each in its own process group under its own
timeout, which is the smaller of the part's cap and what is left of the budget; a part that
cannot get its minimum is skipped and said so. A hang loses only that part. After every part, the
results so far are packed into one tarball under ``--out`` (``$OUT`` on the device), so they come
back even when a later part or the whole command is killed.

Parts (names for ``--parts``):

1. ``cuda-tests``: every test marked ``cuda`` (tests/conftest.py marks each test skipped for want
   of a GPU): graph capture and replay, host syncs, LoRA under graphs, inference mode.
2. ``headline``: SD 1.5 architecture, 512x512, batch 1, 50 steps, fp16: eager, torch.compile
   alone (``reduce-overhead``, its fastest full step short of max-autotune), DeepCache and
   fastcache I3B0 in one ``bench run``: medians of 3 runs, refresh/cached step times, each step
   against the floor, peak reserved memory, images compared.
3. ``profile``: fastcache's refresh and cached step under the torch profiler (bench.profile):
   kernel time by category, top kernels, launch gaps.
4. ``tgate``: issue 16's GPU target, ``bench paired`` at the headline's setup: fastcache I3B0
   alone, with TGATE from step 20, and the tgate package, called in turn (5 rounds).
5. ``batch4``, then ``sdxl`` (1024x1024, batch 1): if time is left.
6. ``restart`` (only when named in ``--parts``): cold start against a restart with the compile
   cache on disk (``bench warm-restart``).

``summary.md`` / ``summary.json`` put each part's status beside the issue's targets.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, TextIO
from xml.etree import ElementTree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PARTS = ("cuda-tests", "headline", "profile", "tgate", "batch4", "sdxl")
ALL_PARTS = DEFAULT_PARTS + ("restart",)
# Seconds kept back at the end of the budget for the last packing and the summary.
RESERVE_S = 10.0


@dataclass(frozen=True)
class Part:
    """One step of the check: a command, the most time it may take, and the least worth starting."""

    name: str
    title: str
    command: tuple[str, ...]
    cap_s: float
    min_s: float


@dataclass
class PartResult:
    name: str
    title: str
    status: str  # "ok", "failed" (non-zero exit), "timeout" (killed), "skipped" (no time left)
    seconds: float
    returncode: int | None
    timeout_s: float | None
    command: str
    note: str = ""


def bench_run_args(preset: str, res: int | None, batch: int, steps: int, runs: int, extra: list[str]) -> list[str]:
    args = ["-m", "bench", "run", "--preset", preset, "--batch", str(batch), "--steps", str(steps),
            "--configs", "I3B0", "--runs", str(runs), "--step-calls", str(runs), "--restart", "none"]
    if res is not None:
        args += ["--res", str(res)]
    return args + extra


def make_parts(dry_run: bool, python: str, workdir: str, cache_dir: str) -> dict[str, Part]:
    """Every part's command. The dry run keeps each command's shape (same subcommands, same
    flags) and swaps only what makes it a CPU minute: tiny presets, 2 steps, 1 run, dynamo's
    eager backend."""
    out = lambda name: ["--out", os.path.join(workdir, name)]  # noqa: E731
    cached = ["--cache-dir", cache_dir]
    if dry_run:
        sd, sd_res, sdxl, sdxl_res, steps, runs = "tiny", None, "tiny-sdxl", None, 2, 1
        compile_flags = ["--compile-backend", "eager"]
        profile_flags = ["--backend", "eager"]
    else:
        sd, sd_res, sdxl, sdxl_res, steps, runs = "sd15", 512, "sdxl", 1024, 50, 3
        compile_flags = ["--compile-mode", "reduce-overhead"]
        profile_flags = []
    pytest = [python, "-m", "pytest", "-q", "-rs", "-m", "cuda", "-p", "no:cacheprovider", "tests",
              "--junitxml", os.path.join(workdir, "cuda-tests", "junit.xml")]
    if not dry_run and importlib.util.find_spec("xdist") is not None:
        # The device has pytest-xdist and 16 cores: the CUDA tests' inductor compiles of the tiny
        # U-Nets run 4 at a time (each worker its own process, CUDA context and allocator).
        pytest += ["-n", "4"]
    profile = [python, "-m", "bench.profile", "--preset", sd, "--batch", "1", "--steps", str(steps),
               "--configs", "I3B0", "--methods", "fastcache", "--runs", str(runs), *profile_flags, *out("profile")]
    if sd_res is not None:
        profile += ["--res", str(sd_res)]
    gate = 1 if dry_run else 20  # 40% of the steps, as the package's default 10 of 25
    tgate = [python, "-m", "bench", "paired", "--preset", sd, "--steps", str(steps), "--rounds", str(2 if dry_run else 5),
             "--methods", f"fastcache:I3B0,fastcache:I3B0G{gate},tgate:I3B0G{gate}",
             *(["--compile-backend", "eager"] if dry_run else []), *out("tgate")]
    if sd_res is not None:
        tgate += ["--res", str(sd_res)]
    restart = [python, "-m", "bench", "warm-restart", "--preset", sd, "--steps", str(steps), "--runs", "1",
               *out("restart")]
    if sd_res is not None:
        restart += ["--res", str(sd_res)]
    parts = [
        Part("cuda-tests", "CUDA tests (pytest -m cuda)", tuple(pytest), 180, 40),
        Part("headline", f"{sd} {sd_res or 'default'} b1 {steps} steps: eager / compile / DeepCache / fastcache I3B0",
             (python, *bench_run_args(sd, sd_res, 1, steps, runs, compile_flags + cached + out("headline"))), 300, 120),
        Part("profile", "profile of one refresh and one cached step (fastcache I3B0)", tuple(profile), 120, 40),
        Part("tgate", f"{sd} b1 {steps} steps, paired: fastcache I3B0 alone, with TGATE G{gate}, the tgate package",
             tuple(tgate), 300, 150),
        Part("batch4", f"{sd} b4: the same four methods",
             (python, *bench_run_args(sd, sd_res, 4, steps, runs, compile_flags + cached + out("batch4"))), 300, 150),
        Part("sdxl", f"{sdxl} {sdxl_res or 'default'} b1: the same four methods",
             (python, *bench_run_args(sdxl, sdxl_res, 1, steps, runs, compile_flags + cached + out("sdxl"))), 400, 200),
        Part("restart", "cold start vs restart with the compile cache on disk", tuple(restart), 500, 200),
    ]
    return {part.name: part for part in parts}


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGINT the part's own process first (pytest takes it as Ctrl+C and still writes its junit
    file with the tests run so far), then SIGTERM its whole process group (pytest's and
    inductor's workers too, also when the part's process is gone already), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=15.0)
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if process.poll() is not None and not _group_alive(process.pid):
                return
            time.sleep(0.05)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def run_part(part: Part, timeout_s: float, env: dict[str, str], part_log: str, echo: TextIO) -> tuple[str, int | None]:
    """Run `part` in a new process group, its output to `part_log` and `echo` line by line;
    killed after `timeout_s`. Returns (status, returncode)."""
    os.makedirs(os.path.dirname(part_log), exist_ok=True)
    with open(part_log, "wb") as log:
        process = subprocess.Popen(part.command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        assert process.stdout is not None

        def copy_output() -> None:
            for line in iter(process.stdout.readline, b""):  # type: ignore[union-attr]
                log.write(line)
                log.flush()
                echo.write(f"  [{part.name}] " + line.decode(errors="replace"))
                echo.flush()

        reader = threading.Thread(target=copy_output, daemon=True)
        reader.start()
        try:
            returncode = process.wait(timeout=timeout_s)
            status = "ok" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(process)
            returncode, status = None, "timeout"
        reader.join(timeout=5)
    return status, returncode


def _keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Sample images of the headline only: a 1024x1024 image of random weights is ~3 MB of
    incompressible PNG, and the device returns files of at most 16 MB."""
    parts = info.name.split("/")
    samples = any(p.endswith("-samples") for p in parts[2:3])
    return None if samples and parts[1] != "headline" else info


def pack(workdir: str, tarball: str) -> None:
    """Everything under `workdir` into `tarball` (written beside it first, then renamed, so a
    kill mid-write leaves the previous complete tarball)."""
    os.makedirs(os.path.dirname(os.path.abspath(tarball)), exist_ok=True)
    partial = tarball + ".partial"
    with tarfile.open(partial, "w:gz") as archive:
        archive.add(workdir, arcname=os.path.basename(workdir.rstrip("/")), filter=_keep)
    os.replace(partial, tarball)


def environment_report(python: str, env: dict[str, str]) -> str:
    """Versions, the GPU (``nvidia-smi -L``) and the CPU, as text for env.txt."""
    code = (
        "import importlib.metadata as m, platform, torch\n"
        "print('python', platform.python_version(), platform.platform())\n"
        "print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())\n"
        "if torch.cuda.is_available(): print('device', torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))\n"
        "for name in ('diffusers', 'transformers', 'triton', 'DeepCache', 'peft', 'numpy'):\n"
        "    try: print(name, m.version(name))\n"
        "    except m.PackageNotFoundError: print(name, 'not installed')\n"
    )
    lines = []
    for command in ([python, "-c", code], ["nvidia-smi", "-L"], ["git", "rev-parse", "HEAD"]):
        try:
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
            lines.append(f"$ {shlex.join(command[:2])}\n{done.stdout}{done.stderr}".rstrip())
        except (OSError, subprocess.TimeoutExpired) as error:
            lines.append(f"$ {shlex.join(command[:2])}\nnot available: {error}")
    return "\n".join(lines) + "\n"


# -- the summary: each part's status beside the targets -----------------------------------
def _latest_json(folder: str) -> dict[str, Any] | None:
    """The result file `bench run` wrote in `folder` (its timestamped JSON)."""
    if not os.path.isdir(folder):
        return None
    names = sorted(n for n in os.listdir(folder) if n.endswith(".json") and not n.startswith("latest-"))
    if not names:
        return None
    with open(os.path.join(folder, names[-1])) as handle:
        return json.load(handle)


def _median(stats: Any) -> float | None:
    return stats.get("median") if isinstance(stats, dict) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def _target(name: str, value: float | None, goal: str, met: Callable[[float], bool], unit: str = "") -> dict[str, Any]:
    return {"target": name, "goal": goal, "measured": value, "unit": unit,
            "met": None if value is None else bool(met(value))}


def shape_targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets read from one `bench run` result (its first shape)."""
    shape = result["shapes"][0]
    methods = {m["label"]: m for m in shape["methods"]}
    eager, compiled = methods.get("eager"), methods.get("compile")
    fast = next((m for label, m in methods.items() if label.startswith("fastcache")), None)
    agreement = shape["agreements"][0] if shape.get("agreements") else None
    steps = lambda m, kind: _median(m["steps"].get(kind)) if m else None  # noqa: E731
    reserved = lambda m: m and (m["peak_reserved_bytes"] or m["peak_allocated_bytes"])  # noqa: E731
    targets = [
        _target("end to end vs eager", fast and fast["speedup_end_to_end"], ">= 5x", lambda v: v >= 5, "x"),
        _target("end to end vs DeepCache", agreement and agreement["speedup_end_to_end"], ">= 2x",
                lambda v: v >= 2, "x"),
        _target("refresh step / compile's full step", _ratio(steps(fast, "refresh"), steps(compiled, "full")),
                "<= 1.1", lambda v: v <= 1.1),
        _target("cached step", (steps(fast, "cached") or 0) * 1e3 if steps(fast, "cached") else None, "< 1.0 ms",
                lambda v: v < 1.0, " ms"),
        _target("extra memory over eager", (_ratio(reserved(fast), reserved(eager)) or 1) * 100 - 100
                if reserved(fast) and reserved(eager) else None, "< 10%", lambda v: v < 10, "%"),
    ]
    floors = [
        {"method": s["method"], "refresh_or_full_x_floor": _ratio(s["full_or_refresh_s"], s["full_floor_s"]),
         "cached_x_floor": _ratio(s["cached_s"], s["shallow_floor_s"])}
        for s in (shape.get("floor") or {}).get("steps", [])
    ]
    images = None
    if agreement:
        q = agreement["fastcache_vs_deepcache"]
        images = {"fastcache_vs_deepcache_psnr_db": q["psnr"], "latent_rel_l2": q["latent_rel_l2"]}
    return {"shape": f"{shape['width']}x{shape['height']} b{shape['batch']}", "targets": targets,
            "x_floor": floors, "images": images,
            "device": result["meta"]["environment"].get("device_name")}


def tgate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 16's GPU targets from the `tgate` part's paired result: fastcache+TGATE >= 1.5x
    fastcache alone (median of per-round ratios), and faster than the tgate package."""
    def with_gate(kind: str) -> dict[str, Any] | None:  # labels are "<kind> I<i>B<b>[G<gate>]"
        return next((m for m in result["methods"] if m["label"].startswith(f"{kind} I") and "G" in m["label"]), None)

    gated, package = with_gate("fastcache"), with_gate("tgate")
    over_alone = gated["speedup"]["median"] if gated else None
    over_package = (package["seconds"]["median"] / gated["seconds"]["median"]) if gated and package else None
    return [
        {"target": "fastcache+TGATE over fastcache alone", "goal": ">= 1.5x", "measured": over_alone, "unit": "x",
         "met": None if over_alone is None else over_alone >= 1.5},
        {"target": "fastcache+TGATE over the tgate package (medians)", "goal": "> 1x", "measured": over_package,
         "unit": "x", "met": None if over_package is None else over_package > 1.0},
    ]


def junit_counts(path: str) -> dict[str, int] | None:
    """tests, failures, errors, skipped from pytest's junit XML."""
    if not os.path.exists(path):
        return None
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    return {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}


def summarise(workdir: str, results: list[PartResult], dry_run: bool, budget_s: float, started: float) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "dry_run": dry_run, "budget_s": budget_s, "total_s": round(time.time() - started, 1),
        "parts": [asdict(r) for r in results],
        "cuda_tests": junit_counts(os.path.join(workdir, "cuda-tests", "junit.xml")),
        "shapes": {},
    }
    for name in ("headline", "batch4", "sdxl"):
        result = _latest_json(os.path.join(workdir, name))
        if result is not None:
            summary["shapes"][name] = shape_targets(result)
    paired = _latest_json(os.path.join(workdir, "tgate"))
    summary["tgate"] = tgate_targets(paired) if paired is not None else None
    return summary


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}{unit}"
    return f"{value}{unit}"


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = ["# GPU check summary", ""]
    if summary["dry_run"]:
        lines += ["**Dry run**: the tiny presets on this machine's device, 2 steps, dynamo's eager backend. "
                  "The figures test the script, not fastcache's speed; the targets are for the GPU run.", ""]
    lines += [f"Budget {summary['budget_s']:.0f} s, took {summary['total_s']:.0f} s.", "",
              "| part | status | seconds | timeout s | note |", "|---|---|---|---|---|"]
    for part in summary["parts"]:
        lines.append(f"| {part['name']} | {part['status']} | {part['seconds']:.0f} | "
                     f"{_fmt(part['timeout_s'] and round(part['timeout_s']))} | {part['note']} |")
    counts = summary["cuda_tests"]
    if counts:
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        lines += ["", f"CUDA tests: {passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
                      f"{counts['skipped']} skipped (of {counts['tests']})."]
    for name, shape in summary["shapes"].items():
        lines += ["", f"## {name}: {shape['shape']} on {shape['device']}", "",
                  "| target | goal | measured | met |", "|---|---|---|---|"]
        for t in shape["targets"]:
            met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
            lines.append(f"| {t['target']} | {t['goal']} | {_fmt(t['measured'], t['unit'])} | {met} |")
        if shape["x_floor"]:
            lines += ["", "| method | refresh or full step x floor | cached step x floor |", "|---|---|---|"]
            lines += [f"| {f['method']} | {_fmt(f['refresh_or_full_x_floor'])} | {_fmt(f['cached_x_floor'])} |"
                      for f in shape["x_floor"]]
        if shape["images"]:
            lines += ["", f"fastcache vs DeepCache images: PSNR {_fmt(shape['images']['fastcache_vs_deepcache_psnr_db'])}"
                          f" dB, latent rel. L2 {_fmt(shape['images']['latent_rel_l2'])}."]
    if summary.get("tgate"):
        lines += ["", "## tgate: paired, fastcache I3B0 alone / with TGATE / the tgate package", "",
                  "| target | goal | measured | met |", "|---|---|---|---|"]
        for t in summary["tgate"]:
            met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
            lines.append(f"| {t['target']} | {t['goal']} | {_fmt(t['measured'], t['unit'])} | {met} |")
    return "\n".join(lines) + "\n"


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
    from .results import to_jsonable

    with open(os.path.join(workdir, "summary.json"), "w") as handle:
        json.dump(to_jsonable(summary), handle, indent=1, allow_nan=False)
    with open(os.path.join(workdir, "summary.md"), "w") as handle:
        handle.write(summary_markdown(summary))


# -- the driver -------------------------------------------------------------------------------------
def run_check(parts: list[Part], workdir: str, tarball: str, budget_s: float, env: dict[str, str],
              dry_run: bool, echo: TextIO = sys.stdout, environment: str | None = None) -> dict[str, Any]:
    """Run `parts` in order within `budget_s`, packing `workdir` into `tarball` after each."""
    started = time.time()
    deadline = started + budget_s - RESERVE_S
    os.makedirs(workdir, exist_ok=True)
    if environment is not None:
        with open(os.path.join(workdir, "env.txt"), "w") as handle:
            handle.write(environment)
        echo.write(environment)
    results: list[PartResult] = []
    for part in parts:
        left = deadline - time.time()
        timeout = min(part.cap_s, left)
        command = shlex.join(part.command)
        if timeout < part.min_s:
            note = f"{left:.0f} s left of the budget, needs at least {part.min_s:.0f} s"
            results.append(PartResult(part.name, part.title, "skipped", 0.0, None, None, command, note))
            echo.write(f"== {part.name}: skipped ({note})\n")
            continue
        echo.write(f"== {part.name}: {part.title} (timeout {timeout:.0f} s)\n$ {command}\n")
        echo.flush()
        start = time.time()
        status, returncode = run_part(part, timeout, env, os.path.join(workdir, part.name, "output.log"), echo)
        seconds = time.time() - start
        note = "killed at its timeout; its output so far is kept" if status == "timeout" else ""
        results.append(PartResult(part.name, part.title, status, round(seconds, 1), returncode, round(timeout, 1),
                                  command, note))
        echo.write(f"== {part.name}: {status} in {seconds:.0f} s\n")
        write_summary(workdir, summarise(workdir, results, dry_run, budget_s, started))
        pack(workdir, tarball)
    summary = summarise(workdir, results, dry_run, budget_s, started)
    write_summary(workdir, summary)
    pack(workdir, tarball)
    echo.write("\n" + summary_markdown(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="the same parts on this machine with the tiny presets (about a minute on a CPU)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole check (default: 420 on a GPU, 900 for a dry run)")
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                        help=f"comma-separated, in order; any of {', '.join(ALL_PARTS)}")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, "bench", "results"),
                        help="where gpu-check.tgz goes (default: $OUT, else bench/results)")
    parser.add_argument("--workdir", default=None, help="where the parts write (default: a new folder in /tmp)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ALL_PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(ALL_PARTS)}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = os.path.abspath(args.workdir or os.path.join("/tmp", f"gpu-check-{stamp}"))
    cache_dir = workdir + "-inductor-cache"  # shared by the parts, outside the tarball
    os.makedirs(cache_dir, exist_ok=True)
    python = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCHINDUCTOR_CACHE_DIR=cache_dir)
    parts = make_parts(args.dry_run, python, workdir, cache_dir)
    budget = args.budget if args.budget is not None else (900.0 if args.dry_run else 420.0)
    summary = run_check([parts[n] for n in names], workdir, os.path.join(args.out, "gpu-check.tgz"), budget, env,
                        args.dry_run, environment=environment_report(python, env))
    return 0 if all(p["status"] in ("ok", "skipped") for p in summary["parts"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
