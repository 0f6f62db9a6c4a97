"""The benchmark package: metric code against hand-computed values, and a smoke run of the command.

No test here asserts a timing: timings are only checked to be measured (finite, positive).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from bench import configs, metrics
from bench.methods import CacheConfig
from bench.results import to_jsonable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C1, C2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2


# -- metrics ---------------------------------------------------------------------------------------
def test_psnr_of_a_constant_offset_is_exact():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 128, size=(16, 16, 3)) / 256.0  # exact binary fractions
    b = a + 0.25  # every pixel off by exactly 0.25: MSE = 1/16
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(16.0), abs=1e-12)
    assert metrics.psnr(b, a) == metrics.psnr(a, b)


def test_psnr_respects_data_range():
    a = np.zeros((8, 8))
    assert metrics.psnr(a, a + 2.0, data_range=4.0) == pytest.approx(10 * math.log10(16 / 4), abs=1e-12)


def test_identical_images_psnr_inf_ssim_one_and_latents_zero():
    rng = np.random.default_rng(1)
    image = rng.random((32, 24, 3))
    assert metrics.psnr(image, image) == math.inf
    assert metrics.ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    latents = rng.standard_normal((2, 4, 8, 8))
    assert metrics.relative_l2(latents, latents.copy()) == 0.0


def test_relative_l2_known_value():
    reference = np.ones((2, 4, 3, 3))
    assert metrics.relative_l2(1.5 * reference, reference) == pytest.approx(0.5, abs=1e-15)
    assert metrics.relative_l2(np.array([3.0, 4.0]), np.array([0.0, 0.0])) == math.inf


def test_gaussian_window_is_the_standard_one():
    taps = metrics.gaussian_window()
    assert taps.shape == (11,) and taps.sum() == pytest.approx(1.0, abs=1e-15)
    assert np.allclose(taps, taps[::-1])
    x = np.arange(11) - 5.0
    expected = np.exp(-(x**2) / (2 * 1.5**2))
    assert np.allclose(taps, expected / expected.sum(), atol=0, rtol=1e-14)


def test_ssim_of_constant_images_is_the_luminance_term():
    # Constant images: zero variances and covariance, so SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    m1, m2 = 0.2, 0.6
    a, b = np.full((20, 20), m1), np.full((20, 20), m2)
    expected = (2 * m1 * m2 + C1) / (m1**2 + m2**2 + C1)
    assert metrics.ssim(a, b) == pytest.approx(expected, abs=1e-9)
    colour_a, colour_b = np.full((16, 16, 3), m1), np.full((16, 16, 3), m2)
    assert metrics.ssim(colour_a, colour_b) == pytest.approx(expected, abs=1e-9)


def _ssim_one_window(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of one 11x11 window, written out from the paper's definitions (weighted statistics)."""
    i, j = np.meshgrid(np.arange(11) - 5.0, np.arange(11) - 5.0, indexing="ij")
    w = np.exp(-(i**2 + j**2) / (2 * 1.5**2))
    w /= w.sum()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
    cxy = (w * (x - mx) * (y - my)).sum()
    return ((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx**2 + my**2 + C1) * (vx + vy + C2))


def test_ssim_single_window_matches_the_definition():
    rng = np.random.default_rng(2)
    x = rng.random((11, 11))
    y = np.clip(x + 0.1 * rng.standard_normal((11, 11)), 0, 1)
    assert metrics.ssim(x, y) == pytest.approx(_ssim_one_window(x, y), abs=1e-12)


def test_ssim_is_the_mean_over_valid_windows_and_channels():
    rng = np.random.default_rng(3)
    x = rng.random((14, 13, 3))
    y = np.clip(0.8 * x + 0.1 + 0.05 * rng.standard_normal(x.shape), 0, 1)
    per_channel = []
    for c in range(3):
        windows = [
            _ssim_one_window(x[r:r + 11, s:s + 11, c], y[r:r + 11, s:s + 11, c])
            for r in range(14 - 10) for s in range(13 - 10)
        ]
        per_channel.append(np.mean(windows))
    assert metrics.ssim(x, y) == pytest.approx(np.mean(per_channel), abs=1e-12)
    assert metrics.ssim(x, y) < 1.0


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError):
        metrics.ssim(np.zeros((10, 30)), np.zeros((10, 30)))


def test_batch_mean_averages_per_image():
    a = np.zeros((2, 12, 12, 3))
    b = a.copy()
    b[0] += 0.25
    b[1] += 0.5
    expected = (10 * math.log10(16) + 10 * math.log10(4)) / 2
    assert metrics.batch_mean(metrics.psnr, b, a) == pytest.approx(expected, abs=1e-12)


# -- small pieces ----------------------------------------------------------------------------------
def test_config_labels_round_trip():
    assert CacheConfig.parse("I3B0") == CacheConfig(3, 0)
    assert CacheConfig.parse("i5b11").label == "I5B11"
    with pytest.raises(ValueError):
        CacheConfig.parse("I0B0")
    with pytest.raises(ValueError):
        CacheConfig.parse("3,0")


def test_non_finite_floats_are_written_as_strings():
    data = to_jsonable({"psnr": math.inf, "x": [1.0, float("nan")]})
    assert json.loads(json.dumps(data, allow_nan=False)) == {"psnr": "inf", "x": [1.0, "nan"]}


def test_cpu_small_keeps_the_sd15_block_structure():
    small, sd15 = configs.unet_config("cpu-small"), configs.unet_config("sd15")
    for key in ("down_block_types", "up_block_types", "layers_per_block"):
        assert small[key] == sd15[key]
    assert len(small["block_out_channels"]) == 4
    assert all(s < b for s, b in zip(small["block_out_channels"], sd15["block_out_channels"]))
    assert configs.text_encoder_configs("cpu-small")[0]["hidden_size"] == small["cross_attention_dim"]


# -- smoke run -------------------------------------------------------------------------------------
METHODS = ("eager", "compile", "deepcache", "fastcache")
SMOKE_CONFIGS = ("I2B0", "I2B1")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """`python -m bench run` on the tiny preset: 2 steps, 1 run, dynamo's eager backend, no restart."""
    out = tmp_path_factory.mktemp("bench-out")
    command = [
        sys.executable, "-m", "bench", "run", "--preset", "tiny", "--steps", "2", "--runs", "1",
        "--configs", ",".join(SMOKE_CONFIGS), "--compile-backend", "eager", "--restart", "none", "--out", str(out),
    ]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out, completed.stdout


def test_smoke_run_writes_json_with_every_method_and_config(smoke_run):
    out, _ = smoke_run
    (json_name,) = [n for n in os.listdir(out) if n.startswith("tiny-") and n.endswith(".json")]
    with open(out / json_name) as handle:
        result = json.load(handle)
    meta = result["meta"]
    assert "--preset tiny" in meta["command"]
    for key in ("torch", "diffusers", "fastcache", "DeepCache"):
        assert meta["environment"]["versions"][key]
    assert meta["environment"]["cpu_model"] and meta["environment"]["python"]
    assert meta["settings"]["configs"] == list(SMOKE_CONFIGS)
    (shape,) = result["shapes"]
    labels = [m["label"] for m in shape["methods"]]
    assert labels == ["eager", "compile"] + [f"{k} {c}" for c in SMOKE_CONFIGS for k in ("deepcache", "fastcache")]
    assert {m["method"] for m in shape["methods"]} == set(METHODS)
    for m in shape["methods"]:
        assert m["restored"] is True and m["outputs_finite"] is True
        for mode in ("end_to_end", "denoise"):
            assert _finite(m[mode]["median"]) and m[mode]["median"] > 0
            assert m[mode]["min"] <= m[mode]["median"] <= m[mode]["max"]
            assert len(m[mode]["runs"]) == 1
        assert _finite(m["speedup_end_to_end"]) and _finite(m["speedup_denoise"])
        assert _finite(m["first_image_s"]) and m["first_image_s"] >= m["setup_s"] >= 0
        # CPU run: no reserved figure; allocated = resident tensors (at least the weights) + one call's peak
        assert m["peak_reserved_bytes"] is None and "CPU" in m["peak_memory_note"]
        assert m["peak_allocated_bytes"] > result["meta"]["pipeline"]["weight_bytes"]
        parts = m["details"]["peak_memory_parts"]
        assert parts["resident_bytes"] + parts["peak_during_bytes"] == m["peak_allocated_bytes"]
        assert parts["resident_bytes"] >= result["meta"]["pipeline"]["weight_bytes"]
        quality = m["quality_vs_eager"]
        assert _finite(quality["ssim"]) and -1 <= quality["ssim"] <= 1
        assert _finite(quality["latent_rel_l2"]) and quality["latent_rel_l2"] >= 0
        assert _finite(quality["psnr"]) or quality["psnr"] == "inf"
        steps = m["steps"]
        if m["method"] in ("eager", "compile"):
            assert _finite(steps["full"]["median"]) and steps["refresh"] is None
            kinds = ["full"]
        else:
            assert _finite(steps["refresh"]["median"]) and _finite(steps["cached"]["median"])
            kinds = ["refresh", "cached"]
        for kind in kinds:  # host time per step: measured before the device sync, so never above wall
            assert len(steps[f"{kind}_host"]["runs"]) == len(steps[kind]["runs"])
            assert all(0 < h <= w for h, w in zip(steps[f"{kind}_host"]["runs"], steps[kind]["runs"]))
        loop = m["loop_calls"]  # every U-Net call of an extra denoising call, timed by hooks
        expected_labels = ["refresh b2", "cached b2"] if m["method"] == "fastcache" else ["U-Net call"] * 2
        assert loop["labels"] == expected_labels and len(loop["per_call_median"]) == 2
        assert sum(len(g["runs"]) for g in loop["groups"].values()) == 2
        assert 0 < loop["unet"]["median"] <= loop["loop"]["median"]
        assert loop["unet"]["median"] == pytest.approx(sum(loop["per_call_median"]))
    eager = shape["methods"][0]
    assert eager["quality_vs_eager"] == {"psnr": "inf", "ssim": 1.0, "latent_rel_l2": 0}
    for config in SMOKE_CONFIGS:
        fastcache = next(m for m in shape["methods"] if m["label"] == f"fastcache {config}")
        assert fastcache["refresh_pattern"] == [True, False]  # interval 2, 2 steps: one cached step
        assert fastcache["details"]["warmup"]["compilations"] == 2
        own = fastcache["details"]["fastcache_memory"]  # compiled runner on CPU: kept features only
        assert own["kept_features"] > 0 and own["graph_pool"] is None and own["total"] == own["kept_features"]
    agreements = {a["config"]: a for a in shape["agreements"]}
    assert set(agreements) == set(SMOKE_CONFIGS)
    for a in agreements.values():
        assert _finite(a["speedup_end_to_end"]) and _finite(a["speedup_denoise"])
        # The cached step moves both away from eager; they agree with each other far more closely.
        assert a["deepcache_vs_eager"]["latent_rel_l2"] > 0
        assert a["fastcache_vs_deepcache"]["latent_rel_l2"] <= 0.01 * a["deepcache_vs_eager"]["latent_rel_l2"]
    assert result["restarts"] == []


def test_smoke_run_writes_markdown_plot_and_samples(smoke_run):
    out, stdout = smoke_run
    names = os.listdir(out)
    (markdown_name,) = [n for n in names if n.startswith("tiny-") and n.endswith(".md")]
    with open(out / markdown_name) as handle:
        text = handle.read()
    with open(out / "INDEX.md") as handle:  # the index links the newest run of each kind
        assert f"| tiny | [{markdown_name}]({markdown_name}) |" in handle.read()
    header = "| resolution, batch | eager | compile | deepcache I2B0 | fastcache I2B0 | fastcache / DeepCache I2B0 |"
    assert header in text and header in stdout  # the printed table is the file's
    headings = ("end to end", "denoising loop only", "Warm-up", "process restart", "U-Net calls inside", "step times", "Peak device memory",
                "Quality against eager", "DeepCache and fastcache at the same config")
    for heading in headings:
        assert heading in text
    assert "| 128x128 b1 |" in text
    (plot_name,) = [n for n in names if n.startswith("tiny-") and n.endswith(".png")]
    with Image.open(out / plot_name) as plot:
        assert plot.format == "PNG" and min(plot.size) > 200
    assert f"]({plot_name})" in text
    (samples,) = [n for n in names if n.endswith("-samples")]
    expected = {"eager.png", "compile.png"}
    expected |= {f"{k}-{c}.png" for c in SMOKE_CONFIGS for k in ("deepcache", "fastcache")}
    assert set(os.listdir(out / samples)) == expected
    with Image.open(out / samples / "eager.png") as sample:
        assert sample.size == (128, 128)


def test_smoke_run_on_the_sdxl_code_path(tmp_path):
    """tiny-sdxl: two text encoders, pooled embeddings and text_time conditions through every method."""
    command = [
        sys.executable, "-m", "bench", "run", "--preset", "tiny-sdxl", "--steps", "2", "--runs", "1",
        "--configs", "I2B0", "--compile-backend", "eager", "--restart", "none", "--out", str(tmp_path),
        "--unet-tweaks", "fuse_qkv",  # every method on the fused-QKV U-Net
    ]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (json_name,) = [n for n in os.listdir(tmp_path) if n.startswith("tiny-sdxl-") and n.endswith(".json")]
    with open(tmp_path / json_name) as handle:
        result = json.load(handle)
    assert result["meta"]["pipeline"]["class"] == "StableDiffusionXLPipeline"
    assert result["meta"]["settings"]["unet_tweaks"] == ["fuse_qkv"]
    (shape,) = result["shapes"]
    assert shape["methods"][0]["details"]["attention_processors"] == ["FusedAttnProcessor2_0"]
    assert [m["label"] for m in shape["methods"]] == ["eager", "compile", "deepcache I2B0", "fastcache I2B0"]
    assert all(m["restored"] and m["outputs_finite"] for m in shape["methods"])
    (agreement,) = shape["agreements"]
    deepcache_error = agreement["deepcache_vs_eager"]["latent_rel_l2"]
    assert agreement["fastcache_vs_deepcache"]["latent_rel_l2"] <= 0.01 * deepcache_error


def test_memory_table_reports_the_extra_over_eager():
    """fastcache's extra memory over the eager pipeline (issue 5's < 10% target), from peaks."""
    from types import SimpleNamespace

    from bench.report import memory_lines

    def method(name, reserved, allocated, details=None, note=None):
        return SimpleNamespace(method=name.split()[0], label=name, peak_reserved_bytes=reserved,
                               peak_allocated_bytes=allocated, peak_memory_note=note, details=details or {})

    # CUDA: fastcache allocates less than eager at its peak (replays allocate nothing) but reserves
    # more (the graph pool): the extra is computed from reserved.
    shape = SimpleNamespace(label="512x512 b1", methods=[
        method("eager", 2000 * 2**20, 1900 * 2**20),
        method("fastcache I3B0", 2150 * 2**20, 1800 * 2**20, {"fastcache_memory": {"total": 180 * 2**20}}),
    ])
    lines = memory_lines(SimpleNamespace(shapes=[shape]))
    assert "| resolution, batch | method | peak reserved MiB | peak allocated MiB | vs eager (reserved) |" in lines[0]
    assert "| 512x512 b1 | eager | 2000 | 1900 | +0.0% | - |" in lines
    assert "| 512x512 b1 | fastcache I3B0 | 2150 | 1800 | +7.5% | 180 |" in lines
    # CPU: no reserved; compared by allocated, small figures keep a decimal, and the note says how.
    note = "CPU: tensor bytes"
    shape = SimpleNamespace(label="128x128 b1", methods=[
        method("eager", None, 40 * 2**20, note=note),
        method("fastcache I3B0", None, 42 * 2**20, {"fastcache_memory": {"total": 2**19}}, note=note),
    ])
    lines = memory_lines(SimpleNamespace(shapes=[shape]))
    assert "vs eager (allocated)" in lines[0]
    assert "| 128x128 b1 | fastcache I3B0 | - | 42.0 | +5.0% | 0.5 |" in lines
    assert lines[-1] == "Measured as: CPU: tensor bytes."


def test_host_overhead_measures_the_presets_unet_without_device_work():
    """The host-overhead benchmark's rows describe the preset's real U-Net (built on meta)."""
    from bench.configs import unet_config
    from bench.host_overhead import markdown, measure
    from diffusers import UNet2DConditionModel

    row = measure("sd15", steps=3, repeats=1)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config("sd15"))
    assert row.modules == len(list(unet.modules())) == 709
    assert row.tensors == len(list(unet.parameters())) + len(list(unet.buffers()))
    assert row.steps == 3
    for value in (row.fingerprint_ms, row.model_check_us, row.unet_call_after_reset_us, row.unet_call_unmanaged_us,
                  row.pipeline_call_ms):
        assert math.isfinite(value) and value > 0
    text = markdown(dict(command="c", environment=dict(device_name="cpu", cpu_count=2, python="3", git_commit="x",
                                                        fastcache_dirty=False, versions=dict(torch="t", diffusers="d")),
                         load_average=[0], load_average_at_end=[0], repeats=1), [row])
    assert text.count("| sd15 | 709 |") == 1


def test_unet_tweaks_change_the_model_as_named():
    from bench.tweaks import apply_tweaks, parse_tweaks
    from fastcache.tiny import tiny_sd_pipeline

    assert parse_tweaks(" fuse_qkv, channels_last ") == ("fuse_qkv", "channels_last")
    assert parse_tweaks("") == () and parse_tweaks(None) == ()
    with pytest.raises(ValueError, match="unknown U-Net tweak"):
        parse_tweaks("fuse_qkv,fp8")
    pipe = tiny_sd_pipeline()
    apply_tweaks(pipe, ("fuse_qkv", "channels_last"))
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"FusedAttnProcessor2_0"}
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_result_files_are_written_with_an_index_of_the_newest_and_strict_json(tmp_path):
    """One writer for every bench command: stem files, and INDEX.md linking the newest of each kind
    (no copies of result files); NaN refused."""
    from bench.results import write_result_files

    out = str(tmp_path / "out")
    write_result_files(out, "kind-20261125-000000", {"x": 1.0}, "# old\n")
    paths = write_result_files(out, "kind-20261125-000001", {"x": 1.5}, "# text\n")
    write_result_files(out, "other-kind-20261124-235959", {"y": 2}, "# y\n")
    assert sorted(os.listdir(out)) == [
        "INDEX.md", "kind-20261125-000000.json", "kind-20261125-000000.md", "kind-20261125-000001.json",
        "kind-20261125-000001.md", "other-kind-20261124-235959.json", "other-kind-20261124-235959.md"]
    with open(paths["json"]) as handle:
        assert json.load(handle) == {"x": 1.5}
    with open(paths["index"]) as handle:
        rows = [line for line in handle.read().splitlines() if line.startswith("| ") and "](" in line]
    assert rows == ["| kind | [kind-20261125-000001.md](kind-20261125-000001.md) | [json](kind-20261125-000001.json) |",
                    "| other-kind | [other-kind-20261124-235959.md](other-kind-20261124-235959.md) | "
                    "[json](other-kind-20261124-235959.json) |"]
    with pytest.raises(ValueError):
        write_result_files(str(tmp_path), "nan", {"x": math.nan}, "")


def test_paired_run_alternates_the_methods_and_writes_ratios(tmp_path):
    """`python -m bench paired` on the tiny preset: each round calls every method once, in a rotated
    order; ratios are per round against the first method, whose own ratio is exactly 1."""
    command = [sys.executable, "-m", "bench", "paired", "--preset", "tiny", "--steps", "2", "--rounds", "3",
               "--methods", "eager,fastcache:I2B0", "--compile-backend", "eager", "--out", str(tmp_path)]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (json_name,) = [n for n in os.listdir(tmp_path) if n.startswith("paired-tiny-") and n.endswith(".json")]
    with open(tmp_path / json_name) as handle:
        result = json.load(handle)
    eager, fastcache = result["methods"]
    assert [eager["label"], fastcache["label"]] == ["eager", "fastcache I2B0"]
    assert result["order"] == [["eager", "fastcache I2B0"], ["fastcache I2B0", "eager"], ["eager", "fastcache I2B0"]]
    assert eager["speedup"]["runs"] == [1.0, 1.0, 1.0] and eager["latent_rel_l2"] == 0
    ratios = [e / f for e, f in zip(eager["seconds"]["runs"], fastcache["seconds"]["runs"])]
    assert fastcache["speedup"]["runs"] == pytest.approx(ratios)
    assert 0 < fastcache["latent_rel_l2"] < 0.5  # the cached step moves the latents, a little
    assert "paired timing" in completed.stdout and "**1.000x**" in completed.stdout


def test_paired_methods_are_parsed_with_clear_errors():
    from bench.methods import CompileSettings
    from bench.paired import parse_method

    settings = CompileSettings("eager")
    assert parse_method("tgate:I3B0G10", settings).label == "tgate I3B0G10"
    assert parse_method("fastcache:i3b0", settings).label == "fastcache I3B0"
    variant = parse_method("fastcache:I3B0[layout_optimization=true;conv_1x1_as_mm=false]", settings)
    assert variant.label == "fastcache I3B0 [layout_optimization=true;conv_1x1_as_mm=false]"
    assert dict(variant.settings.fastcache_options)["compile_options"] == {"layout_optimization": True,
                                                                          "conv_1x1_as_mm": False}
    assert settings.fastcache_options == ()  # the other methods' settings are untouched
    for text, message in (("deepcache:I3B0G10", "has no gate"), ("tgate:I3B0", "needs a gate"),
                          ("fast:I3B0", "is not one of"), ("eager:I3B0", "is not one of"),
                          ("fastcache:I3B0[layout_optimization]", "is not NAME=VALUE")):
        with pytest.raises(ValueError, match=message):
            parse_method(text, settings)
