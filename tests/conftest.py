"""Shared fixtures: tiny pipelines built once per session, and the DeepCache reference."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

# Two cores in CI, shared by pytest-xdist's workers (README runs -n 2): keep torch from
# oversubscribing them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, os.cpu_count() or 1) // _WORKERS)
torch.set_num_threads(_THREADS)
# ...nor the processes the tests start (bench runs, the compile-cache worker): beside one busy
# thread (the other worker), the gpu_check dry run took 213 s with torch's 2 threads, 59 s with 1.
os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
warnings.filterwarnings("ignore", message=".*torchvision.*")

# Seconds per test on 2 cores under README's command (python -m pytest -q -n 2 --record-durations).
DURATIONS = Path(__file__).with_name("durations.json")
SLOW_SECONDS = 1.5

from fastcache.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline, two_level_sd_pipeline  # noqa: E402

from .helpers import assert_untouched  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "covers(feature=None, check=None, *, xfail=None, cuda_only=False): the README support-table"
        " cell(s) this test checks; a test covers every feature x every check its marks name"
        " (tools/support_table.py renders them)",
    )
    config.addinivalue_line(
        "markers",
        "cuda: needs a CUDA GPU; added to every test skipped for want of one (bench/gpu_check.py runs -m cuda)",
    )
    config.addinivalue_line(
        "markers", "slow: took more than SLOW_SECONDS in tests/durations.json; CI runs it, -m 'not slow' skips it",
    )


def pytest_addoption(parser):
    parser.addoption("--record-durations", action="store_true",
                     help=f"write every test's seconds (setup + call + teardown) to {DURATIONS.name}, "
                          "which marks the slow tests and orders the files")


def pytest_collection_modifyitems(config, items):
    """Mark `cuda` every test whose skipif says it needs a CUDA GPU, so that the one-shot GPU check
    selects them all with ``-m cuda`` wherever they live, on a GPU (not skipped) as on a CPU.

    Mark `slow` every test that took more than SLOW_SECONDS in the recorded run (durations.json:
    the inductor compiles, the server and subprocess tests, the long parities), so that
    ``-m "not slow"`` is a fast tier. Run the files that took longest first: with ``-n 2 --dist
    loadfile`` (README's command) no long file is left to run alone at the end."""
    seconds = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    file_seconds: dict[str, float] = {}
    for item in items:
        if any("CUDA" in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)
        if seconds.get(item.nodeid, 0.0) > SLOW_SECONDS:
            item.add_marker(pytest.mark.slow)
        path = item.nodeid.split("::")[0]
        file_seconds[path] = file_seconds.get(path, 0.0) + seconds.get(item.nodeid, 0.0)
    items.sort(key=lambda item: -file_seconds[item.nodeid.split("::")[0]])  # stable: file order kept


_recorded: dict[str, float] = {}


def pytest_runtest_logreport(report):
    _recorded[report.nodeid] = _recorded.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
    """With --record-durations, the controller (not an xdist worker) writes what every test took."""
    if session.config.getoption("record_durations") and not hasattr(session.config, "workerinput"):
        DURATIONS.write_text(json.dumps({nodeid: round(t, 2) for nodeid, t in sorted(_recorded.items())}, indent=0) + "\n")


@pytest.fixture(scope="session")
def sd_pipe():
    return tiny_sd_pipeline()


@pytest.fixture(scope="session")
def sdxl_pipe():
    return tiny_sdxl_pipeline()


@pytest.fixture(scope="session")
def two_level_pipe():
    """SD 1.x at two U-Net levels: for runtime mechanics, at half the tiny pipeline's compile time."""
    return two_level_sd_pipeline()


@pytest.fixture(params=[pytest.param("sd", marks=pytest.mark.covers("StableDiffusionPipeline")),
                        pytest.param("sdxl", marks=pytest.mark.covers("StableDiffusionXLPipeline"))])
def any_pipe(request, sd_pipe, sdxl_pipe):
    """Each test using it runs on the tiny SD and the tiny SDXL pipeline."""
    return sd_pipe if request.param == "sd" else sdxl_pipe


@pytest.fixture(autouse=True)
def _pipelines_left_clean(request):
    """Every test must leave the shared pipelines exactly as built (a leak would taint the rest)."""
    yield
    for name in ("sd_pipe", "sdxl_pipe", "two_level_pipe"):
        if name in request.fixturenames:
            assert_untouched(request.getfixturevalue(name))
