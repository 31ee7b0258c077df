"""Sampling speed inside ComfyUI: plain fp16 UNet vs "FP Quantize UNet" with and without CUDA-graph replay.

What a ComfyUI user sees: seconds per image and per step of KSampler's own sampling function
(``nodes.common_ksampler``), on a random-weight UNet with the real SD1.5 config at 512x512 (batch 1, CFG: the UNet
runs at batch 2), loaded through ComfyUI's ``comfy.sd.load_diffusion_model`` as UNETLoader does, quantized by the
node pack's own node class. Runs in one process with ComfyUI imported as a library (no HTTP, no VAE decode), so the
variants are ratios inside one process.

Run with the python of a ComfyUI environment, on a GPU::

    python benchmarks/bench_comfyui.py --comfyui /path/to/ComfyUI --out benchmarks/results/comfyui_speed_h200.json

``--controlnet`` adds rows with a random-weight ControlNet of the same architecture applied to both conditionings
(ControlNetApplyAdvanced, strength 1): plain, fpq with the ControlNet steps eager (``GRAPH_CONTROLNET`` off, the
behaviour without ``FPQ_GRAPH_CONTROLNET=1``) and with them replaying graphs. The ControlNet itself always runs
eagerly in ComfyUI's own fp16 model.

``--profile`` adds, for each eager row, a cProfile of one more image: the functions with the most host time per
step (eager sampling on the lent machines is bound by the host, not the GPU).

``--unet tiny`` (the server tests' 44M-parameter UNet) and ``--size 64`` make a CPU smoke run. ComfyUI's
cudaMallocAsync allocator is not switched on here (as with ``main.py --disable-cuda-malloc``); set
``PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync`` to measure under it (the node then captures with the guarded
warm-ups of :mod:`fpq_plugin.integrations.cuda_graphs`).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# The real SD1.5 UNet, as changes to the server tests' small SD1.5-family config (ComfyUI's LDM keys): 4 levels of
# 2 res blocks, attention on the first three.
SD15_OVERRIDES = {
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
}


def _import_comfyui(path: str):
    sys.path.insert(0, os.path.abspath(path))
    # fpq_plugin from this checkout, behind ComfyUI: the repo's nodes/ package must not shadow ComfyUI's nodes.py
    sys.path.append(str(REPO))
    sys.argv = sys.argv[:1]  # ComfyUI parses the command line on import
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401 - picks the device
    import comfy.sd
    import comfy.utils

    import nodes as comfy_nodes  # ComfyUI's nodes.py (KSampler's sampling function, CLIPTextEncode)

    comfy.utils.PROGRESS_BAR_ENABLED = False

    return comfy, comfy_nodes


def _import_fpq_nodes():
    """fpq's node pack under another module name (ComfyUI's own ``nodes`` module is already imported)."""
    spec = importlib.util.spec_from_file_location(
        "fpq_nodes", REPO / "nodes" / "__init__.py", submodule_search_locations=[str(REPO / "nodes")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["fpq_nodes"] = module
    spec.loader.exec_module(module)
    return module


def _write_models(folder: Path, unet: str, controlnet: bool) -> tuple[Path, Path, Path | None]:
    """(UNet, CLIP, ControlNet or None) files with random weights, as ComfyUI's loaders read them."""
    sys.path.insert(0, str(REPO / "tests" / "nodes"))
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from make_comfy_test_models import UNET_CONFIG, init_weights, make_clip, make_controlnet, save

    torch.manual_seed(0)
    config = {**UNET_CONFIG, **SD15_OVERRIDES} if unet == "sd15" else UNET_CONFIG
    model = UNetModel(**config, device="cpu", operations=comfy.ops.disable_weight_init)
    init_weights(model)
    unet_path = folder / "diffusion_models" / f"{unet}_random_unet.safetensors"
    save(model.state_dict(), str(unet_path))
    del model
    make_clip(str(folder))
    cn_path = Path(make_controlnet(str(folder), config, f"{unet}_random_controlnet.safetensors")) if controlnet else None
    return unet_path, folder / "text_encoders" / "tiny_clip_l.safetensors", cn_path


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_sampling(comfy_nodes, model, positive, negative, latent, steps: int, reps: int) -> dict:
    """First image (captures, loads) and the median of ``reps`` more, in seconds."""
    times = []
    for seed in range(reps + 1):
        _sync()
        start = time.perf_counter()
        comfy_nodes.common_ksampler(model, seed, steps, 7.0, "euler", "normal", positive, negative, latent)
        _sync()
        times.append(time.perf_counter() - start)
    median = statistics.median(times[1:])
    return {"first_s": times[0], "image_s": median, "step_ms": 1000 * median / steps, "images_s": times[1:]}


def _profile_sampling(comfy_nodes, model, positive, negative, latent, steps: int) -> dict:
    """Host time of one more image under cProfile, per step."""
    from profile_summary import summarize

    prof = cProfile.Profile()
    _sync()
    prof.enable()
    comfy_nodes.common_ksampler(model, 0, steps, 7.0, "euler", "normal", positive, negative, latent)
    _sync()
    prof.disable()
    summary = summarize(prof, steps, top=30, unit="step")
    del summary["cumulative_text"]
    return summary


def _controlnet_rows(comfy_nodes, model, controlled, latent, args, name: str) -> dict[str, dict]:
    """The graphed model sampled with the ControlNet, its steps eager and then replaying graphs."""
    from fpq_plugin.integrations import comfyui_graphs

    before = comfyui_graphs.GRAPH_CONTROLNET
    rows = {}
    try:
        for replay in (False, True):
            comfyui_graphs.GRAPH_CONTROLNET = replay
            row = _time_sampling(comfy_nodes, model, *controlled, latent, args.steps, args.reps)
            rows[f"{name}_controlnet{'' if replay else '_eager_steps'}"] = row
    finally:
        comfyui_graphs.GRAPH_CONTROLNET = before
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True, help="a ComfyUI checkout (imported, never written)")
    ap.add_argument("--out", type=Path, help="JSON results")
    ap.add_argument("--unet", choices=("sd15", "tiny"), default="sd15")
    ap.add_argument("--size", type=int, default=512, help="image size in pixels")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--recipes", default="w8a8,w4a8")
    ap.add_argument("--controlnet", action="store_true", help="also time sampling with a ControlNet (see above)")
    ap.add_argument("--profile", action="store_true", help="cProfile one more image of each eager row (see above)")
    args = ap.parse_args()
    args.command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])

    comfy, comfy_nodes = _import_comfyui(args.comfyui)
    import folder_paths

    fpq_nodes = _import_fpq_nodes()
    tmp = Path(tempfile.mkdtemp(prefix="fpq_bench_comfyui_"))
    try:
        # fpq's cache goes to tmp, not into the ComfyUI checkout (the second run of a recipe is a cache hit)
        folder_paths.folder_names_and_paths["fpq_cache"] = ([str(tmp / "fpq_cache")], {".safetensors"})
        _run(args, comfy, comfy_nodes, fpq_nodes, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args: argparse.Namespace, comfy, comfy_nodes, fpq_nodes, tmp: Path) -> None:
    device = comfy.model_management.get_torch_device()
    unet_path, clip_path, cn_path = _write_models(tmp, args.unet, args.controlnet)
    model = comfy.sd.load_diffusion_model(str(unet_path))
    clip = comfy.sd.load_clip([str(clip_path)], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    encode = comfy_nodes.CLIPTextEncode()
    positive = encode.encode(clip, "a red circle above a blue square")[0]
    negative = encode.encode(clip, "")[0]
    latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    print(f"{args.unet} UNet {params / 1e6:.1f} M params on {device}, {args.size}x{args.size}, {args.steps} steps")

    controlled = None
    if cn_path is not None:
        import comfy.controlnet

        hint = torch.full((1, args.size, args.size, 3), 0.5)  # an IMAGE: batch, height, width, RGB in [0, 1]
        controlled = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
            positive, negative, comfy.controlnet.load_controlnet(str(cn_path)), hint, 1.0, 0.0, 1.0)

    rows: dict[str, dict] = {}
    rows["plain"] = _time_sampling(comfy_nodes, model, positive, negative, latent, args.steps, args.reps)
    rows["plain"]["dtype"] = str(model.model.get_dtype())
    if args.profile:
        rows["plain"]["host_profile"] = _profile_sampling(comfy_nodes, model, positive, negative, latent, args.steps)
    if controlled is not None:
        rows["plain_controlnet"] = _time_sampling(comfy_nodes, model, *controlled, latent, args.steps, args.reps)
    quantize = fpq_nodes.NODE_CLASS_MAPPINGS["FPQuantizeUNet"]()
    for recipe in args.recipes.split(","):
        for graphs in (False, True):
            start = time.perf_counter()
            (quantized,) = quantize.quantize(model, recipe, "fast", clip, calibration_resolution=args.size,
                                             cuda_graphs=graphs)  # fmt: skip
            node_s = time.perf_counter() - start
            name = f"fpq_{recipe}{'_graphs' if graphs else ''}"
            row = _time_sampling(comfy_nodes, quantized, positive, negative, latent, args.steps, args.reps)
            rows[name] = {**row, "node_s": node_s}
            if args.profile and not graphs:
                rows[name]["host_profile"] = _profile_sampling(comfy_nodes, quantized, positive, negative, latent,
                                                               args.steps)  # fmt: skip
            if controlled is not None and graphs:
                rows.update(_controlnet_rows(comfy_nodes, quantized, controlled, latent, args, name))
            del quantized
            comfy.model_management.unload_all_models()
            comfy.model_management.soft_empty_cache()

    print("\n| variant | s per image | ms per step | vs plain | first image s |\n|---|---|---|---|---|")
    for name, row in rows.items():
        # a ControlNet row against plain ComfyUI with the same ControlNet
        row["vs_plain"] = rows["plain_controlnet" if "controlnet" in name else "plain"]["image_s"] / row["image_s"]
        print(f"| {name} | {row['image_s']:.3f} | {row['step_ms']:.1f} | {row['vs_plain']:.2f}x | "
              f"{row['first_s']:.2f} |")  # fmt: skip
    if args.out:
        result = {
            "command": args.command,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "allocator": torch.cuda.get_allocator_backend() if torch.cuda.is_available() else None,
            "unet": args.unet,
            "params": params,
            "size": args.size,
            "steps": args.steps,
            "batch": 1,
            "cfg": 7.0,
            "controlnet": "random weights, the UNet's architecture, strength 1.0" if controlled is not None else None,
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, row in rows.items():
        if "host_profile" in row:
            print(f"\n{name}: host time per step, most own time first")
            for r in row["host_profile"]["top_own_time"][:15]:
                print(f"  {r['own_ms_per_step']:8.3f} ms own {r['cum_ms_per_step']:8.3f} cum "
                      f"{r['calls_per_step']:7.1f}x  {r['function']}")


if __name__ == "__main__":
    main()
