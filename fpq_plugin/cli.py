"""The ``fpq`` command line: ``fpq demo``, ``fpq quantize``, ``fpq cache``, ``fpq inspect``."""

from __future__ import annotations

import argparse
import logging
import sys

from fpq_plugin.errors import FPQError


def _cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fpq_plugin.demo import run_demo

    console = Console()
    with console.status("starting") as status:
        rows, grid = run_demo(args.out, steps=args.steps, n_images=args.images, seed=args.seed,
                              progress=lambda msg: status.update(msg))
    table = Table(title="fpq demo: bundled tiny SD1.5-architecture pipeline (random weights), same seeds")
    for col in ("variant", "UNet bytes", "vs bf16", "PSNR vs full precision", "time"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    for r in rows:
        psnr = "reference" if r.psnr_db == float("inf") else f"{r.psnr_db:.1f} dB"
        table.add_row(r.variant, f"{r.unet_bytes / 2**20:.2f} MiB", f"{r.ratio_vs_bf16:.0%}", psnr, f"{r.seconds:.1f} s")
    console.print(table)
    console.print(f"image grid (rows: full precision, then each recipe): {grid}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fpq_plugin.io import read_header

    header = read_header(args.checkpoint)
    console = Console()
    console.print(f"recipe: {header.recipe.name}   format version: {header.format_version}   "
                  f"fpq {header.fpq_version}   fingerprint: {header.model_fingerprint}")
    table = Table()
    for col in ("layer", "kind", "weight", "input"):
        table.add_column(col)
    for name, spec in header.layers.items():
        table.add_row(name, spec["kind"], spec["weight_format"], spec["input_format"] or "-")
    console.print(table)
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fpq_plugin.integrations.diffusers_pipeline import FPQuantPipeline, save_quantized_pipeline
    from fpq_plugin.recipes import get_recipe

    console = Console()
    recipe = get_recipe(args.recipe)  # a preset name or a YAML file; validated before any model is loaded
    with console.status(f"loading {args.model} and quantizing its UNet ({recipe.name}, {args.method})"):
        pipe = FPQuantPipeline.from_pretrained(
            args.model, recipe, method=args.method, num_prompts=args.prompts, cache_dir=args.cache_dir,
            use_cache=not args.no_cache, prompts=args.prompt_file,
        )
    out = save_quantized_pipeline(pipe, args.out, recipe=recipe)
    info = pipe.fpq_info
    console.print(f"{'restored from cache' if info['cache_hit'] else 'calibrated'}: {recipe.name} / {info['method']}; "
                  f"wrote {out} (load it with FPQuantPipeline.from_pretrained({str(out)!r}))")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fpq_plugin.cache import QuantCache

    cache = QuantCache(args.cache_dir)
    console = Console()
    if args.action == "list":
        table = Table(title=f"fpq cache: {cache.root}")
        for col in ("key", "recipe", "size", "fingerprint", "status"):
            table.add_column(col)
        for e in cache.entries():
            table.add_row(e.key, e.recipe or "-", f"{e.size / 2**20:.1f} MiB", (e.fingerprint or "-")[:23],
                          e.error or "ok")
        console.print(table)
    elif args.action == "remove":
        if not args.keys:
            console.print("name the keys to remove (see `fpq cache list`)")
            return 2
        for key in args.keys:
            console.print(f"{key}: {'removed' if cache.remove(key) else 'not in the cache'}")
    else:
        console.print(f"removed {cache.clear()} entries from {cache.root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fpq", description="FP8 / FP4 post-training quantization for SD UNets")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what fpq does")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize the bundled pipeline (W8A8, W4A8) and compare with full precision")
    demo.add_argument("--out", default="fpq-demo", help="folder for the image grid (default: ./fpq-demo)")
    demo.add_argument("--steps", type=int, default=10)
    demo.add_argument("--images", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    quantize = sub.add_parser("quantize", help="quantize a diffusers pipeline folder's UNet and save the result")
    quantize.add_argument("model", help="diffusers pipeline folder (SD1.x, SD2.x, SDXL) or single-file checkpoint")
    quantize.add_argument("out", help="output folder (a pipeline folder with the quantized UNet)")
    quantize.add_argument("--recipe", default="w8a8", help="preset (w8a8, w4a8, w4a16, w8a16, int8, int4) or YAML")
    quantize.add_argument("--method", default="standard", choices=("fast", "standard", "best"))
    quantize.add_argument("--prompts", type=int, default=16, help="number of calibration prompts")
    quantize.add_argument("--prompt-file", default=None, help="calibration prompts, one per line")
    quantize.add_argument("--cache-dir", default=None, help="cache folder (default: FPQ_CACHE_DIR or ~/.cache/fpq)")
    quantize.add_argument("--no-cache", action="store_true", help="always calibrate; do not write the cache")
    quantize.set_defaults(func=_cmd_quantize)
    cache = sub.add_parser("cache", help="list or remove cached quantizations")
    cache.add_argument("action", choices=("list", "remove", "clear"))
    cache.add_argument("keys", nargs="*", help="keys to remove")
    cache.add_argument("--cache-dir", default=None)
    cache.set_defaults(func=_cmd_cache)
    inspect = sub.add_parser("inspect", help="show the header of a quantized checkpoint")
    inspect.add_argument("checkpoint")
    inspect.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except FPQError as e:
        print(f"fpq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fpq: cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
