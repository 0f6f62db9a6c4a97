"""One fresh process of tests/test_compile_cache.py (run as ``python -m tests.compile_cache_worker``).

Builds the two-level SD pipeline, optionally loads a compile cache file, accelerates with inductor,
warms up, runs one seeded call, optionally saves the compile cache, and writes the final latents
and a JSON report (inductor/AOTAutograd cache counters, the load/save report) to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", default=None)
    parser.add_argument("--save", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))

    import fastcache
    from fastcache.tiny import two_level_sd_pipeline
    from torch._dynamo.utils import counters

    from .helpers import latents

    # The file's mechanics need a real cold inductor compile, not the 12-branch U-Net's (148 C++
    # kernels against 82 here, twice the compile time).
    pipe = two_level_sd_pipeline()
    report: dict = {}
    if args.load:
        report["load"] = dataclasses.asdict(fastcache.load_compile_cache(args.load))
    start = time.perf_counter()
    handle = fastcache.accelerate(pipe, cache_interval=3, cache_branch_id=0)
    handle.warmup(batch_size=1)
    report["warmup_s"] = time.perf_counter() - start
    result = latents(pipe, seed=0, steps=7)
    handle.disable()
    if args.save:
        report["save"] = dataclasses.asdict(fastcache.save_compile_cache(args.save))
    report["counters"] = {group: dict(counters[group]) for group in ("inductor", "aot_autograd", "stats")}
    torch.save(result, os.path.join(args.out, "latents.pt"))
    with open(os.path.join(args.out, "report.json"), "w") as file:
        json.dump(report, file, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
