"""Result files: JSON (every figure), Markdown tables, a speed-up vs quality plot, sample images.

File names carry the preset and a timestamp (``<preset>-<YYYYmmdd-HHMMSS>.*``); ``INDEX.md`` in the
folder links the newest run of each kind.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .methods import reference_kind
from .results import BenchResult, MethodResult, to_jsonable, write_result_files
from .timing import TimingStats


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.4g}"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _db(value: float) -> str:
    return "inf (identical)" if math.isinf(value) else f"{value:.2f}"


def _e(value: float) -> str:
    return "0" if value == 0 else f"{value:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


_NAMES = {"deepcache": "DeepCache", "tgate": "tgate"}


def _column_labels(result: BenchResult) -> tuple[list[str], list[str]]:
    """Method columns (eager, compile, then DeepCache, or tgate for a config with a gate, and
    fastcache per config) and the configs."""
    configs = list(result.meta["settings"]["configs"])
    labels = ["eager", "compile"]
    for config in configs:
        labels += [f"{reference_kind(config)} {config}", f"fastcache {config}"]
    return labels, configs


def speed_table(result: BenchResult, mode: str) -> list[str]:
    """Rows shape; columns method x config: median seconds (speed-up over eager), and after each
    config's DeepCache and fastcache columns, fastcache's speed-up over DeepCache."""
    _, configs = _column_labels(result)
    header = ["resolution, batch", "eager", "compile"]
    for config in configs:
        reference = reference_kind(config)
        header += [f"{reference} {config}", f"fastcache {config}", f"fastcache / {_NAMES[reference]} {config}"]
    rows = []
    for shape in result.shapes:
        def cell(label: str) -> str:
            m = shape.get(label)
            stats: TimingStats = getattr(m, mode)
            speedup = m.speedup_end_to_end if mode == "end_to_end" else m.speedup_denoise
            return f"{_s(stats.median)} ({_x(speedup)})"

        row = [shape.label, cell("eager"), cell("compile")]
        for config in configs:
            agreement = next(a for a in shape.agreements if a.config == config)
            ratio = agreement.speedup_end_to_end if mode == "end_to_end" else agreement.speedup_denoise
            row += [cell(f"{reference_kind(config)} {config}"), cell(f"fastcache {config}"), f"**{_x(ratio)}**"]
        rows.append(row)
    return _table(header, rows)


def _stats_cell(stats: TimingStats | None) -> str:
    if stats is None:
        return "-"
    return f"{_s(stats.median)} [{_s(stats.min)}, {_s(stats.max)}] n={len(stats.runs)}"


def spread_table(result: BenchResult) -> list[str]:
    header = ["resolution, batch", "method", "end to end: median [min, max]", "IQR", "denoise: median [min, max]",
              "IQR", "load average after (1 min)"]
    rows = [
        [shape.label, m.label, _stats_cell(m.end_to_end), _s(m.end_to_end.iqr), _stats_cell(m.denoise),
         _s(m.denoise.iqr), "-" if not m.load_average else f"{m.load_average[0]:.2f}"]
        for shape in result.shapes for m in shape.methods
    ]
    return _table(header, rows)


def warmup_table(result: BenchResult) -> list[str]:
    header = ["resolution, batch", "method", "setup s", "first image s (setup + first call)", "graphs compiled",
              "inductor FX cache hit/miss"]
    rows = []
    for shape in result.shapes:
        for m in shape.methods:
            warm = m.details.get("warmup")
            compiled = str(warm["compilations"]) if warm else "-"
            cache = m.compile_cache
            rows.append([shape.label, m.label, _s(m.setup_s), _s(m.first_image_s), compiled,
                         f"{cache['fxgraph_cache_hit']}/{cache['fxgraph_cache_miss']}"])
    return _table(header, rows)


def restart_table(result: BenchResult) -> list[str]:
    if not result.restarts:
        return ["Not measured in this run (`--restart none`)."]
    header = ["config", "resolution, batch", "whole process s", "interpreter + imports s", "pipeline build s",
              "accelerate + warmup s", "first image after warmup s", "graphs compiled", "inductor FX cache hit/miss"]
    rows = [
        [r.config, r.shape, _s(r.process_s), _s(r.import_s), _s(r.build_s), _s(r.accelerate_warmup_s),
         _s(r.first_image_after_warmup_s), str(r.compilations),
         f"{r.compile_cache['fxgraph_cache_hit']}/{r.compile_cache['fxgraph_cache_miss']}"]
        for r in result.restarts
    ]
    return _table(header, rows)


def step_table(result: BenchResult) -> list[str]:
    """Wall time per step kind, and the host's share: a host median near the wall median means
    the step is bound by issuing it, not by the GPU running it."""
    header = ["resolution, batch", "method", "full U-Net call s", "refresh step s", "cached step s",
              "host s (full/refresh/cached medians)", "calls (full/refresh/cached)"]
    rows = []
    for shape in result.shapes:
        for m in shape.methods:
            st = m.steps
            counts = "/".join(str(sum(1 for k in st.pattern if k == kind)) for kind in ("full", "refresh", "cached"))
            host = "/".join(_s(h.median) if h is not None else "-" for h in (st.full_host, st.refresh_host, st.cached_host))
            rows.append([shape.label, m.label, _stats_cell(st.full), _stats_cell(st.refresh), _stats_cell(st.cached),
                         host, counts])
    return _table(header, rows)


def loop_call_table(result: BenchResult) -> list[str]:
    """Each group of U-Net calls in a denoising call: its count, per-call time and share of the loop."""
    header = ["resolution, batch", "method", "U-Net calls", "calls per loop", "s per call: median [min, max]",
              "s per loop (calls x median)"]
    rows = []
    for shape in result.shapes:
        for m in shape.methods:
            loop = m.loop_calls
            if loop is None:
                continue
            for label, stats in loop.groups.items():
                count = loop.labels.count(label)
                rows.append([shape.label, m.label, label, str(count), _stats_cell(stats), _s(count * stats.median)])
            rows.append([shape.label, m.label, "all U-Net calls", str(len(loop.labels)), "-", _s(loop.unet.median)])
            rows.append([shape.label, m.label, "whole denoising call", "-", "-", _s(loop.loop.median)])
    return _table(header, rows) if rows else ["Not measured in this run."]


def floor_table(result: BenchResult) -> list[str]:
    """Each method's steps against the floor: MACs counted from the config / measured matrix rate."""
    lines: list[str] = []
    header = ["resolution, batch", "method", "full/refresh step s", "floor s", "x floor", "cached step s",
              "floor s", "x floor"]
    rows = []
    for shape in result.shapes:
        floor = shape.floor
        if floor is None:
            continue
        work = floor.work_by_branch[0]
        lines.append(
            f"- {shape.label}: U-Net batch {work.batch}, full U-Net {work.full_macs / 1e9:.4g} GMACs "
            f"({work.full_conv_linear_macs / 1e9:.4g} conv+linear, {work.full_attention_macs / 1e9:.4g} attention); "
            + "; ".join(f"shallow branch {b}: {w.shallow_macs / 1e9:.4g} GMACs" for b, w in sorted(floor.work_by_branch.items()))
            + f"; dense matrix rate {floor.rate.flops_per_s / 1e12:.2f} TFLOP/s ({floor.rate.dtype}, "
            f"{floor.rate.size}^3 GEMM)"
        )
        for step in floor.steps:
            rows.append([
                shape.label, step.method, _s(step.full_or_refresh_s), _s(step.full_floor_s),
                _x(step.full_ratio), _s(step.cached_s), _s(step.shallow_floor_s), _x(step.cached_ratio),
            ])
    if not rows:
        return ["No floor: no direct U-Net step was timed."]
    return lines + [""] + _table(header, rows)


def memory_lines(result: BenchResult) -> list[str]:
    """Peak memory per method and its extra over eager. On CUDA compared by reserved bytes: a CUDA
    Graph replay allocates nothing (its activations sit in the graph pool, reserved but not
    allocated), so allocated peaks would hide what fastcache's graphs hold. A CPU has no reserved
    figure and no graph pool, so there the comparison is by allocated tensor bytes."""
    methods = [m for s in result.shapes for m in s.methods]
    notes = sorted({m.peak_memory_note for m in methods if m.peak_memory_note})
    by_reserved = any(m.peak_reserved_bytes is not None for m in methods)
    if not by_reserved and all(m.peak_allocated_bytes is None for m in methods):
        return [f"Peak memory: {'; '.join(notes)}. Recorded as null in the JSON."]

    def compared(m: MethodResult) -> int | None:
        return m.peak_reserved_bytes if by_reserved else m.peak_allocated_bytes

    header = ["resolution, batch", "method", "peak reserved MiB", "peak allocated MiB",
              f"vs eager ({'reserved' if by_reserved else 'allocated'})", "fastcache's buffers + graph pool MiB"]
    rows = []
    for s in result.shapes:
        eager = next((compared(m) for m in s.methods if m.method == "eager"), None)
        for m in s.methods:
            peak = compared(m)
            extra = "-" if peak is None or not eager else f"{(peak - eager) / eager:+.1%}"
            own = (m.details or {}).get("fastcache_memory")
            rows.append([s.label, m.label, _mib(m.peak_reserved_bytes), _mib(m.peak_allocated_bytes), extra,
                         "-" if own is None else _mib(own["total"])])
    return _table(header, rows) + ([""] + [f"Measured as: {note}." for note in notes] if notes else [])


def _mib(value: int | None) -> str:
    if value is None:
        return "-"
    mib = value / 2**20
    return f"{mib:.0f}" if mib >= 100 else f"{mib:.1f}"


def quality_table(result: BenchResult) -> list[str]:
    header = ["resolution, batch", "method", "PSNR dB", "SSIM", "latent rel. L2"]
    rows = []
    for shape in result.shapes:
        for m in shape.methods:
            q = m.quality_vs_eager
            assert q is not None
            rows.append([shape.label, m.label, _db(q.psnr), f"{q.ssim:.4f}", _e(q.latent_rel_l2)])
    return _table(header, rows)


def non_finite_lines(result: BenchResult) -> list[str]:
    bad = [f"{s.label} {m.label}" for s in result.shapes for m in s.methods if not m.outputs_finite]
    if not bad:
        return []
    return [f"**Warning: NaN or inf in the outputs of {', '.join(bad)}** (random weights overflowing in this"
            " dtype?); their quality figures are not meaningful.", ""]


def agreement_table(result: BenchResult) -> list[str]:
    header = ["resolution, batch", "config", "fastcache vs the package (DeepCache; tgate for G configs): "
              "PSNR dB / SSIM / latent rel. L2", "package vs eager: rel. L2", "fastcache vs eager: rel. L2",
              "closer to each other than to eager by"]
    rows = []
    for shape in result.shapes:
        for a in shape.agreements:
            q = a.fastcache_vs_deepcache
            rows.append([shape.label, a.config, f"{_db(q.psnr)} / {q.ssim:.4f} / {_e(q.latent_rel_l2)}",
                         _e(a.deepcache_vs_eager.latent_rel_l2), _e(a.fastcache_vs_eager.latent_rel_l2),
                         "identical outputs" if math.isinf(a.closeness_ratio) else f"{a.closeness_ratio:.3g}x"])
    return _table(header, rows)


def markdown(result: BenchResult, plot_name: str | None, sample_dir: str | None) -> str:
    meta, settings, env = result.meta, result.meta["settings"], result.meta["environment"]
    v = env["versions"]
    lines = [
        f"# fastcache benchmark: `{settings['preset']}`",
        "",
        f"{meta['preset_description']}. {settings['steps']} steps, guidance {settings['guidance_scale']}, "
        f"{settings['dtype']} on {env['device_name']} ({env['device']}), median of {settings['runs']} timed runs "
        f"after a first (untimed) call; seed {settings['seed']}, prompt \"{settings['prompt']}\".",
        "",
        f"torch {v['torch']}, diffusers {v['diffusers']}, DeepCache {v['DeepCache']}, fastcache {v['fastcache']}"
        f" (commit {env['git_commit'] or '?'}{', uncommitted fastcache changes' if env['fastcache_dirty'] else ''}),"
        f" triton {v['triton'] or 'not installed'}, python {env['python']}, {env['cpu_count']} CPUs "
        f"({env['cpu_model']}), {env['torch_threads']} torch threads; compile backend "
        f"`{settings['compile_backend']}`, fastcache CUDA Graphs: {settings['cuda_graphs']}. Load average "
        f"(1/5/15 min) at the start {env.get('load_average_at_start')}, at the end {env.get('load_average_at_end')}; "
        f"whole run {meta.get('total_s', 0):.0f} s.",
        "",
        f"Command: `{meta['command']}`",
        "",
        "## Seconds per image batch, end to end (text encoding, denoising loop, VAE decode)",
        "",
        "Median seconds per pipeline call (speed-up over `eager`); `fastcache / DeepCache`: fastcache's "
        "speed-up over DeepCache at the same config (`fastcache / tgate`: over the tgate package, for a "
        "config with a gate, `G<step>`).",
        "",
        *speed_table(result, "end_to_end"),
        "",
        "## Seconds per image batch, denoising loop only (precomputed prompt embeddings, latent output)",
        "",
        *speed_table(result, "denoise"),
        "",
    ]
    if plot_name:
        lines += [f"![speed-up against quality]({plot_name})", ""]
    lines += [
        "## Spread of the timed runs (seconds)",
        "",
        *spread_table(result),
        "",
        "## Warm-up and compilation (excluded from the timed runs)",
        "",
        "`setup`: enabling the method (fastcache: `accelerate` + `warmup`, which compiles both graphs"
        " for this shape). `first image`: setup plus the first end-to-end call (for `compile`, where"
        f" torch.compile compiles). Inductor cache directory: {meta['compile_cache']['description']}.",
        "",
        *warmup_table(result),
        "",
        "### After a process restart (inductor's on-disk cache filled by the runs above)",
        "",
        *restart_table(result),
        "",
        "## U-Net calls inside a denoising call",
        "",
        "Extra untimed denoising calls (as many as the timed runs), each U-Net call timed by forward hooks"
        " from an idle device to its work finished; grouped by what fastcache says each call ran (refresh or"
        " cached; `b<rows>`: the batch rows it ran, halved after a TGATE gate); other methods' calls in one"
        " group. The loop's rest is the scheduler and the pipeline's Python.",
        "",
        *loop_call_table(result),
        "",
        "## U-Net step times (direct `pipe.unet(...)` calls with the pipeline's real inputs)",
        "",
        "Each call is classified by the method's own state (fastcache's step counters, DeepCache's step"
        " index); `[min, max]`.",
        "",
        *step_table(result),
        "",
        "## Against the floor (the card's dense matrix rate over the U-Net's MACs)",
        "",
        "MACs are counted from the U-Net config on the meta device (classifier-free guidance included in"
        " the U-Net batch); the rate is one large GEMM in the run's dtype; `x floor` = measured / floor.",
        "",
        *floor_table(result),
        "",
        "## Peak device memory",
        "",
        *memory_lines(result),
        "",
        "## Quality against eager (same seed and prompt)",
        "",
        "PSNR and SSIM of the decoded images (mean over the batch), relative L2 error of the final latents.",
        "",
        *non_finite_lines(result),
        *quality_table(result),
        "",
        "## DeepCache and fastcache at the same config",
        "",
        "For a config with a gate (`G<step>`, TGATE), the package compared is tgate's DeepCache loader.",
        "",
        "`closer ... by`: the smaller of the two latent rel. L2 errors against eager, divided by their"
        " rel. L2 against each other.",
        "",
        *agreement_table(result),
        "",
    ]
    if sample_dir:
        lines += [f"Sample images (first image of the first shape, per method): `{sample_dir}/`.", ""]
    return "\n".join(lines)


_STYLE = {"eager": ("s", "tab:blue"), "compile": ("D", "tab:orange"), "deepcache": ("o", "tab:green"),
          "tgate": ("v", "tab:purple"), "fastcache": ("^", "tab:red")}


def plot(result: BenchResult, path: str) -> None:
    """Speed-up over eager against PSNR vs eager: a row per shape, denoising loop and end to end.

    A grey line joins DeepCache and fastcache at the same config (labelled once): same height means
    the same images, the horizontal gap is fastcache's speed-up over DeepCache. PSNRs far above the
    cached methods' (eager: identical, compile: float rounding) are drawn on a ceiling line with
    their value written beside them, so the cached methods' trade-off stays readable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cached = [m.quality_vs_eager.psnr for s in result.shapes for m in s.methods
              if m.config and m.quality_vs_eager and math.isfinite(m.quality_vs_eager.psnr)]
    ceiling = 10.0 * math.ceil((max(cached) if cached else 40.0) / 10.0) + 10.0
    modes = (("speedup_denoise", "denoising loop"), ("speedup_end_to_end", "end to end"))
    rows = len(result.shapes)
    figure, axes = plt.subplots(rows, 2, figsize=(12, 3.6 * rows + 0.6), squeeze=False)
    for row, shape in enumerate(result.shapes):
        for column, (mode, title) in enumerate(modes):
            axis = axes[row][column]
            for m in shape.methods:
                assert m.quality_vs_eager is not None
                psnr = m.quality_vs_eager.psnr
                marker, color = _STYLE.get(m.method, ("x", "black"))
                x, y = getattr(m, mode), min(psnr, ceiling)
                axis.scatter(x, y, marker=marker, color=color, s=55, label=m.method, zorder=3)
                if psnr > ceiling:
                    value = "identical" if math.isinf(psnr) else f"{psnr:.0f} dB"
                    offset = (6, -11) if m.method == "eager" else (6, 5)
                    axis.annotate(f"{m.method}: {value}", (x, y), fontsize=7, xytext=offset,
                                  textcoords="offset points")
            for config in dict.fromkeys(m.config for m in shape.methods if m.config):
                pair = [shape.get(f"{kind} {config}") for kind in (reference_kind(config), "fastcache")]
                xs = [getattr(m, mode) for m in pair]
                ys = [min(m.quality_vs_eager.psnr, ceiling) for m in pair]  # type: ignore[union-attr]
                axis.plot(xs, ys, color="grey", linewidth=0.8, zorder=2)
                axis.annotate(config, (sum(xs) / 2, max(ys)), fontsize=8, ha="center", xytext=(0, 6),
                              textcoords="offset points")
            axis.axhline(ceiling, color="grey", linewidth=0.5, linestyle=":")
            axis.set_ylim(top=ceiling + 5)
            axis.axvline(1.0, color="grey", linewidth=0.5)
            axis.set_title(f"{result.meta['settings']['preset']} {shape.label}: {title}", fontsize=10)
            axis.set_xlabel("speed-up over eager (median)")
            axis.set_ylabel("PSNR vs eager, dB")
            axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes[0][0].legend(unique.values(), unique.keys(), loc="best", fontsize=8)
    figure.suptitle(f"speed-up against quality; dotted line: {ceiling:.0f} dB ceiling (higher PSNRs drawn on it)",
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def save_samples(samples: dict[str, np.ndarray], directory: str) -> list[str]:
    from PIL import Image

    os.makedirs(directory, exist_ok=True)
    paths = []
    for label, image in samples.items():
        path = os.path.join(directory, label.replace(" ", "-") + ".png")
        Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def write_all(result: BenchResult, out: str, stem: str, samples: dict[str, np.ndarray]) -> dict[str, str]:
    """Write every file; returns {kind: path}."""
    os.makedirs(out, exist_ok=True)
    paths = {
        "json": os.path.join(out, stem + ".json"),
        "markdown": os.path.join(out, stem + ".md"),
        "plot": os.path.join(out, stem + ".png"),
        "samples": os.path.join(out, stem + "-samples"),
    }
    try:
        plot(result, paths["plot"])
    except ImportError as error:  # the lent GPU machine has no matplotlib: keep every measurement
        print(f"[bench] no plot ({error}); the JSON and Markdown are complete without it")
        del paths["plot"]
    save_samples(samples, paths["samples"])
    result.meta["files"] = {k: os.path.basename(p) for k, p in paths.items()}
    plot_name = os.path.basename(paths["plot"]) if "plot" in paths else None
    text = markdown(result, plot_name, os.path.basename(paths["samples"]))
    paths.update(write_result_files(out, stem, to_jsonable(result), text))
    return paths


def summary(result: BenchResult) -> str:
    """What the command prints: the two speed tables and the agreement table."""
    lines = ["End to end, seconds per image batch (speed-up over eager):", *speed_table(result, "end_to_end"), "",
             "Denoising loop only:", *speed_table(result, "denoise"), "",
             "Quality against eager:", *quality_table(result), "",
             "DeepCache vs fastcache at the same config:", *agreement_table(result)]
    return "\n".join(lines)
