"""Load a single-file Stable Diffusion checkpoint (original CompVis / A1111 layout) offline, through diffusers.

diffusers' ``from_single_file`` converts the weights itself, but it needs the *configs* of every component (UNet
and VAE shapes, text encoder, tokenizer files, scheduler). Left to itself it guesses the model family from the
checkpoint's keys and downloads those configs from the Hugging Face hub. fpq never lets it go online
(``local_files_only=True``) and takes the configs from, in order:

1. ``config=<folder>``: a diffusers pipeline folder of the same architecture (``model_index.json`` plus each
   component's ``config.json``, the tokenizer files and the scheduler config; weights are not needed and not read);
2. ``original_config=<yaml>``: the original ``v1-inference.yaml``-style file, which describes the UNet, VAE and
   scheduler, but *not* the tokenizer or text encoder config: diffusers then looks for
   ``openai/clip-vit-large-patch14`` in the local Hugging Face cache, so this works offline only when that
   cache has it (or when you pass ``tokenizer=`` and ``text_encoder=`` objects);
3. nothing: the configs diffusers would download, if the local Hugging Face cache already holds them.

When none of these works, :class:`SingleFileConfigError` says what to pass.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from fpq_plugin.errors import CheckpointError

logger = logging.getLogger(__name__)

__all__ = ["SINGLE_FILE_SUFFIXES", "SingleFileConfigError", "load_single_file_pipeline"]

SINGLE_FILE_SUFFIXES = (".safetensors",)
"""Single-file formats fpq loads. ``.ckpt`` / ``.pt`` are pickles: fpq never unpickles files."""


class SingleFileConfigError(CheckpointError):
    """A single-file checkpoint cannot be loaded offline with the configs given; the message says what to pass."""


def _pipeline_class(config_folder: Path) -> Any:
    import diffusers

    index = config_folder / "model_index.json"
    if not index.is_file():
        raise SingleFileConfigError(
            f"{config_folder}: not a diffusers pipeline folder (no model_index.json); pass config=<a diffusers folder "
            "of the same architecture, e.g. a copy of stable-diffusion-v1-5 without its weights>"
        )
    try:
        name = json.loads(index.read_text(encoding="utf-8"))["_class_name"]
    except (OSError, ValueError, KeyError) as e:
        raise SingleFileConfigError(f"{index}: unreadable model_index.json ({e})") from None
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_single_file"):
        raise SingleFileConfigError(
            f"{index}: pipeline class {name!r} does not load single files in diffusers {diffusers.__version__}; "
            "use StableDiffusionPipeline / StableDiffusionXLPipeline configs"
        )
    return cls


def _guess_class(checkpoint_path: Path) -> Any:
    """SD1.x/2.x or SDXL, from the keys of the file (no tensor data read)."""
    import diffusers
    from safetensors import safe_open

    with safe_open(str(checkpoint_path), framework="pt") as fh:
        keys = fh.keys()
    is_xl = any(k.startswith("conditioner.embedders.") for k in keys)
    return diffusers.StableDiffusionXLPipeline if is_xl else diffusers.StableDiffusionPipeline


def _cached_hub_configs(path: Path) -> str:
    """The local Hugging Face cache folder of the configs diffusers would download for ``path``, or an error.

    Called only when neither ``config`` nor ``original_config`` is given: diffusers, asked for
    ``local_files_only=True`` with no config, still falls back to downloading (diffusers 0.3x
    ``FromSingleFileMixin.from_single_file``), so fpq resolves the folder itself and never lets it try.
    """
    from diffusers.loaders.single_file_utils import fetch_diffusers_config, load_single_file_checkpoint
    from huggingface_hub import snapshot_download

    checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    repo = fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
    del checkpoint
    try:
        return snapshot_download(repo, local_files_only=True, allow_patterns=["*.json", "*.txt", "**/*.json", "**/*.txt"])
    except Exception as e:
        raise SingleFileConfigError(
            f"{path}: diffusers would take this model's configs from the hub ({repo}), and fpq does not download "
            f"them (not in the local Hugging Face cache: {type(e).__name__}). Pass config=<a diffusers pipeline "
            "folder of the same architecture> (configs and tokenizer only; weights are not needed), e.g. "
            "FPQuantPipeline.from_pretrained('model.safetensors', config='sd15-configs/') or "
            "`fpq quantize model.safetensors out/ --config sd15-configs/`"
        ) from None


def load_single_file_pipeline(
    path: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | None = None,
    original_config: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> Any:
    """A diffusers text-to-image pipeline from one original-layout ``.safetensors`` file, with no hub access.

    Args:
        path: The checkpoint (UNet, VAE and text encoder(s) in one file, as A1111 / ComfyUI use them).
        config: A diffusers pipeline folder of the same architecture (configs and tokenizer; weights unused).
        original_config: The original inference YAML (``v1-inference.yaml``); see the module docstring for what
            else it needs offline. Give ``config`` or ``original_config``, not both.
        kwargs: Passed to diffusers' ``from_single_file`` (``torch_dtype``, component overrides...).

    Returns:
        The pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``...) in diffusers' layout.

    Raises:
        SingleFileConfigError: The file is not ``.safetensors``, or the configs it needs are not available offline;
            the message says what to pass.
        CheckpointError: The file does not exist or is not a readable safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise SingleFileConfigError(
            f"{path}: fpq loads single-file checkpoints only as .safetensors ({path.suffix} files are Python "
            "pickles, which fpq never loads); convert it first, e.g. in a trusted environment: "
            "safetensors.torch.save_file(torch.load(path, weights_only=True)['state_dict'], 'model.safetensors')"
        )
    if config is not None and original_config is not None:
        raise SingleFileConfigError(f"{path}: give config=<diffusers folder> or original_config=<yaml>, not both")
    try:
        if config is None and original_config is None:
            config = _cached_hub_configs(path)
        cls = _pipeline_class(Path(config)) if config is not None else _guess_class(path)
    except SingleFileConfigError:
        raise
    except Exception as e:  # safetensors' own errors for garbled files
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    extra: dict[str, Any] = {"local_files_only": True}
    if config is not None:
        extra["config"] = str(config)
    if original_config is not None:
        extra["original_config"] = str(original_config)
    try:
        pipe = cls.from_single_file(str(path), **extra, **kwargs)
    except (OSError, ValueError) as e:
        source = f"the configs of {config}" if config is not None else f"the original config {original_config}"
        hint = (
            f"Is {config} a pipeline of the same architecture (same UNet/VAE/text encoder shapes, with tokenizer/ "
            "and scheduler/)?"
            if config is not None
            else "original_config does not describe the tokenizer or text encoder; pass config=<a diffusers "
            "pipeline folder of the same architecture> instead, or tokenizer=... and text_encoder=... objects"
        )
        raise SingleFileConfigError(f"{path}: diffusers could not load it with {source}: {e}. {hint}") from None
    logger.info("fpq: loaded %s as %s (configs from %s)", path, type(pipe).__name__,
                config or original_config or "the local Hugging Face cache")
    return pipe
