""" "Load FP Quantized UNet" and "Save FP Quantized UNet": fpq checkpoints in the ``models/fpq_unets`` folder."""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import folder_paths

from .comfy_integration import (
    CUDA_GRAPHS_TOOLTIP,
    NodeInputError,
    comfy_quant_supported,
    export_comfy_quant,
    load_model,
    save_model,
)

logger = logging.getLogger("fpq")

FOLDER = "fpq_unets"
CACHE_FOLDER = "fpq_cache"  # fpq_plugin.cache entries made by "FP Quantize UNet"
EXTENSIONS = {".safetensors"}
NATIVE_FOLDER = "diffusion_models"  # where ComfyUI's own UNETLoader looks
SAVE_FORMATS = ("fpq", "comfy_quant")


def register_folder(name: str) -> None:
    """Register ``models/<name>`` (keeping any paths extra_model_paths.yaml already gave it, which come first)."""
    paths, _ = folder_paths.folder_names_and_paths.get(name, ([], set()))
    default = os.path.join(folder_paths.models_dir, name)
    paths = list(paths) if default in paths else [*paths, default]
    folder_paths.folder_names_and_paths[name] = (paths, EXTENSIONS)


register_folder(FOLDER)
register_folder(CACHE_FOLDER)


def output_folder(name: str) -> str:
    """The folder a node writes ``name`` files to: the first one registered, except ComfyUI's legacy ``models/unet``.

    ComfyUI lists ``models/unet`` before ``models/diffusion_models`` for the ``diffusion_models`` type (both are
    read by its loaders); new files belong in ``models/diffusion_models``, or in a folder extra_model_paths.yaml
    made the default.
    """
    paths = folder_paths.get_folder_paths(name)
    legacy = os.path.normpath(os.path.join(folder_paths.models_dir, "unet"))
    return next((p for p in paths if os.path.normpath(p) != legacy), paths[0])


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
            },
            "optional": {"cuda_graphs": ("BOOLEAN", {"default": True, "tooltip": CUDA_GRAPHS_TOOLTIP})},
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The quantized model.",)
    FUNCTION = "load"
    CATEGORY = "fpq"
    DESCRIPTION = f"Load an FP8 / FP4 UNet saved by 'Save FP Quantized UNet' from models/{FOLDER}/."

    def load(self, unet_name: str, cuda_graphs: bool = True) -> tuple[Any]:
        path = folder_paths.get_full_path(FOLDER, unet_name)
        if path is None:
            raise NodeInputError(
                f"{unet_name!r} is not in models/{FOLDER}/ (folders: {folder_paths.get_folder_paths(FOLDER)})"
            )
        return (load_model(path, cuda_graphs),)


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]*$")


class SaveFPQuantizedUNet:
    """Save a quantized MODEL (from "FP Quantize UNet") as an fpq file, or export it in ComfyUI's own format."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A MODEL from 'FP Quantize UNet' (before any LoRA)."}),
                "filename_prefix": (
                    "STRING",
                    {"default": "fpq_unet", "tooltip": "File name (a number is added)."},
                ),
            },
            "optional": {
                "format": (
                    list(SAVE_FORMATS),
                    {
                        "default": "fpq",
                        "tooltip": f"fpq: the exact quantized model, in models/{FOLDER}/, for 'Load FP Quantized "
                        f"UNet'. comfy_quant: ComfyUI's native FP8 format (ComfyUI >= 0.8), in models/{NATIVE_FOLDER}/,"
                        " for the plain 'Load Diffusion Model' node without fpq: FP8 Linear layers stay FP8 (one "
                        "scale per tensor), everything else is stored as fp16.",
                    },
                ),
            },
        }

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "fpq"
    DESCRIPTION = (
        f"Save a quantized UNet to models/{FOLDER}/ (load it again with 'Load FP Quantized UNet'), or export its FP8 "
        f"layers in ComfyUI's native comfy_quant format to models/{NATIVE_FOLDER}/ (plain 'Load Diffusion Model')."
    )

    def save(self, model: Any, filename_prefix: str, format: str = "fpq") -> dict[str, Any]:
        if format not in SAVE_FORMATS:
            raise NodeInputError(f"unknown format {format!r}; choose one of {', '.join(SAVE_FORMATS)}")
        prefix = filename_prefix.strip()
        if prefix.endswith(".safetensors"):
            prefix = prefix[: -len(".safetensors")]
        if not _SAFE_NAME.match(prefix) or ".." in prefix:
            raise NodeInputError(
                f"filename_prefix {filename_prefix!r} is not a plain file name; use letters, digits, spaces, "
                "'_', '-' and '.' (no folders)"
            )
        folder = output_folder(FOLDER if format == "fpq" else NATIVE_FOLDER)
        os.makedirs(folder, exist_ok=True)
        counter = 1
        while os.path.exists(path := os.path.join(folder, f"{prefix}_{counter:05d}.safetensors")):
            counter += 1
        if format == "fpq":
            save_model(model, path)
            logger.info("fpq: saved %s (%.1f MiB)", path, os.path.getsize(path) / 2**20)
            return {"ui": {"text": [os.path.basename(path)]}}
        counts = export_comfy_quant(model, path)
        native = counts["native_exact"] + counts["native_requantized"]
        note = (
            f"{native} FP8 Linear layers native ({counts['native_requantized']} requantized to one scale per tensor, "
            f"{counts['input_scales']} with input scales), {counts['dequantized']} layers stored as float"
        )
        if not comfy_quant_supported():
            note += "; this ComfyUI is older than 0.8 and cannot load comfy_quant files itself"
        logger.info("fpq: exported %s in comfy_quant format (%.1f MiB): %s", path, os.path.getsize(path) / 2**20, note)
        return {"ui": {"text": [f"{os.path.basename(path)}: {note}"]}}
