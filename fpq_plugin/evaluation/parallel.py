"""``fpq eval --jobs N``: the table's rows in N worker processes, merged into one report.

Why processes: a learned-rounding row spends most of its time launching small kernels from Python (measured on an
H100: about 15 ms per iteration on the reference UNet's blocks, with the GPU mostly idle), so on a GPU machine with
several CPU cores N processes sharing one GPU finish the table up to N times sooner. Each worker regenerates the
full-precision images from the same seeds and records the same calibration calls, so its rows are exactly the rows
a single process would compute; the parent merges the workers' folders (:mod:`~fpq_plugin.evaluation.merge`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fpq_plugin.evaluation.harness import Variant
from fpq_plugin.method import get_method_config

__all__ = ["plan_jobs", "run_jobs"]


def _cost(variant: Variant) -> float:
    """Relative run time of a row: learned rounding dominates, layer-wise reconstruction has many more units."""
    if variant.recipe is None:
        return 0.0
    config = get_method_config(variant.method)
    if config.rounding_iters == 0:
        return 1.0
    return (20.0 if config.block_reconstruction else 40.0) * config.rounding_iters / 300


def plan_jobs(variants: Sequence[Variant], jobs: int) -> list[list[Variant]]:
    """Split rows over at most ``jobs`` workers, longest first onto the least-loaded worker; none is empty."""
    jobs = max(1, min(jobs, sum(v.recipe is not None for v in variants) or 1))
    plan: list[list[Variant]] = [[] for _ in range(jobs)]
    load = [0.0] * jobs
    for variant in sorted(variants, key=_cost, reverse=True):
        k = min(range(jobs), key=lambda i: (load[i], len(plan[i])))
        plan[k].append(variant)
        load[k] += _cost(variant)
    return [p for p in plan if p]


def _worker_env(index: int, jobs: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    gpus = env.get("FPQ_EVAL_GPUS")  # e.g. "0,1": spread workers over several GPUs
    if gpus:
        ids = gpus.split(",")
        env["CUDA_VISIBLE_DEVICES"] = ids[index % len(ids)]
    return env


def run_jobs(plan: list[list[Variant]], common_args: list[str], out: Path,
             say: Callable[[str], None] = print) -> list[tuple[Path, int]]:
    """Start one ``python -m fpq_plugin.evaluation`` worker per group; wait for all; returns (folder, exit code).

    Each worker writes ``out/parts/job-K/`` (its report, saved after every row) and ``job-K.log``. Ctrl-C stops
    every worker; the rows they finished stay on disk.
    """
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    procs = []
    for k, group in enumerate(plan):
        folder = parts / f"job-{k}"
        names = ",".join(v.name for v in group)
        cmd = [sys.executable, "-m", "fpq_plugin.evaluation", *common_args, "--variants", names, "--out", str(folder)]
        log = open(parts / f"job-{k}.log", "wb")  # noqa: SIM115 - closed below, after the worker exits
        procs.append((folder, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_worker_env(k, len(plan))),
                      log, names))
        say(f"job {k}: {names}")
    start = time.perf_counter()
    try:
        pending = {id(p): (folder, p, names) for folder, p, _, names in procs}
        while pending:
            time.sleep(1.0)
            for key, (folder, p, names) in list(pending.items()):
                if p.poll() is not None:
                    del pending[key]
                    say(f"[{time.perf_counter() - start:6.0f}s] {folder.name} ({names}) exited {p.returncode}")
    except KeyboardInterrupt:
        for _, p, _, _ in procs:
            p.terminate()
        for _, p, _, _ in procs:
            p.wait()
        raise
    finally:
        for _, _, log, _ in procs:
            log.close()
    return [(folder, p.returncode) for folder, p, _, _ in procs]
