"""Read report folders back and merge them: one table from evaluations that ran in separate processes.

``fpq eval --jobs N`` runs groups of rows in N processes (the learned-rounding rows are bound by kernel-launch
overhead on a GPU, so several processes share one GPU well) and merges their folders with :func:`merge_results`.
Merging is only allowed between evaluations with identical settings: every process regenerates the same
full-precision images from the same seeds, so their rows are comparable; different settings are a typed error
naming the folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from fpq_plugin.errors import CheckpointError
from fpq_plugin.evaluation.harness import ABLATION_VARIANTS, PAPER_VARIANTS, EvalResult, EvalSettings

__all__ = ["IMAGES_FILE", "RESULTS_FILE", "load_result", "merge_results"]

RESULTS_FILE = "results.json"
IMAGES_FILE = "images.safetensors"  # the grid's images as uint8, one tensor per variant (no pickle)
_ORDER = {v.name: i for i, v in enumerate(PAPER_VARIANTS + ABLATION_VARIANTS)}


def images_to_tensors(result: EvalResult) -> dict[str, torch.Tensor]:
    return {name: (images.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
            for name, images in result.images.items()}


def load_result(folder: str | os.PathLike[str]) -> EvalResult:
    """The :class:`EvalResult` a report folder holds (rows, settings, prompts and the grid's images)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / RESULTS_FILE
    try:
        data = json.loads(path.read_text())
        settings = EvalSettings(**data["settings"])
        rows = list(data["rows"])
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {RESULTS_FILE}; is {folder} a folder written by `fpq eval`?") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not an fpq evaluation result ({e}); rerun `fpq eval` into it") from None
    images: dict[str, torch.Tensor] = {}
    image_path = folder / IMAGES_FILE
    if image_path.is_file():
        try:
            images = {k: v.float() / 255 for k, v in load_file(str(image_path)).items()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{image_path}: unreadable ({e}); delete it to merge without the grid") from None
    return EvalResult(settings, rows=rows, images=images, prompts=list(data.get("prompts", [])))


def merge_results(results: Sequence[EvalResult], sources: Sequence[str] | None = None) -> EvalResult:
    """One result holding every row once, in table order (paper rows, then ablations, then anything else).

    A row present in several results (the full-precision row each process computes) is kept from the first.

    Raises:
        CheckpointError: when the settings differ (naming the first source that disagrees) or nothing is given.
    """
    if not results:
        raise CheckpointError("nothing to merge: give at least one evaluation folder")
    sources = list(sources) if sources is not None else [f"result {i}" for i in range(len(results))]
    first = results[0]
    merged = EvalResult(first.settings, prompts=list(first.prompts))
    seen: dict[str, dict] = {}
    for result, source in zip(results, sources):
        if result.settings != first.settings:
            raise CheckpointError(
                f"{source}: evaluated with different settings than {sources[0]} ({result.settings} vs "
                f"{first.settings}); only runs of one `fpq eval` command line can be merged"
            )
        for row in result.rows:
            seen.setdefault(row["variant"], row)
        for name, images in result.images.items():
            merged.images.setdefault(name, images)
    order = sorted(seen, key=lambda name: (_ORDER.get(name, len(_ORDER)), name))
    merged.rows = [seen[name] for name in order]
    merged.images = {name: merged.images[name] for name in order if name in merged.images}
    return merged
