"""The ``fpq eval`` command: run the paper's table on a reference model and write a report."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from fpq_plugin.evaluation.harness import ABLATION_VARIANTS, PAPER_VARIANTS, EvalResult, EvalSettings, evaluate
from fpq_plugin.evaluation.merge import RESULTS_FILE, load_result, merge_results
from fpq_plugin.evaluation.parallel import plan_jobs, run_jobs
from fpq_plugin.evaluation.report import markdown_table, write_report

TABLES = {
    "paper": PAPER_VARIANTS,
    "ablations": (PAPER_VARIANTS[0], *ABLATION_VARIANTS),
    "all": PAPER_VARIANTS + ABLATION_VARIANTS,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=("t2i", "uncond"), default="t2i", help="reference model to evaluate")
    p.add_argument("--table", choices=tuple(TABLES), default="paper", help="which rows")
    p.add_argument("--variants", help="comma-separated row names (overrides --table); see `--list`")
    p.add_argument("--list", action="store_true", help="list the row names and exit")
    p.add_argument("--n-images", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--calibration-prompts", type=int, default=32)
    p.add_argument("--calibration-steps", type=int, default=8, help="UNet calls kept per calibration run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="fpq-eval", help="report folder")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes sharing the device (rows split between them, reports merged); on a GPU "
                        "machine with spare CPU cores this shortens the learned-rounding rows")
    p.add_argument("--merge", nargs="+", metavar="FOLDER",
                   help="merge report folders of one command line into --out instead of evaluating")


def _common_args(args: argparse.Namespace) -> list[str]:
    """The settings options of this command line, for the ``--jobs`` workers (identical settings merge)."""
    return ["--model", args.model, "--n-images", str(args.n_images), "--steps", str(args.steps),
            "--guidance", str(args.guidance), "--calibration-prompts", str(args.calibration_prompts),
            "--calibration-steps", str(args.calibration_steps), "--batch-size", str(args.batch_size),
            "--device", args.device]


def _merge(folders: list[str], out: str, command: str) -> int:
    results = [load_result(f) for f in folders]
    merged = merge_results(results, folders)
    path = write_report(merged, out, command=command)
    print(markdown_table(merged.rows))
    print(f"report: {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    every = {v.name: v for v in PAPER_VARIANTS + ABLATION_VARIANTS}
    command = "fpq eval " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "eval")
    if args.merge:
        return _merge(args.merge, args.out, command)
    if args.list:
        for name, v in every.items():
            print(f"{name:28s} {v.label}")
        return 0
    if args.variants:
        unknown = [n for n in args.variants.split(",") if n not in every]
        if unknown:
            print(f"unknown variant(s) {', '.join(unknown)}; run with --list", file=sys.stderr)
            return 2
        variants = tuple(every[n] for n in args.variants.split(","))
    else:
        variants = TABLES[args.table]
    settings = EvalSettings(
        model=args.model, n_images=args.n_images, steps=args.steps, guidance_scale=args.guidance,
        calibration_prompts=args.calibration_prompts, calibration_keep_steps=args.calibration_steps,
        batch_size=args.batch_size, device=args.device,
    )
    start = time.perf_counter()

    from rich.console import Console

    console = Console(stderr=True)

    def say(message: str) -> None:
        console.log(f"[{time.perf_counter() - start:6.0f}s] {message}")

    if args.jobs > 1:
        plan = plan_jobs(variants, args.jobs)
        finished = run_jobs(plan, _common_args(args), Path(args.out), say=say)
        failed = [f"{folder.name} (exit {code}, log {folder}.log)" for folder, code in finished if code != 0]
        done = [str(folder) for folder, _ in finished if (folder / RESULTS_FILE).is_file()]
        if done:
            _merge(done, args.out, command)
        if failed:
            print("worker(s) failed: " + "; ".join(failed) + "; rows they finished are merged", file=sys.stderr)
            return 1
        return 0

    def save(partial: EvalResult) -> None:
        write_report(partial, args.out, command=command)

    result = evaluate(settings, variants, progress=say, on_row=save)
    path = write_report(result, args.out, command=command)
    print(markdown_table(result.rows))
    print(f"report: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fpq eval", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
