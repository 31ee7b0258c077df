""" "Load FP Quantized UNet" and "Save FP Quantized UNet": fpq checkpoints in the ``models/fpq_unets`` folder."""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import folder_paths

from .comfy_integration import NodeInputError, load_model, save_model

logger = logging.getLogger("fpq")

FOLDER = "fpq_unets"
CACHE_FOLDER = "fpq_cache"  # fpq_plugin.cache entries made by "FP Quantize UNet"
EXTENSIONS = {".safetensors"}


def register_folder(name: str) -> None:
    """Register ``models/<name>`` (keeping any paths extra_model_paths.yaml already gave it, which come first)."""
    paths, _ = folder_paths.folder_names_and_paths.get(name, ([], set()))
    default = os.path.join(folder_paths.models_dir, name)
    paths = list(paths) if default in paths else [*paths, default]
    folder_paths.folder_names_and_paths[name] = (paths, EXTENSIONS)


register_folder(FOLDER)
register_folder(CACHE_FOLDER)


class LoadFPQuantizedUNet:
    """Load a UNet quantized by fpq (a file written by "Save FP Quantized UNet")."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "unet_name": (
                    folder_paths.get_filename_list(FOLDER),
                    {"tooltip": f"An fpq file in models/{FOLDER}/."},
                ),
            }
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The quantized model.",)
    FUNCTION = "load"
    CATEGORY = "fpq"
    DESCRIPTION = f"Load an FP8 / FP4 UNet saved by 'Save FP Quantized UNet' from models/{FOLDER}/."

    def load(self, unet_name: str) -> tuple[Any]:
        path = folder_paths.get_full_path(FOLDER, unet_name)
        if path is None:
            raise NodeInputError(
                f"{unet_name!r} is not in models/{FOLDER}/ (folders: {folder_paths.get_folder_paths(FOLDER)})"
            )
        return (load_model(path),)


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]*$")


class SaveFPQuantizedUNet:
    """Save a quantized MODEL (from "FP Quantize UNet") as an fpq file in ``models/fpq_unets``."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A MODEL from 'FP Quantize UNet' (before any LoRA)."}),
                "filename_prefix": (
                    "STRING",
                    {"default": "fpq_unet", "tooltip": f"File name in models/{FOLDER}/; a number is added."},
                ),
            }
        }

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "fpq"
    DESCRIPTION = f"Save a quantized UNet to models/{FOLDER}/ (load it again with 'Load FP Quantized UNet')."

    def save(self, model: Any, filename_prefix: str) -> dict[str, Any]:
        prefix = filename_prefix.strip()
        if prefix.endswith(".safetensors"):
            prefix = prefix[: -len(".safetensors")]
        if not _SAFE_NAME.match(prefix) or ".." in prefix:
            raise NodeInputError(
                f"filename_prefix {filename_prefix!r} is not a plain file name; use letters, digits, spaces, "
                "'_', '-' and '.' (no folders)"
            )
        folder = folder_paths.get_folder_paths(FOLDER)[0]
        os.makedirs(folder, exist_ok=True)
        counter = 1
        while os.path.exists(path := os.path.join(folder, f"{prefix}_{counter:05d}.safetensors")):
            counter += 1
        save_model(model, path)
        logger.info("fpq: saved %s (%.1f MiB)", path, os.path.getsize(path) / 2**20)
        return {"ui": {"text": [os.path.basename(path)]}}
