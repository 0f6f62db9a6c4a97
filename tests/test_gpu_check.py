"""The one-shot GPU check (bench/gpu_check.py) runs end to end here, so it cannot rot between draws.

The dry run executes the same parts with the tiny presets; every part's command line, dry or not,
is parsed by the real argument parsers; the budget logic is checked with parts that overrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

from bench import gpu_check
from bench.cli import build_parser as bench_parser
from bench.profile import build_parser as profile_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("dry_run", [False, True], ids=["gpu", "dry-run"])
def test_every_part_command_parses_with_the_real_parsers(dry_run, tmp_path):
    parts = gpu_check.make_parts(dry_run, sys.executable, str(tmp_path / "work"), str(tmp_path / "cache"))
    assert set(parts) == set(gpu_check.ALL_PARTS)
    for part in parts.values():
        command = list(part.command)
        assert command[0] == sys.executable
        if command[1:3] == ["-m", "bench"]:
            args = bench_parser().parse_args(command[3:])
            if args.command == "paired":  # issue 16's TGATE target, at the headline's setup
                assert args.methods.split(",")[0] == "fastcache:I3B0" and "tgate:I3B0G" in args.methods
                assert args.steps == (2 if dry_run else 50)
            if args.command == "run":
                assert args.configs == "I3B0" and args.restart == "none"
                assert args.steps == (2 if dry_run else 50) and args.runs == (1 if dry_run else 3)
                assert args.compile_mode == (None if dry_run else "reduce-overhead")
        elif command[1:3] == ["-m", "bench.profile"]:
            args = profile_parser().parse_args(command[3:])
            assert args.methods == "fastcache" and args.configs == "I3B0"
        else:
            assert command[1:3] == ["-m", "pytest"] and "-m" in command[3:] and "cuda" in command[3:]
    headline = bench_parser().parse_args(list(parts["headline"].command[3:]))
    if not dry_run:  # the headline setup
        assert (headline.preset, headline.res, headline.batch) == ("sd15", [(512, 512)], [1])
        sdxl = bench_parser().parse_args(list(parts["sdxl"].command[3:]))
        assert (sdxl.preset, sdxl.res) == ("sdxl", [(1024, 1024)])
        assert bench_parser().parse_args(list(parts["batch4"].command[3:])).batch == [4]


def test_cuda_marker_selects_exactly_the_tests_that_need_a_gpu():
    """`-m cuda` (what the check runs) collects every test skipped for want of CUDA and nothing else."""
    listed = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                             "tests"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stdout[-2000:] + listed.stderr[-2000:]
    selected = {line for line in listed.stdout.splitlines() if "::" in line}
    assert any("test_graphs.py::test_cuda_graph_replay_equals_the_compiled_path" in n for n in selected)
    assert any(n.startswith("tests/test_host_sync.py::") for n in selected)
    assert any(n.startswith("tests/test_lora.py::") for n in selected)
    assert not any("test_emulated" in n for n in selected)


def _sleeper(seconds: float, pid_file: str) -> tuple[str, ...]:
    """A part that prints, starts a grandchild that sleeps (recording its pid), and sleeps itself."""
    code = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep({seconds})'])\n"
        f"open({pid_file!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        f"time.sleep({seconds})\n"
    )
    return (sys.executable, "-c", code)


def _running(pid: int) -> bool:
    """Whether `pid` still runs (a killed process nobody has reaped yet is a zombie: not running)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_part_past_its_timeout_is_killed_with_its_children_and_later_parts_are_skipped(tmp_path):
    pid_file = str(tmp_path / "grandchild.pid")
    parts = [
        gpu_check.Part("quick", "exits at once", (sys.executable, "-c", "print('hello')"), 30, 1),
        gpu_check.Part("slow", "overruns", _sleeper(60, pid_file), 3, 1),
        gpu_check.Part("late", "needs more than is left", (sys.executable, "-c", "pass"), 100, 50),
    ]
    work, tarball = str(tmp_path / "gpu-check-x"), str(tmp_path / "out" / "gpu-check.tgz")
    start = time.time()
    with open(tmp_path / "echo.log", "w") as echo:
        summary = gpu_check.run_check(parts, work, tarball, gpu_check.RESERVE_S + 20, dict(os.environ), True, echo)
    assert time.time() - start < 30
    assert [(p["name"], p["status"]) for p in summary["parts"]] == [
        ("quick", "ok"), ("slow", "timeout"), ("late", "skipped")]
    assert summary["parts"][1]["timeout_s"] == 3
    with open(pid_file) as handle:
        grandchild = int(handle.read())
    assert not _running(grandchild)  # the whole process group went, not only the part's process
    with tarfile.open(tarball) as archive:
        names = set(archive.getnames())
        kept = json.load(archive.extractfile("gpu-check-x/summary.json"))
        slow_log = archive.extractfile("gpu-check-x/slow/output.log").read().decode()
    assert {"gpu-check-x/quick/output.log", "gpu-check-x/summary.md"} <= names
    assert [p["status"] for p in kept["parts"]] == ["ok", "timeout", "skipped"]
    assert "started" in slow_log  # the output of a killed part comes back


def test_a_pytest_part_past_its_timeout_still_leaves_its_junit_counts(tmp_path):
    """The CUDA tests part killed at its cap: pytest is interrupted, not killed, so its junit file
    still counts the tests that ran (the summary reads it)."""
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_quick():\n    pass\n\n"
                                           "def test_slow():\n    time.sleep(600)\n")
    junit = tmp_path / "junit.xml"
    part = gpu_check.Part("cuda-tests", "a slow test run", (sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(tmp_path / "test_slow.py"), "--junitxml", str(junit)), 60, 1)
    started = time.monotonic()
    status, _ = gpu_check.run_part(part, 15, dict(os.environ), str(tmp_path / "output.log"), open(os.devnull, "w"))
    assert status == "timeout" and time.monotonic() - started < 60
    counts = gpu_check.junit_counts(str(junit))
    assert counts is not None and counts["tests"] >= 1 and counts["failures"] == 0


def test_only_the_headline_keeps_its_sample_images(tmp_path):
    work = tmp_path / "gpu-check-y"
    for part in ("headline", "sdxl"):
        (work / part / "sdxl-1-samples").mkdir(parents=True)
        (work / part / "sdxl-1-samples" / "eager.png").write_bytes(b"png")
        (work / part / "sdxl-1.json").write_text("{}")
    gpu_check.pack(str(work), str(tmp_path / "t.tgz"))
    with tarfile.open(tmp_path / "t.tgz") as archive:
        names = set(archive.getnames())
    assert "gpu-check-y/headline/sdxl-1-samples/eager.png" in names
    assert "gpu-check-y/sdxl/sdxl-1.json" in names
    assert not any(n.startswith("gpu-check-y/sdxl/sdxl-1-samples") for n in names)


def test_dry_run_of_the_script_runs_the_check_end_to_end(tmp_path):
    """bench/gpu_check.sh --dry-run: the wrapper, the CUDA tests (skipped here), the headline
    `bench run` and the profile, on the tiny preset; the summary agrees with the result files."""
    out, work = tmp_path / "out", tmp_path / "gpu-check-dry"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", "--parts", "cuda-tests,headline,profile",
         "--out", str(out), "--workdir", str(work)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    for name in ("cuda-tests", "headline", "profile"):
        assert f"== {name}: ok" in done.stdout
    with tarfile.open(out / "gpu-check.tgz") as archive:
        names = archive.getnames()
        summary = json.load(archive.extractfile("gpu-check-dry/summary.json"))
        (headline_name,) = [n for n in names if n.startswith("gpu-check-dry/headline/tiny-") and n.endswith(".json")]
        headline = json.load(archive.extractfile(headline_name))
    assert [p["status"] for p in summary["parts"]] == ["ok", "ok", "ok"]
    assert any(n.startswith("gpu-check-dry/profile/profile-tiny-") and n.endswith(".md") for n in names)
    assert "gpu-check-dry/env.txt" in names
    counts = summary["cuda_tests"]
    assert counts["tests"] >= 9 and counts["failures"] == 0 and counts["errors"] == 0
    assert counts["skipped"] == counts["tests"]  # no GPU here: every CUDA test skips, none fails
    labels = [m["label"] for m in headline["shapes"][0]["methods"]]
    assert labels == ["eager", "compile", "deepcache I3B0", "fastcache I3B0"]
    targets = {t["target"]: t for t in summary["shapes"]["headline"]["targets"]}
    fastcache = headline["shapes"][0]["methods"][3]
    assert targets["end to end vs eager"]["measured"] == pytest.approx(fastcache["speedup_end_to_end"])
    assert targets["end to end vs DeepCache"]["measured"] == pytest.approx(
        headline["shapes"][0]["agreements"][0]["speedup_end_to_end"])
    assert targets["cached step"]["measured"] == pytest.approx(fastcache["steps"]["cached"]["median"] * 1e3)


def test_tgate_targets_are_read_from_a_paired_result():
    """Issue 16's GPU targets, read from a committed CPU `bench paired` result (the GPU run writes
    the same file): fastcache+TGATE's median per-round ratio over fastcache alone, and its median
    seconds against the tgate package's."""
    path = os.path.join(REPO, "bench", "results", "paired-cpu-small-20261205-183448.json")
    with open(path) as handle:
        result = json.load(handle)
    alone, package = gpu_check.tgate_targets(result)
    methods = {m["label"]: m for m in result["methods"]}
    gated = methods["fastcache I3B0G10"]
    assert alone["measured"] == gated["speedup"]["median"] and alone["met"] is False  # 1.20x < 1.5x
    assert package["measured"] == pytest.approx(methods["tgate I3B0G10"]["seconds"]["median"] / gated["seconds"]["median"])
    assert package["met"] is (package["measured"] > 1.0)
