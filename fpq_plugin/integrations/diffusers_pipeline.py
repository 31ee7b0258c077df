"""``FPQuantPipeline.from_pretrained``: a diffusers text-to-image pipeline with an FP8/FP4 UNet, cached per model.

First use of a model + recipe: the full-precision pipeline generates on calibration prompts while its UNet inputs
are recorded, the paper's method quantizes the UNet, and the result goes to the cache (keyed by a content hash of
the UNet weights, the recipe, the prompt set and the method). Later loads restore the quantized UNet from the cache
with no calibration. ``save_quantized_pipeline`` writes a folder others can load with no calibration and without
the original UNet weights.

Single-file checkpoints (one original-layout ``.safetensors``, as A1111 / ComfyUI use) load through diffusers' own
``from_single_file`` with the configs taken from a local folder, never from the hub
(:mod:`fpq_plugin.integrations.single_file`). Long work reports through a phase callback and shows rich progress
bars when the console is interactive (:mod:`fpq_plugin.integrations.progress`); raising from the callback, or
Ctrl-C, cancels with nothing written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from fpq_plugin.cache import QuantCache, cache_key
from fpq_plugin.errors import CheckpointError
from fpq_plugin.fingerprint import fingerprint_module
from fpq_plugin.integrations.cuda_graphs import enable_cuda_graphs
from fpq_plugin.integrations.progress import PhaseProgress, RichPhaseBars, is_interactive
from fpq_plugin.integrations.single_file import load_single_file_pipeline
from fpq_plugin.io import load_quantized, save_quantized
from fpq_plugin.method import METHOD_VERSION, MethodConfig, capture_pipeline_inputs, quantize_with_method, recipe_for
from fpq_plugin.method.config import get_method_config
from fpq_plugin.prompts import load_prompts, prompt_set_id
from fpq_plugin.recipes import Recipe, get_recipe

logger = logging.getLogger(__name__)

QUANTIZED_UNET_FILE = "fpq_unet.safetensors"  # inside the pipeline folder's unet/ subfolder


def _load_float_pipeline(
    path: Path,
    *,
    config: str | os.PathLike | None = None,
    original_config: str | os.PathLike | None = None,
    **kwargs: Any,
):
    from diffusers import DiffusionPipeline

    if path.is_file():
        return load_single_file_pipeline(path, config=config, original_config=original_config, **kwargs)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such pipeline folder or checkpoint file")
    if config is not None or original_config is not None:
        raise CheckpointError(f"{path}: config=/original_config= are for single-file checkpoints, not folders")
    return DiffusionPipeline.from_pretrained(str(path), **kwargs)


@contextlib.contextmanager
def _progress_callback(progress: PhaseProgress | bool | None) -> Iterator[PhaseProgress | None]:
    """``None``: rich bars if stderr is a terminal; ``True``/``False``: bars on/off; a callable: used as is."""
    if callable(progress):
        yield progress
        return
    if progress is None:
        progress = is_interactive()
    if not progress:
        yield None
        return
    with RichPhaseBars() as bars:
        yield bars


def _capture_with_progress(pipe: Any, prompts: list[str], report: PhaseProgress | None, **kwargs: Any) -> list:
    """:func:`capture_pipeline_inputs`, reporting each finished UNet call as ``("calibrate", done, total, prompt)``.

    Raising from ``report`` stops the sampling run at that call (the recording hook is removed on the way out).
    """
    if report is None:
        return capture_pipeline_inputs(pipe, prompts, **kwargs)
    steps = kwargs["num_inference_steps"]
    total = len(prompts) * steps  # diffusers' SD pipelines batch the CFG pair into one UNet call per step
    done = [0]

    def hook(_module: Any, _args: Any, _output: Any) -> None:
        done[0] += 1
        prompt = prompts[min((done[0] - 1) // steps, len(prompts) - 1)]
        report("calibrate", done[0], max(total, done[0]), prompt[:40])

    report("calibrate", 0, total, "")
    handle = pipe.unet.register_forward_hook(hook)
    try:
        return capture_pipeline_inputs(pipe, prompts, **kwargs)
    finally:
        handle.remove()


class FPQuantPipeline:
    """Namespace for the loader; the object returned is the diffusers pipeline itself, with a quantized UNet."""

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        recipe: str | Recipe = "w8a8",
        *,
        method: str | MethodConfig = "standard",
        prompts: Sequence[str] | str | os.PathLike | None = None,
        num_prompts: int = 16,
        num_inference_steps: int = 20,
        keep_steps: int = 8,
        calibration_size: tuple[int, int] | None = None,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        device: str | torch.device | None = None,
        config: str | os.PathLike | None = None,
        original_config: str | os.PathLike | None = None,
        progress: PhaseProgress | bool | None = None,
        cuda_graphs: bool = True,
        **pipeline_kwargs: Any,
    ):
        """Load a pipeline and quantize its UNet (from the cache when possible).

        Args:
            path: a diffusers pipeline folder (SD1.x, SD2.x, SDXL), a folder written by
                :func:`save_quantized_pipeline` (loads with no calibration), or a single-file ``.safetensors``
                checkpoint in the original SD layout (then give ``config``).
            recipe: ``"w8a8"``, ``"w4a8"``, ``"w4a16"``, ``"w8a16"``, ``"int8"``, ``"int4"``, a YAML path or a Recipe.
            method: ``"fast"``, ``"standard"`` or ``"best"`` (or a MethodConfig).
            prompts: calibration prompts (list or file); default: the bundled set.
            num_prompts: how many prompts calibrate (spread over the set).
            num_inference_steps, keep_steps: calibration sampling steps, and how many of each run are recorded.
            calibration_size: ``(height, width)`` of calibration images; default: the pipeline's default.
            cache_dir: cache folder (default: ``FPQ_CACHE_DIR`` or the user cache directory).
            use_cache: False always calibrates and never writes the cache.
            device: where calibration runs (default: CUDA if available, else CPU).
            config: for a single-file checkpoint, a diffusers pipeline folder of the same architecture whose
                configs and tokenizer diffusers uses (its weights are not read); nothing is downloaded.
            original_config: for a single-file checkpoint, the original inference YAML instead of ``config``
                (offline only if the local Hugging Face cache has the CLIP tokenizer; see
                :mod:`fpq_plugin.integrations.single_file`).
            progress: ``None`` shows rich progress bars when stderr is a terminal; ``True``/``False`` forces them
                on/off; a callable ``progress(phase, done, total, detail)`` receives the updates instead
                (:mod:`fpq_plugin.integrations.progress`). Raising from it cancels: nothing is written.
            cuda_graphs: on CUDA, replay the UNet's forward from CUDA graphs (one capture per input shape,
                then about half the time per denoising step: :mod:`fpq_plugin.integrations.cuda_graphs`, which
                also lists when a call runs eagerly instead). ``False`` keeps plain eager calls.
            pipeline_kwargs: passed to diffusers' ``from_pretrained`` / ``from_single_file`` (e.g. ``torch_dtype``).

        Returns:
            The diffusers pipeline with its UNet quantized; ``pipe.fpq_info`` says what happened.

        Raises:
            CheckpointError: the path is missing, or a cache entry/checkpoint cannot be written.
            SingleFileConfigError: a single-file checkpoint needs ``config=`` (the message says what to pass).
            CancelledError, KeyboardInterrupt: from ``progress`` or Ctrl-C; no cache entry is written.

        Example::

            pipe = FPQuantPipeline.from_pretrained("sd15/", "w4a8", method="standard")
            image = pipe("a lighthouse at dusk").images[0]
            save_quantized_pipeline(pipe, "sd15-w4a8/")   # shareable; loads with no calibration
        """
        path = Path(path)
        quantized_file = path / "unet" / QUANTIZED_UNET_FILE
        if quantized_file.is_file():
            return load_quantized_pipeline(path, device=device, cuda_graphs=cuda_graphs, **pipeline_kwargs)
        recipe = get_recipe(recipe)
        method_config = get_method_config(method)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        pipe = _load_float_pipeline(path, config=config, original_config=original_config, **pipeline_kwargs)
        pipe = pipe.to(device)
        fingerprint = fingerprint_module(pipe.unet)
        prompt_list = load_prompts(prompts, limit=num_prompts) if recipe.quantizes_activations or (
            method_config.rounding_iters > 0) else []
        height, width = calibration_size or (None, None)
        settings = {"method": method_config.name, "method_config": dataclasses.asdict(method_config),
                    "steps": num_inference_steps, "keep": keep_steps, "size": [height, width]}
        method_recipe = recipe_for(recipe, method_config)
        key = cache_key(fingerprint, method_recipe, prompt_set_id(prompt_list) if prompt_list else None,
                        method_version=METHOD_VERSION, extra=settings)

        with _progress_callback(progress) as report:

            def build():
                if prompt_list:
                    calls = _capture_with_progress(pipe, prompt_list, report, num_inference_steps=num_inference_steps,
                                                   keep_steps=keep_steps, height=height, width=width)
                else:  # weight-only and no learning: one recorded call drives the (data-free) search
                    calls = _capture_with_progress(pipe, ["a photo"], report, num_inference_steps=2, keep_steps=1)
                unit_progress = None if report is None else (lambda d, t, name: report("quantize", d, t, name))
                quantize_with_method(pipe.unet, method_recipe, calls, method=method_config, progress=unit_progress)
                return pipe.unet

            if use_cache:
                cache = QuantCache(cache_dir)
                unet, header, hit = cache.get_or_build(key, build, pipe.unet, recipe=method_recipe,
                                                       model_fingerprint=fingerprint, extra=settings, device=device)
            else:
                unet, hit = build(), False
        pipe.unet = unet.to(device)
        pipe.fpq_info = {"cache_key": key, "cache_hit": hit, "fingerprint": fingerprint, "recipe": recipe.name,
                         "method": method_config.name, "settings": settings,
                         "cuda_graphs": _use_cuda_graphs(pipe.unet, cuda_graphs)}
        logger.info("fpq: %s UNet %s (cache %s)", recipe.name, "restored" if hit else "calibrated", key)
        return pipe


def save_quantized_pipeline(pipe: Any, path: str | os.PathLike, *, recipe: str | Recipe | None = None) -> Path:
    """Write the pipeline with its quantized UNet to ``path``; :meth:`FPQuantPipeline.from_pretrained` reloads it.

    The non-UNet parts are saved by diffusers as usual; the UNet folder holds its ``config.json`` and the fpq
    checkpoint (no full-precision UNet weights). The folder is written next to ``path`` under a temporary name
    and renamed into place at the end, so an interrupted save (Ctrl-C, full disk) leaves no partial folder; an
    existing folder at ``path`` is replaced only once the new one is complete.

    Raises:
        CheckpointError: no recipe is known, or ``path`` exists and is not a folder.
    """
    path = Path(path)
    unet = pipe.unet
    info = getattr(pipe, "fpq_info", {})
    recipe = recipe or info.get("recipe")
    if recipe is None:
        raise CheckpointError(f"{path}: say which recipe made this UNet: save_quantized_pipeline(..., recipe='w8a8')")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a folder; choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        # Save everything but the UNet through diffusers, then the UNet through fpq.
        pipe.register_modules(unet=None)
        try:
            pipe.save_pretrained(str(tmp))
        finally:
            pipe.register_modules(unet=unet)
        (tmp / "unet").mkdir(parents=True, exist_ok=True)
        unet.save_config(str(tmp / "unet"))
        extra = {k: info[k] for k in ("method", "settings", "cache_key") if info.get(k) is not None}
        save_quantized(unet, tmp / "unet" / QUANTIZED_UNET_FILE, recipe=recipe,
                       model_fingerprint=info.get("fingerprint"), extra=extra)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _use_cuda_graphs(unet: torch.nn.Module, wanted: bool) -> bool:
    # Installed whenever CUDA exists: CPU calls go straight to the eager forward, and a pipeline moved to the GPU
    # later (pipe.to("cuda"), accelerate's offloading) gets the replays too.
    if not wanted or not torch.cuda.is_available():
        return False
    enable_cuda_graphs(unet)
    return True


def load_quantized_pipeline(
    path: str | os.PathLike, *, device: str | torch.device | None = None, cuda_graphs: bool = True, **kwargs: Any
):
    """Load a folder written by :func:`save_quantized_pipeline` (no calibration, no float UNet weights); with
    CUDA the UNet replays CUDA graphs unless ``cuda_graphs=False`` (see :meth:`FPQuantPipeline.from_pretrained`)."""
    from diffusers import DiffusionPipeline

    path = Path(path)
    unet, header = load_quantized(path / "unet" / QUANTIZED_UNET_FILE)
    pipe = DiffusionPipeline.from_pretrained(str(path), unet=unet, **kwargs)
    if device is not None:
        pipe = pipe.to(device)
    pipe.fpq_info = {"cache_key": None, "cache_hit": False, "fingerprint": header.model_fingerprint,
                     "recipe": header.recipe.name, "method": header.extra.get("method"),
                     "settings": header.extra.get("settings"), "loaded_from": str(path),
                     "cuda_graphs": _use_cuda_graphs(pipe.unet, cuda_graphs)}
    return pipe
