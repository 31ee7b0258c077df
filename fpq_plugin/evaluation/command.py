"""The ``fpq eval`` command: run the paper's table on a reference model and write a report."""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from fpq_plugin.evaluation.harness import ABLATION_VARIANTS, PAPER_VARIANTS, EvalResult, EvalSettings, evaluate
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


def run(args: argparse.Namespace) -> int:
    every = {v.name: v for v in PAPER_VARIANTS + ABLATION_VARIANTS}
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
    command = "fpq eval " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "eval")
    start = time.perf_counter()

    from rich.console import Console

    console = Console(stderr=True)

    def say(message: str) -> None:
        console.log(f"[{time.perf_counter() - start:6.0f}s] {message}")

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
