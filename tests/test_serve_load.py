"""``python -m bench serve-load``: a smoke run of the load test (five servers, a few requests each).

No timing is asserted (this machine is shared): the run must complete, drive every server through
every phase without errors, and write what it measured. The images double-check the servers: the
same request gives fastcache's image with and without batching, and DeepCache's within a level;
with TGATE (gate 2 of 4 steps) another.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVERS = ["diffusers", "deepcache", "fastcache", "fastcache-no-batching", "fastcache-tgate"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-load")
    command = [sys.executable, "-m", "bench", "serve-load", "--preset", "tiny", "--compile-backend", "eager",
               "--threads", "1", "--batch-sizes", "1,2", "--steps", "4", "--concurrency", "1,2", "--requests", "4",
               "--open-requests", "4", "--soak-requests", "4", "--servers", ",".join(SERVERS), "--gate-step", "2",
               "--out", str(out)]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    [name] = [name for name in os.listdir(out) if name.startswith("serve-load-tiny-") and name.endswith(".json")]
    with open(out / name) as handle:
        return out, name[: -len(".json")], json.load(handle)


def test_every_server_runs_every_phase_without_errors(smoke):
    _, _, result = smoke
    assert list(result["servers"]) == SERVERS
    for name, server in result["servers"].items():
        phases = [phase["phase"] for phase in server["phases"]]
        assert phases[:2] == ["closed c=1", "closed c=2"] and phases[2].startswith("open ") and phases[3] == "soak c=2"
        for phase in server["phases"]:
            assert phase["requests"] == 4 and phase["ok"] == 4 and phase["errors"] == 0, (name, phase)
            assert 0 < phase["p50_s"] <= phase["p90_s"] <= phase["p99_s"] and phase["images_per_s"] > 0
        assert server["sample_status"] == 200 and server["exit_status"] == 0
        assert server["compilations_since_warmup"] == 0 and server["rss_bytes_end"] > 0
        assert result["meta"]["environment"]["versions"]["torch"]
    fastcache, unbatched = result["servers"]["fastcache"], result["servers"]["fastcache-no-batching"]
    assert unbatched["mean_batch_images"] == 1.0  # --no-batching: one request per call
    assert 1.0 <= fastcache["mean_batch_images"] <= 2.0
    for name in ("fastcache", "fastcache-no-batching"):  # refresh at steps 0 and 3, cached at 1 and 2
        steps = result["servers"][name]["unet_steps"]
        assert steps["refresh"] == steps["cached"] > 0
    assert result["servers"]["diffusers"]["unet_steps"] == {"refresh": 0, "cached": 0}  # fastcache counts only
    # TGATE, gate 2: refreshes at steps 0, 1 (gate - 1) and 2 (the gate), the step after is cached
    steps = result["servers"]["fastcache-tgate"]["unet_steps"]
    assert steps["refresh"] == 3 * steps["cached"] > 0
    assert result["servers"]["fastcache-tgate"]["flags"] == ["--accelerator", "fastcache", "--gate-step", "2"]


def test_report_files_and_sample_images(smoke):
    out, stem, result = smoke
    with open(out / f"{stem}.md") as handle:
        text = handle.read()
    assert "| target | measured | met |" in text and all(f"| {name} |" in text for name in SERVERS)
    assert (out / "INDEX.md").exists()
    images = {name: np.asarray(Image.open(out / path).convert("RGB"), dtype=np.int16)
              for name, path in result["samples"].items()}
    assert set(images) == set(SERVERS)
    assert np.array_equal(images["fastcache"], images["fastcache-no-batching"])  # one request alone: batch 1
    assert np.abs(images["fastcache"] - images["deepcache"]).max() <= 1  # the same algorithm as DeepCache
    assert np.abs(images["fastcache"] - images["diffusers"]).max() > 1  # caching changes this random model's image
    assert not np.array_equal(images["fastcache-tgate"], images["fastcache"])  # no guidance after the gate


def test_a_preset_other_than_tiny_is_saved_as_a_folder_the_servers_load(tmp_path):
    """Every preset but tiny is saved with save_pretrained for the servers' --model (here the
    smallest, tiny-sdxl); loading it back gives the preset's U-Net, weight for weight."""
    import argparse

    import torch
    from diffusers import DiffusionPipeline

    from bench.serve_load import _model_folder

    folder = _model_folder(argparse.Namespace(model=None, preset="tiny-sdxl", seed=0), str(tmp_path))
    loaded = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    from bench.presets import get_preset

    built = get_preset("tiny-sdxl").build(torch.device("cpu"), torch.float32, 0)
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    for (name, expected), (_, actual) in zip(built.unet.state_dict().items(), loaded.unet.state_dict().items()):
        assert torch.equal(expected, actual), name
