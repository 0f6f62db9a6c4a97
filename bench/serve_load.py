"""Load test of ``python -m fastcache serve``: the same server run with plain diffusers, DeepCache
and fastcache (with and without batching), driven the same way, side by side in one run.

    python -m bench serve-load --preset tiny --concurrency 1,4,8 --requests 64 --soak-requests 1000

For each server: start it (``--accelerator none|deepcache|fastcache``, the same flags otherwise;
``fastcache-tgate`` adds ``--gate-step``, and runs only when named in ``--servers``),
wait for /ready, then

1. closed loop: at each concurrency level, that many clients each send a request as soon as their
   previous one returned, `--requests` requests per level;
2. open loop: Poisson arrivals at `--rate` requests/s (``auto``: half the images/s this server
   reached at the highest concurrency, the "half the saturating rate" point);
3. soak: `--soak-requests` more at the highest concurrency, for the server's memory growth;

then read its /metrics (compilations since warm-up, batch sizes, resident memory) and stop it with
SIGTERM (its exit status is recorded). Latency is arrival to response at the client, p50/p90/p99;
images/s is successful images over the phase's wall time; every non-200 is an error.
``--url`` drives an already running server instead. Results go to
``<out>/serve-load-<preset or --label>-<timestamp>.{json,md}`` and a sample image per server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import math
import os
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVERS = {  # name -> the flags that differ between the servers
    "diffusers": ["--accelerator", "none"],
    "deepcache": ["--accelerator", "deepcache"],
    "fastcache": ["--accelerator", "fastcache"],
    "fastcache-no-batching": ["--accelerator", "fastcache", "--no-batching"],
    "fastcache-tgate": ["--accelerator", "fastcache"],  # + --gate-step (own_flags)
}
DEFAULT_SERVERS = ("diffusers", "deepcache", "fastcache", "fastcache-no-batching")


def own_flags(name: str, args: argparse.Namespace) -> list[str]:
    """The flags of server `name` on top of the shared ones."""
    return SERVERS[name] + (["--gate-step", str(args.gate_step)] if name == "fastcache-tgate" else [])


# -- a server in a subprocess -------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value} (prometheus-client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def metric(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """One sample's value (0 when absent: a labelled counter not incremented yet)."""
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


@dataclass
class ServerProcess:
    """``python -m fastcache serve --port <port> <flags>`` in a subprocess, output to `log_path`."""

    flags: list[str]
    port: int = field(default_factory=free_port)
    api_key: str | None = None
    log_path: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self) -> "ServerProcess":
        if self.log_path is None:
            handle, self.log_path = tempfile.mkstemp(prefix="fastcache-serve-", suffix=".log")
            os.close(handle)
        command = [sys.executable, "-m", "fastcache", "serve", "--port", str(self.port), *self.flags]
        if self.api_key:
            command += ["--api-key", self.api_key]
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")  # this checkout's fastcache
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path or "", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Poll /ready until 200; raise with the server's log if it exits or takes too long."""
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/ready", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the server was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        import requests

        response = requests.get(self.url + "/metrics", timeout=30)
        response.raise_for_status()
        return parse_metrics(response.text)

    def stop(self, timeout: float = 120.0) -> int | None:
        """SIGTERM (the server drains, then exits 0); SIGKILL after `timeout`. Returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


# -- load -----------------------------------------------------------------------------------------
@dataclass
class Phase:
    """One load phase's outcomes: (latency s, status, images) per request, and its wall time."""

    name: str
    outcomes: list[tuple[float, int, int]] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        ok = sorted(latency for latency, status, _ in self.outcomes if status == 200)
        images = sum(count for _, status, count in self.outcomes if status == 200)
        errors: dict[str, int] = {}
        for _, status, _ in self.outcomes:
            if status != 200:
                errors[str(status)] = errors.get(str(status), 0) + 1
        return {
            "phase": self.name, "requests": len(self.outcomes), "ok": len(ok), "errors": sum(errors.values()),
            "errors_by_status": errors, "wall_s": self.wall_s,
            "images_per_s": images / self.wall_s if self.wall_s > 0 else 0.0,
            "p50_s": _percentile(ok, 50), "p90_s": _percentile(ok, 90), "p99_s": _percentile(ok, 99),
            "mean_s": statistics.fmean(ok) if ok else None,
        }


def _percentile(values: list[float], percent: float) -> float | None:
    """Nearest-rank percentile of sorted `values`."""
    if not values:
        return None
    rank = max(1, math.ceil(percent / 100 * len(values)))
    return values[rank - 1]


@dataclass
class LoadSettings:
    prompt: str
    steps: int
    size: str | None
    seed: int = 0


async def _send(client: Any, url: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[float, int, int, Any]:
    started = time.perf_counter()
    try:
        response = await client.post(url + "/v1/images/generations", json=body, headers=headers)
        status = response.status_code
        data = response.json().get("data", []) if status == 200 else []
    except Exception:  # noqa: BLE001 - a transport error is an error of the server under test
        status, data = 0, []
    return time.perf_counter() - started, status, len(data), data


def _body(settings: LoadSettings, index: int) -> dict[str, Any]:
    body = {"prompt": f"{settings.prompt} {index}", "n": 1, "seed": settings.seed + index,
            "num_inference_steps": settings.steps}
    if settings.size:
        body["size"] = settings.size
    return body


async def closed_loop(url: str, headers: dict[str, str], settings: LoadSettings, concurrency: int,
                      requests: int, first_index: int = 0) -> Phase:
    """`concurrency` clients, each sending its next request when its previous one returns."""
    import httpx

    phase, counter = Phase(f"closed c={concurrency}"), iter(range(first_index, first_index + requests))
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def worker() -> None:
            for index in counter:
                latency, status, images, _ = await _send(client, url, headers, _body(settings, index))
                phase.outcomes.append((latency, status, images))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        phase.wall_s = time.perf_counter() - started
    return phase


async def open_loop(url: str, headers: dict[str, str], settings: LoadSettings, rate: float, requests: int,
                    first_index: int = 0, seed: int = 0) -> Phase:
    """Poisson arrivals at `rate` requests/s (exponential gaps from a seeded generator), each
    request sent at its arrival time whatever the server is doing."""
    import httpx

    phase, gaps = Phase(f"open {rate:.3g} req/s"), random.Random(seed)
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None)) as client:
        async def one(index: int) -> None:
            latency, status, images, _ = await _send(client, url, headers, _body(settings, index))
            phase.outcomes.append((latency, status, images))

        started, arrival, tasks = time.perf_counter(), 0.0, []
        for index in range(first_index, first_index + requests):
            arrival += gaps.expovariate(rate)
            delay = started + arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index)))
        await asyncio.gather(*tasks)
        phase.wall_s = time.perf_counter() - started
    return phase


async def sample_image(url: str, headers: dict[str, str], settings: LoadSettings) -> tuple[bytes | None, int]:
    """One request (seed 0), its PNG and status: the image every server is compared by."""
    import httpx

    async with httpx.AsyncClient(timeout=None) as client:
        _, status, _, data = await _send(client, url, headers, {**_body(settings, 0), "prompt": settings.prompt})
    return (base64.b64decode(data[0]["b64_json"]) if data else None), status


# -- one server, all phases ---------------------------------------------------------------------
def drive(url: str, headers: dict[str, str], settings: LoadSettings, args: argparse.Namespace,
          read_metrics: Any) -> dict[str, Any]:
    """Every phase against the server at `url`; `read_metrics()` returns its parsed /metrics."""
    png, status = asyncio.run(sample_image(url, headers, settings))
    before = read_metrics()
    phases, index = [], 1
    for concurrency in args.concurrency:
        print(f"  closed loop, concurrency {concurrency}, {args.requests} requests", flush=True)
        phases.append(asyncio.run(closed_loop(url, headers, settings, concurrency, args.requests, index)))
        index += args.requests
        print(f"    {_line(phases[-1].summary())}", flush=True)
    saturated = phases[-1].summary()["images_per_s"] if phases else 0.0
    rate = saturated / 2 if args.rate == "auto" else float(args.rate)
    if args.open_requests and rate > 0:
        print(f"  open loop, {rate:.3g} req/s, {args.open_requests} requests", flush=True)
        phases.append(asyncio.run(open_loop(url, headers, settings, rate, args.open_requests, index, args.seed)))
        index += args.open_requests
        print(f"    {_line(phases[-1].summary())}", flush=True)
    soak_before = read_metrics()
    if args.soak_requests:
        concurrency = max(args.concurrency)
        print(f"  soak, concurrency {concurrency}, {args.soak_requests} requests", flush=True)
        soak = asyncio.run(closed_loop(url, headers, settings, concurrency, args.soak_requests, index))
        soak.name = f"soak c={concurrency}"
        phases.append(soak)
        print(f"    {_line(soak.summary())}", flush=True)
    after = read_metrics()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    rss = "process_resident_memory_bytes"
    return {
        "sample_status": status, "sample_png": png,
        "phases": [phase.summary() for phase in phases],
        "open_loop_rate": rate if args.open_requests else None,
        "compilations_since_warmup": metric(after, "fastcache_serve_compilations_since_warmup"),
        "warmup_s": metric(after, "fastcache_serve_warmup_seconds"),
        "mean_batch_images": (delta("fastcache_serve_batch_images_sum") / delta("fastcache_serve_batch_images_count")
                              if delta("fastcache_serve_batch_images_count") else None),
        "padding_images": delta("fastcache_serve_padding_images_total"),
        "unet_steps": {kind: delta("fastcache_serve_unet_steps_total", kind=kind) for kind in ("refresh", "cached")},
        "rss_bytes_start": metric(before, rss), "rss_bytes_end": metric(after, rss),
        "rss_bytes_soak_start": metric(soak_before, rss),
        "soak_requests": args.soak_requests,
    }


def _line(summary: dict[str, Any]) -> str:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    return (f"{summary['images_per_s']:.2f} img/s, p50 {seconds(summary['p50_s'])} p90 {seconds(summary['p90_s'])} "
            f"p99 {seconds(summary['p99_s'])} s, errors {summary['errors']}")


def _server_flags(args: argparse.Namespace, model_dir: str | None) -> list[str]:
    flags = ["--batch-sizes", ",".join(map(str, args.batch_sizes)), "--default-steps", str(args.steps),
             "--max-steps", str(max(100, args.steps)), "--max-queue", str(args.max_queue),
             "--request-timeout", str(args.request_timeout), "--max-batch-delay-ms", str(args.max_batch_delay_ms),
             "--cache-interval", str(args.cache_interval), "--cache-branch-id", str(args.cache_branch_id),
             "--compile-backend", args.compile_backend, "--dtype", args.dtype]
    if args.size:
        flags += ["--sizes", args.size]
    if model_dir:
        flags += ["--model", model_dir, "--model-name", args.preset]
    if args.device:
        flags += ["--device", args.device]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    return flags


def _model_folder(args: argparse.Namespace, root: str) -> str | None:
    """The folder the servers load: --model, none for the tiny preset (the server's default), or
    the preset's random-weight pipeline saved with save_pretrained."""
    if args.model:
        return args.model
    if args.preset == "tiny":
        return None
    import torch

    from .args import torch_dtype
    from .presets import get_preset

    folder = os.path.join(root, args.preset)
    print(f"saving the {args.preset} preset's pipeline to {folder}", flush=True)
    pipe = get_preset(args.preset).build(torch.device("cpu"), torch_dtype("fp32", torch.device("cpu")), args.seed)
    pipe.save_pretrained(folder)
    return folder


# -- report ---------------------------------------------------------------------------------------
def targets(servers: dict[str, dict[str, Any]], concurrency: int) -> list[tuple[str, str, bool | None]]:
    """The issue's targets: (what, measured, met) with None where this run cannot tell."""
    def rate(name: str) -> float | None:
        for phase in servers.get(name, {}).get("phases", []):
            if phase["phase"] == f"closed c={concurrency}":
                return phase["images_per_s"]
        return None

    rows: list[tuple[str, str, bool | None]] = []
    fast, plain, deep = rate("fastcache"), rate("diffusers"), rate("deepcache")
    if fast and plain:
        rows.append((f"fastcache >= 2x plain diffusers images/s at c={concurrency}", f"{fast / plain:.2f}x",
                     fast >= 2 * plain))
    if fast and deep:
        rows.append((f"fastcache > DeepCache images/s at c={concurrency}", f"{fast / deep:.2f}x", fast > deep))
    gated = rate("fastcache-tgate")
    if fast and gated:
        rows.append((f"fastcache-tgate over fastcache images/s at c={concurrency} (no target)", f"{gated / fast:.2f}x", None))
    for name, result in servers.items():
        errors = sum(phase["errors"] for phase in result["phases"]) + (result["sample_status"] != 200)
        rows.append((f"{name}: 0 errors", str(errors), errors == 0))
        if name.startswith("fastcache"):
            compiled = int(result["compilations_since_warmup"])
            rows.append((f"{name}: 0 compilations after warm-up", str(compiled), compiled == 0))
        if result.get("soak_requests"):
            growth = (result["rss_bytes_end"] - result["rss_bytes_soak_start"]) / 2**20
            rows.append((f"{name}: RSS growth < 50 MB over {result['soak_requests']} requests", f"{growth:.1f} MB",
                         growth < 50 if result["soak_requests"] >= 1000 else None))
        open_phase = next((phase for phase in result["phases"] if phase["phase"].startswith("open")), None)
        if open_phase and open_phase["p50_s"]:
            ratio = open_phase["p99_s"] / open_phase["p50_s"]
            rows.append((f"{name}: p99 <= 2x p50 at half the saturating rate", f"{ratio:.2f}x", ratio <= 2))
    return rows


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    env = meta["environment"]
    lines = [
        f"# Serving load test: {meta['label'] or meta['preset']}" + (f" at {meta['url']}" if meta['url'] else ""), "",
        f"`{meta['command']}`", "",
        f"{env['device_name']}, {env['cpu_count']} CPUs, torch {env['versions']['torch']}, diffusers "
        f"{env['versions']['diffusers']}, DeepCache {env['versions']['DeepCache']}, fastcache "
        f"{env['versions']['fastcache']} (git {str(env['git_commit'])[:10]}"
        f"{', uncommitted changes' if env['fastcache_dirty'] else ''}); load average "
        f"{env['load_average_at_start']} at start, {meta['load_average_at_end']} at end.", "",
        f"Requests: size {meta['size'] or 'the default'}, {meta['steps']} steps, n=1, seeds 0,1,2,...; servers: "
        f"`python -m fastcache serve {shlex.join(meta['server_flags'])}` plus each server's own flags.", "",
        "| server | phase | requests | errors | images/s | p50 s | p90 s | p99 s |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for name, server in result["servers"].items():
        for phase in server["phases"]:
            lines.append(f"| {name} | {phase['phase']} | {phase['requests']} | {phase['errors']} "
                         f"| {phase['images_per_s']:.2f} | {cell(phase['p50_s'])} | {cell(phase['p90_s'])} "
                         f"| {cell(phase['p99_s'])} |")
    lines += ["", "| server | own flags | warm-up s | mean images per call | padding images | refresh / cached steps "
              "| compilations after warm-up | RSS start -> end MB | exit status |", "|---|---|---|---|---|---|---|---|---|"]
    for name, server in result["servers"].items():
        steps = server["unet_steps"]
        mean = server["mean_batch_images"]
        lines.append(
            f"| {name} | `{' '.join(server['flags'])}` | {server['warmup_s']:.1f} "
            f"| {'-' if mean is None else f'{mean:.2f}'} | {int(server['padding_images'])} "
            f"| {int(steps['refresh'])} / {int(steps['cached'])} | {int(server['compilations_since_warmup'])} "
            f"| {server['rss_bytes_start'] / 2**20:.0f} -> {server['rss_bytes_end'] / 2**20:.0f} "
            f"| {server['exit_status']} |")
    lines += ["", "Targets (the issue's, at the highest concurrency):", "", "| target | measured | met |", "|---|---|---|"]
    for what, measured, met in result["targets"]:
        lines.append(f"| {what} | {measured} | {'-' if met is None else ('yes' if met else 'NO')} |")
    if result.get("samples"):
        lines += ["", "Sample images (seed 0): " + ", ".join(f"[{name}]({path})" for name, path in result["samples"].items())]
    return "\n".join(lines) + "\n"


# -- command --------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .args import DEFAULT_PROMPT, RESULTS, ints

    parser.add_argument("--preset", default="tiny", choices=("tiny", "cpu-small", "sd15", "sd21", "sdxl"),
                        help="the pipeline the servers load (random weights; tiny is the server's default)")
    parser.add_argument("--model", default=None, help="a diffusers folder instead of the preset's pipeline")
    parser.add_argument("--servers", default=",".join(DEFAULT_SERVERS),
                        help=f"comma-separated, from {', '.join(SERVERS)}")
    parser.add_argument("--url", default=None, help="drive this running server instead of starting any")
    parser.add_argument("--api-key", default=None, help="for --url")
    parser.add_argument("--label", default=None,
                        help="names the result files serve-load-<label>-<time> (default: the preset; e.g. ray-2 "
                             "for a --url run against two Ray replicas)")
    parser.add_argument("--concurrency", type=ints, default=[1, 4, 8], help="closed-loop levels")
    parser.add_argument("--requests", type=int, default=64, help="requests per closed-loop level")
    parser.add_argument("--rate", default="auto",
                        help="open-loop requests/s; auto: half the images/s at the highest concurrency")
    parser.add_argument("--open-requests", type=int, default=64, help="open-loop requests (0: no open loop)")
    parser.add_argument("--soak-requests", type=int, default=0,
                        help="requests at the highest concurrency for memory growth (the target counts 1000)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's native size)")
    parser.add_argument("--batch-sizes", type=ints, default=[1, 2, 4, 8], help="the servers' --batch-sizes")
    parser.add_argument("--max-batch-delay-ms", type=float, default=20.0)
    parser.add_argument("--max-queue", type=int, default=1024)
    parser.add_argument("--request-timeout", type=float, default=1800.0)
    parser.add_argument("--cache-interval", type=int, default=3)
    parser.add_argument("--cache-branch-id", type=int, default=0)
    parser.add_argument("--gate-step", type=int, default=10, help="the fastcache-tgate server's --gate-step")
    parser.add_argument("--compile-backend", default="inductor", help="fastcache's (eager: the smoke test)")
    parser.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="the servers' --threads")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ready-timeout", type=float, default=3600.0, help="seconds to wait for each server's /ready")
    parser.add_argument("--out", default=RESULTS)


def main(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from .env import environment, load_average
    from .results import write_result_files

    unknown = [name for name in args.servers.split(",") if name not in SERVERS]
    if unknown and not args.url:
        raise SystemExit(f"unknown servers {unknown}; choose from {', '.join(SERVERS)}")
    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    stem = f"serve-load-{args.label or args.preset}-{stamp}"
    settings = LoadSettings(args.prompt, args.steps, args.size, args.seed)
    env = environment(torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    root = tempfile.mkdtemp(prefix="bench-serve-load-")
    # SIGTERM as SystemExit, so that `finally` still stops the server it started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    servers: dict[str, dict[str, Any]] = {}
    samples: dict[str, str] = {}
    base_flags: list[str] = []
    try:
        if args.url:
            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

            def read_remote() -> Any:
                import requests

                return parse_metrics(requests.get(args.url.rstrip("/") + "/metrics", timeout=30).text)

            print(f"target {args.url}", flush=True)
            servers["target"] = {"flags": [], "exit_status": None,
                                 **drive(args.url.rstrip("/"), headers, settings, args, read_remote)}
        else:
            model_dir = _model_folder(args, root)
            base_flags = _server_flags(args, model_dir)
            for name in args.servers.split(","):
                server = ServerProcess(base_flags + own_flags(name, args), log_path=os.path.join(root, f"{name}.log"))
                print(f"{name}: starting {shlex.join(server.flags)}", flush=True)
                server.start()
                try:
                    server.wait_ready(args.ready_timeout)
                    servers[name] = {"flags": own_flags(name, args),
                                     **drive(server.url, server.headers, settings, args, server.metrics)}
                finally:
                    status = server.stop()
                if name in servers:
                    servers[name]["exit_status"] = status
        for name, server in servers.items():
            png = server.pop("sample_png")
            if png:
                folder = os.path.join(args.out, stem + "-samples")
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, f"{name}.png"), "wb") as handle:
                    handle.write(png)
                samples[name] = f"{stem}-samples/{name}.png"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    meta = {
        "command": "python -m bench " + shlex.join(argv), "preset": args.preset, "label": args.label,
        "url": args.url, "model": args.model,
        "steps": args.steps, "size": args.size, "concurrency": args.concurrency, "requests": args.requests,
        "open_requests": args.open_requests, "rate": args.rate, "soak_requests": args.soak_requests,
        "server_flags": base_flags, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "total_s": time.time() - started, "environment": env, "load_average_at_end": load_average(),
    }
    result = {"meta": meta, "servers": servers, "targets": targets(servers, max(args.concurrency)), "samples": samples}
    text = markdown(result)
    paths = write_result_files(args.out, stem, result, text)
    print(text)
    print(f"wrote {paths['json']} and {paths['markdown']}")
    return 0
