"""The ``fpq`` command line: ``fpq demo``, ``fpq quantize``, ``fpq cache``, ``fpq inspect``, ``fpq eval``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fpq_plugin.errors import FPQError


def _cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fpq_plugin.demo import run_demo

    console = Console()
    with console.status("loading the bundled reference model") as status:
        rows, grid = run_demo(args.out, steps=args.steps, n_images=args.images, seed=args.seed,
                              progress=lambda msg: status.update(msg))
    table = Table(title="fpq demo: bundled scenes-t2i reference model (SD architecture), same prompts and seeds")
    for col in ("variant", "UNet size", "vs bf16", "weight sparsity", "PSNR vs full precision", "prompt accuracy",
                "time"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    for r in rows:
        psnr = "reference" if r.psnr_db == float("inf") else f"{r.psnr_db:.1f} dB"
        table.add_row(r.variant, f"{r.unet_bytes / 2**20:.2f} MiB", f"{r.ratio_vs_bf16:.0%}", f"{r.sparsity:.1%}",
                      psnr, f"{r.prompt_accuracy:.2f}", f"{r.seconds:.1f} s")
    console.print(table)
    console.print(f"image grid (rows: full precision, then each recipe): {grid}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from fpq_plugin.evaluation.command import run

    return run(args)


def _resolve_checkpoint(target: str, cache_dir: str | None) -> Path:
    """A checkpoint file from what ``fpq inspect`` was given: a file, a quantized pipeline folder, or a cache key."""
    from fpq_plugin.cache import QuantCache
    from fpq_plugin.errors import CheckpointError
    from fpq_plugin.integrations.diffusers_pipeline import QUANTIZED_UNET_FILE

    path = Path(target)
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / "unet" / QUANTIZED_UNET_FILE, path / QUANTIZED_UNET_FILE):
            if candidate.is_file():
                return candidate
        raise CheckpointError(
            f"{path}: a folder without an fpq checkpoint (looked for unet/{QUANTIZED_UNET_FILE}); give the "
            "checkpoint file, a folder written by `fpq quantize`, or a cache key from `fpq cache list`"
        )
    try:
        entry = QuantCache(cache_dir).path_for(target)
    except ValueError:
        entry = None
    if entry is not None and entry.is_file():
        return entry
    raise CheckpointError(
        f"{target}: no such file or folder, and not a key of the fpq cache ({QuantCache(cache_dir).root}); "
        "see `fpq cache list` (and --cache-dir)"
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _cmd_inspect(args: argparse.Namespace) -> int:
    import json
    import time

    from rich.console import Console
    from rich.table import Table

    from fpq_plugin.stats import layer_stats

    path = _resolve_checkpoint(args.checkpoint, args.cache_dir)
    start = time.perf_counter()
    stats = layer_stats(path)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({**stats.to_dict(), "seconds": round(seconds, 3)}, indent=2))
        return 0
    header = stats.header
    recipe = header.recipe
    console = Console(soft_wrap=True)
    if not console.is_terminal:
        console.width = 200  # piped into a file or grep: do not squeeze long layer names into 80 columns
    console.print(f"[bold]{path}[/]")
    console.print(
        f"recipe: {recipe.name} (weights {'/'.join(recipe.weight_formats)} per {recipe.weight_granularity}, "
        f"activations {recipe.activation_format or 'float'}, rounding {recipe.rounding}"
        f"{', skip ' + ', '.join(recipe.skip) if recipe.skip else ''})"
    )
    console.print(f"fingerprint: {header.model_fingerprint or '-'}   model: {(header.model or {}).get('class', '-')}   "
                  f"format version {header.format_version}, written by fpq {header.fpq_version}")
    info = {**header.extra, **(header.extra.get("settings") or {})}
    method_config = info.pop("method_config", None) or {}
    info.pop("settings", None)
    cache_key = info.pop("fpq_cache_key", None) or info.pop("cache_key", None)
    name = info.pop("method", None)
    if name is not None or method_config:
        knobs = {k: method_config[k] for k in ("rounding_iters", "block_reconstruction", "search_formats",
                                               "search_rows") if k in method_config}
        details = ", ".join(f"{k}={v}" for k, v in {**knobs, **info}.items())
        console.print(f"method: {name or '-'}" + (f" ({details})" if details else ""))
    if cache_key:
        console.print(f"cache key: {cache_key}")
    if not args.summary:
        table = Table(title="layers")
        for col in ("layer", "kind", "weight", "input", "shape", "size", "vs bf16", "sparsity"):
            table.add_column(col, justify="right" if col in ("size", "vs bf16", "sparsity") else "left")
        for s in stats.layers:
            table.add_row(s.name, s.kind, s.weight_format, s.input_format or "-", "x".join(map(str, s.shape)),
                          _mib(s.bytes), f"{s.bytes / s.bf16_bytes:.0%}", f"{s.sparsity:.2%}")
        console.print(table)
    by_format = Table(title="by weight format")
    for col in ("weight", "layers", "weights", "size", "sparsity"):
        by_format.add_column(col, justify="left" if col == "weight" else "right")
    for fmt in sorted(stats.format_counts()):
        group = [s for s in stats.layers if s.weight_format == fmt]
        numel = sum(s.numel for s in group)
        by_format.add_row(fmt, str(len(group)), f"{numel:,}", _mib(sum(s.bytes for s in group)),
                          f"{sum(s.zeros for s in group) / max(numel, 1):.2%}")
    console.print(by_format)
    console.print(
        f"{len(stats.layers)} quantized layers: {_mib(stats.quantized_layer_bytes)} "
        f"({stats.quantized_layer_bytes / max(stats.quantized_layer_bf16_bytes, 1):.1%} of bf16); "
        f"whole file {_mib(stats.total_bytes)} of tensors; "
        f"[bold]weight sparsity {stats.sparsity:.2%}[/] (exactly-zero dequantized weights)"
    )
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fpq_plugin.integrations.diffusers_pipeline import FPQuantPipeline, save_quantized_pipeline
    from fpq_plugin.integrations.progress import RichPhaseBars
    from fpq_plugin.recipes import get_recipe

    console = Console(stderr=True)
    recipe = get_recipe(args.recipe)  # a preset name or a YAML file; validated before any model is loaded
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"fpq: error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    kwargs = dict(
        method=args.method, num_prompts=args.prompts, num_inference_steps=args.steps, cache_dir=args.cache_dir,
        use_cache=not args.no_cache, prompts=args.prompt_file, config=args.config,
        original_config=args.original_config,
    )
    bars = args.progress if args.progress is not None else console.is_interactive
    if bars:
        with RichPhaseBars(console) as progress:
            pipe = FPQuantPipeline.from_pretrained(args.model, recipe, progress=progress, **kwargs)
    else:
        pipe = FPQuantPipeline.from_pretrained(args.model, recipe, progress=False, **kwargs)
    save_quantized_pipeline(pipe, out, recipe=recipe)
    info = pipe.fpq_info
    print(f"{'restored from cache' if info['cache_hit'] else 'calibrated'}: {recipe.name} / {info['method']}; "
          f"wrote {out} (load it with FPQuantPipeline.from_pretrained({str(out)!r}); inspect it with "
          f"`fpq inspect {out}`)")
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
    demo.add_argument("--images", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    evaluation = sub.add_parser("eval", help="the paper's table on a reference model: FP vs INT, PSNR/SSIM/FID")
    from fpq_plugin.evaluation.command import add_arguments as add_eval_arguments

    add_eval_arguments(evaluation)
    evaluation.set_defaults(func=_cmd_eval)
    quantize = sub.add_parser("quantize", help="quantize a diffusers pipeline folder's UNet and save the result")
    quantize.add_argument("model", help="diffusers pipeline folder (SD1.x, SD2.x, SDXL) or single-file .safetensors")
    quantize.add_argument("out", help="output folder (a pipeline folder with the quantized UNet)")
    quantize.add_argument("--recipe", default="w8a8", help="preset (w8a8, w4a8, w4a16, w8a16, int8, int4) or YAML")
    quantize.add_argument("--method", default="standard", choices=("fast", "standard", "best"))
    quantize.add_argument("--prompts", type=int, default=16, help="number of calibration prompts")
    quantize.add_argument("--prompt-file", default=None, help="calibration prompts, one per line")
    quantize.add_argument("--cache-dir", default=None, help="cache folder (default: FPQ_CACHE_DIR or ~/.cache/fpq)")
    quantize.add_argument("--no-cache", action="store_true", help="always calibrate; do not write the cache")
    quantize.add_argument("--steps", type=int, default=20, help="sampling steps of each calibration run")
    quantize.add_argument("--config", default=None,
                          help="single-file model: a diffusers pipeline folder of the same architecture (configs and "
                               "tokenizer; its weights are not read). Nothing is downloaded")
    quantize.add_argument("--original-config", default=None,
                          help="single-file model: the original inference YAML instead of --config")
    quantize.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    quantize.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                          help="progress bars (default: when stderr is a terminal)")
    quantize.set_defaults(func=_cmd_quantize)
    cache = sub.add_parser("cache", help="list or remove cached quantizations")
    cache.add_argument("action", choices=("list", "remove", "clear"))
    cache.add_argument("keys", nargs="*", help="keys to remove")
    cache.add_argument("--cache-dir", default=None)
    cache.set_defaults(func=_cmd_cache)
    inspect = sub.add_parser(
        "inspect", help="per-layer formats, sizes and weight sparsity of a quantized checkpoint, folder or cache entry"
    )
    inspect.add_argument("checkpoint", help="an fpq .safetensors file, a folder from `fpq quantize`, or a cache key")
    inspect.add_argument("--json", action="store_true", help="print everything as JSON (for scripts)")
    inspect.add_argument("--summary", action="store_true", help="totals and per-format rows only, no layer table")
    inspect.add_argument("--cache-dir", default=None, help="where to look up cache keys")
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
