"""Recipes: small, validated configuration objects saying how a model is quantized.

A recipe names the weight formats to choose among, the activation format (or none for weight-only), how scales
are chosen, which layers are skipped, and how much of the paper's method runs (``rounding``: round-to-nearest or
learned). Built-in presets cover the paper's settings and the INT baselines::

    w8a8   FP8 e4m3 weights and activations          int8   INT8 W8A8 (Q-Diffusion baseline)
    w4a8   FP4 weights (e2m1/e3m0/e1m2), FP8 acts    int4   INT4 weights, INT8 activations
    w4a16  FP4 weights only                          w8a16  FP8 e4m3 weights only

Recipes round-trip through plain dicts (``to_dict``/``from_dict``) and YAML files (``from_yaml``); unknown keys,
wrong types and unknown formats raise :class:`~fpq_plugin.errors.RecipeError` naming the field (and file).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from fpq_plugin.errors import FormatError, RecipeError
from fpq_plugin.formats import ACTIVATION_FORMATS, FP8_SEARCH_FORMATS, HARDWARE_FP8, get_format

RECIPE_VERSION = 1
ROUNDING_MODES = ("nearest", "learned")
SCALE_METHODS = ("absmax", "mse")
GRANULARITIES = ("channel", "tensor")


@dataclass(frozen=True)
class Recipe:
    """How to quantize a model.

    Args:
        name: a label stored in checkpoints and cache keys.
        weight_formats: candidate weight formats, all of one bit width; with several, each layer gets the one
            with the lowest error (the paper's per-tensor encoding search).
        activation_format: ``"e4m3fn"``, ``"e5m2"``, ``"int8"``, ``"auto"`` (choose e4m3fn or e5m2 per layer during
            calibration), ``"search"`` (choose among every 8-bit FP encoding, e5m2 .. e2m5, per layer: the paper's
            search; e3m4 / e2m5 are simulated, with no tensor-core path), a research format ``"e3m4"`` /
            ``"e2m5"``, or ``None`` for weight-only.
        weight_granularity: ``"channel"`` (a scale per output channel) or ``"tensor"``.
        weight_scale_method: ``"absmax"`` or ``"mse"`` (clipping search).
        rounding: ``"nearest"`` or ``"learned"`` (learned rounding needs calibration data).
        skip: glob patterns of qualified layer names left in full precision (e.g. ``"conv_in"``, ``"*.to_k"``).
        version: recipe schema version.
    """

    name: str
    weight_formats: tuple[str, ...]
    activation_format: str | None = None
    weight_granularity: str = "channel"
    weight_scale_method: str = "absmax"
    rounding: str = "nearest"
    skip: tuple[str, ...] = ()
    version: int = RECIPE_VERSION
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise RecipeError(f"recipe name must be a non-empty string, got {self.name!r}")
        formats = self.weight_formats
        if isinstance(formats, str):
            formats = (formats,)
        if not isinstance(formats, (tuple, list)) or not formats:
            raise RecipeError(f"recipe {self.name!r}: weight_formats must be a non-empty list of format names")
        try:
            resolved = [get_format(f) for f in formats]
        except FormatError as e:
            raise RecipeError(f"recipe {self.name!r}: {e}") from None
        if len({f.bits for f in resolved}) != 1:
            raise RecipeError(
                f"recipe {self.name!r}: weight_formats {list(formats)} mix bit widths; list formats of one width"
            )
        if len({f.kind for f in resolved}) != 1:
            raise RecipeError(f"recipe {self.name!r}: weight_formats {list(formats)} mix FP and INT formats")
        object.__setattr__(self, "weight_formats", tuple(formats))
        act = self.activation_format
        if act is not None and act not in ("auto", "search") and act not in ACTIVATION_FORMATS:
            raise RecipeError(
                f"recipe {self.name!r}: activation_format must be one of {ACTIVATION_FORMATS}, 'auto' (e4m3fn or "
                f"e5m2 per layer), 'search' (every 8-bit FP encoding per layer, simulated) or null, got {act!r}"
            )
        for key, allowed in (
            ("weight_granularity", GRANULARITIES),
            ("weight_scale_method", SCALE_METHODS),
            ("rounding", ROUNDING_MODES),
        ):
            if getattr(self, key) not in allowed:
                raise RecipeError(f"recipe {self.name!r}: {key} must be one of {allowed}, got {getattr(self, key)!r}")
        skip = self.skip
        if isinstance(skip, str):
            skip = (skip,)
        if not all(isinstance(p, str) and p for p in skip):
            raise RecipeError(f"recipe {self.name!r}: skip must be a list of non-empty glob patterns, got {skip!r}")
        object.__setattr__(self, "skip", tuple(skip))
        if self.version != RECIPE_VERSION:
            raise RecipeError(
                f"recipe {self.name!r}: schema version {self.version} is not supported (this fpq reads {RECIPE_VERSION})"
            )

    # ---- derived -------------------------------------------------------------------------------------------------
    @property
    def weight_bits(self) -> int:
        return get_format(self.weight_formats[0]).bits

    @property
    def quantizes_activations(self) -> bool:
        return self.activation_format is not None

    def activation_candidates(self) -> tuple[str, ...]:
        if self.activation_format == "auto":
            return HARDWARE_FP8
        if self.activation_format == "search":
            return FP8_SEARCH_FORMATS
        return () if self.activation_format is None else (self.activation_format,)

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ---- serialisation --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d["weight_formats"] = list(self.weight_formats)
        d["skip"] = list(self.skip)
        if self.extra:
            d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "recipe") -> Recipe:
        """Build from a dict; ``preset: <name>`` starts from a built-in preset and overrides its fields."""
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe must be a mapping of fields, got {type(data).__name__}")
        data = dict(data)
        base: dict[str, Any] = {}
        if "preset" in data:
            base = get_recipe(data.pop("preset")).to_dict()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"{source}: unknown recipe field(s) {unknown}; known fields: {sorted(known)}")
        merged = {**base, **data}
        if "name" not in merged:
            raise RecipeError(f"{source}: a recipe needs a 'name' (or a 'preset' to start from)")
        if "weight_formats" not in merged:
            raise RecipeError(f"{source}: a recipe needs 'weight_formats' (or a 'preset' to start from)")
        try:
            return cls(**merged)
        except RecipeError as e:
            raise RecipeError(f"{source}: {e}") from None
        except TypeError as e:
            raise RecipeError(f"{source}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Recipe:
        """Load a recipe from a YAML file (``yaml.safe_load``; no Python objects are ever constructed)."""
        import yaml

        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh)
        except OSError as e:
            raise RecipeError(f"cannot read recipe file {os.fspath(path)!r}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe file {os.fspath(path)!r} is not valid YAML: {e}") from None
        return cls.from_dict(data, source=f"recipe file {os.fspath(path)!r}")


FP4_FORMATS = ("e2m1", "e3m0", "e1m2")

PRESETS: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("w8a8", ("e4m3fn",), "e4m3fn"),
        # The paper's 8-bit encoding search for weights and activations; same size as w8a8, but layers that pick
        # e3m4 / e2m5 run on the dequant backend (no FP8 tensor cores): for quality studies, not for speed.
        Recipe("w8a8-search", FP8_SEARCH_FORMATS, "search", weight_scale_method="mse"),
        Recipe("w4a8", FP4_FORMATS, "e4m3fn", weight_scale_method="mse"),
        # FP4 weights with the paper's 8-bit encoding search for the activations (simulated, as w8a8-search).
        Recipe("w4a8-search", FP4_FORMATS, "search", weight_scale_method="mse"),
        Recipe("w4a16", FP4_FORMATS, None, weight_scale_method="mse"),
        Recipe("w8a16", ("e4m3fn",), None),
        Recipe("int8", ("int8",), "int8", weight_scale_method="mse"),
        Recipe("int4", ("int4",), "int8", weight_scale_method="mse"),
    )
}


def get_recipe(recipe: str | Recipe | dict[str, Any] | os.PathLike) -> Recipe:
    """Resolve a preset name, a YAML path, a dict or a Recipe into a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, str) and recipe in PRESETS:
        return PRESETS[recipe]
    if isinstance(recipe, (str, os.PathLike)) and os.fspath(recipe).endswith((".yaml", ".yml")):
        return Recipe.from_yaml(recipe)
    raise RecipeError(f"unknown recipe {recipe!r}; presets: {', '.join(PRESETS)}, or a path to a .yaml file")
