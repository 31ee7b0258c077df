"""The JSON header of an fpq checkpoint, and its validating parser.

An fpq checkpoint is a safetensors file whose ``__metadata__`` holds one key, ``"fpq"``, with this JSON::

    {
      "format": "fpq.quantized-model",
      "format_version": 1,
      "fpq_version": "0.1.0",
      "model_fingerprint": "sha256:..." | null,      content hash of the float weights it was made from
      "recipe": {...},                                Recipe.to_dict()
      "layers": {"down_blocks.0.attentions.0.proj_in": {"kind": "conv2d", "weight_format": "e4m3fn", ...}},
      "model": {"class": "UNet2DConditionModel", "config": {...}} | null,
      "tensors_sha256": "<64 hex>",                  digest of every tensor (name, dtype, shape, bytes)
      "extra": {...}
    }

:func:`parse_header` accepts only what this module writes; anything else raises
:class:`~fpq_plugin.errors.CheckpointError` naming the file and the field. It is fuzzed in the tests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from fpq_plugin.errors import CheckpointError, FPQError
from fpq_plugin.formats import ACTIVATION_FORMATS, FORMATS
from fpq_plugin.recipes import Recipe

FORMAT_NAME = "fpq.quantized-model"
FORMAT_VERSION = 1
METADATA_KEY = "fpq"
BIAS_DTYPES = ("float32", "float16", "bfloat16", "float64")
# Model classes a checkpoint may ask us to build from its config (never an arbitrary import path).
BUILDABLE_MODELS = ("UNet2DConditionModel", "UNet2DModel")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class CheckpointHeader:
    """Parsed, validated header."""

    format_version: int
    fpq_version: str
    recipe: Recipe
    layers: dict[str, dict[str, Any]]
    tensors_sha256: str
    model_fingerprint: str | None = None
    model: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT_NAME,
                "format_version": self.format_version,
                "fpq_version": self.fpq_version,
                "model_fingerprint": self.model_fingerprint,
                "recipe": self.recipe.to_dict(),
                "layers": self.layers,
                "model": self.model,
                "tensors_sha256": self.tensors_sha256,
                "extra": self.extra,
            },
            sort_keys=True,
        )


def _is_int(v: Any, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _is_pair(v: Any, lo: int) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_int(x, lo) for x in v)


def _check_layer(name: Any, spec: Any) -> str | None:
    """Return what is wrong with one layer entry, or None."""
    if not isinstance(name, str) or not name:
        return "layer names must be non-empty strings"
    if not isinstance(spec, dict):
        return "must be an object"
    kind = spec.get("kind")
    common = {
        "weight_format": lambda v: isinstance(v, str) and v in FORMATS,
        "input_format": lambda v: v is None or (isinstance(v, str) and v in ACTIVATION_FORMATS),
        "per_channel": lambda v: isinstance(v, bool),
        "bias": lambda v: isinstance(v, bool),
        "bias_dtype": lambda v: v is None or (isinstance(v, str) and v in BIAS_DTYPES),
    }
    if kind == "linear":
        geometry = {"in_features": lambda v: _is_int(v, 1), "out_features": lambda v: _is_int(v, 1)}
    elif kind == "conv2d":
        geometry = {
            "in_channels": lambda v: _is_int(v, 1),
            "out_channels": lambda v: _is_int(v, 1),
            "kernel_size": lambda v: _is_pair(v, 1),
            "stride": lambda v: _is_pair(v, 1),
            "padding": lambda v: _is_pair(v, 0) or v in ("same", "valid"),
            "dilation": lambda v: _is_pair(v, 1),
            "groups": lambda v: _is_int(v, 1),
        }
    else:
        return f"unknown kind {kind!r} (expected 'linear' or 'conv2d')"
    checks = {**common, **geometry}
    for key, ok in checks.items():
        if key not in spec:
            return f"missing field {key!r}"
        if not ok(spec[key]):
            return f"field {key!r} has an invalid value {spec[key]!r}"
    unknown = set(spec) - set(checks) - {"kind"}
    if unknown:
        return f"unknown field(s) {sorted(unknown)}"
    if spec["bias"] != (spec["bias_dtype"] is not None):
        return "bias and bias_dtype disagree"
    if kind == "conv2d" and (spec["in_channels"] % spec["groups"] or spec["out_channels"] % spec["groups"]):
        return "channels are not divisible by groups"
    return None


def parse_header(metadata: Any, path: str = "<checkpoint>") -> CheckpointHeader:
    """Validate safetensors metadata and return the header; raises CheckpointError on anything unexpected."""

    def fail(msg: str) -> CheckpointError:
        return CheckpointError(f"{path}: {msg}")

    if not isinstance(metadata, dict) or METADATA_KEY not in metadata:
        raise fail(
            "not an fpq checkpoint (its safetensors metadata has no 'fpq' entry); if it is a plain model, "
            "quantize it with fpq first"
        )
    raw = metadata[METADATA_KEY]
    if not isinstance(raw, str):
        raise fail("the 'fpq' metadata entry must be a JSON string")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise fail("the 'fpq' metadata entry is not valid JSON (the file is corrupt)") from None
    if not isinstance(data, dict):
        raise fail("the fpq header must be a JSON object")
    if data.get("format") != FORMAT_NAME:
        raise fail(f"unknown header format {data.get('format')!r} (expected {FORMAT_NAME!r})")
    version = data.get("format_version")
    if not _is_int(version, 1):
        raise fail(f"format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise fail(
            f"written with checkpoint format version {version}, this fpq reads up to {FORMAT_VERSION}; upgrade fpq"
        )
    fpq_version = data.get("fpq_version")
    if not isinstance(fpq_version, str):
        raise fail("fpq_version must be a string")
    fingerprint = data.get("model_fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise fail("model_fingerprint must be a string or null")
    digest = data.get("tensors_sha256")
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise fail("tensors_sha256 must be 64 lowercase hex digits")
    layers = data.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise fail("layers must be a non-empty object of layer name -> description")
    for name, spec in layers.items():
        problem = _check_layer(name, spec)
        if problem:
            raise fail(f"layer {name!r}: {problem}")
    try:
        recipe = Recipe.from_dict(data.get("recipe"), source="header recipe")
    except (FPQError, RecursionError) as e:
        raise fail(str(e)) from None
    model = data.get("model")
    if model is not None:
        if not isinstance(model, dict) or not isinstance(model.get("config"), dict):
            raise fail("model must be null or an object with a 'config' object")
        if model.get("class") not in BUILDABLE_MODELS:
            raise fail(f"model class {model.get('class')!r} is not one fpq builds (allowed: {BUILDABLE_MODELS})")
    extra = data.get("extra", {})
    if not isinstance(extra, dict):
        raise fail("extra must be an object")
    return CheckpointHeader(version, fpq_version, recipe, layers, digest, fingerprint, model, extra)
