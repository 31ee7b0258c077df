"""Save and load quantized models as safetensors files with an fpq JSON header (see :mod:`fpq_plugin.io.header`).

Loading never materialises full-precision weights: the model skeleton lives on the ``meta`` device, the layers
named in the header are swapped for empty quantized layers, and the file's tensors are assigned in place. Nothing
is unpickled: safetensors holds raw tensors, and the only model classes built from a header are in an allowlist.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch
from torch import nn

from fpq_plugin.errors import CheckpointError, FPQError
from fpq_plugin.io.digest import tensor_digest
from fpq_plugin.io.header import FORMAT_VERSION, METADATA_KEY, CheckpointHeader, parse_header
from fpq_plugin.nn import LAYER_KINDS, QuantizedLayer, quantized_type_for
from fpq_plugin.recipes import Recipe, get_recipe


def _version() -> str:
    from fpq_plugin import __version__

    return __version__


def _json_safe(value: Any) -> Any:
    """Config values as plain JSON (tuples become lists; anything exotic is an error, not a silent str())."""
    return json.loads(json.dumps(value, default=lambda o: list(o) if isinstance(o, tuple) else _reject(o)))


def _reject(o: Any) -> Any:
    raise TypeError(f"config value {o!r} of type {type(o).__name__} is not JSON-serialisable")


def model_description(model: nn.Module) -> dict[str, Any] | None:
    """``{"class", "config"}`` for diffusers models (so the file can rebuild its own skeleton), else None."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None or name not in ("UNet2DConditionModel", "UNet2DModel"):
        return None
    return {"class": name, "config": _json_safe({k: v for k, v in dict(config).items() if not k.startswith("_")})}


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; a tied tensor is written as its own copy.
    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if key in seen:
            t = t.clone()
        seen.add(key)
        tensors[name] = t
    return tensors


def atomic_write_bytes(path: str | os.PathLike, write: Any) -> None:
    """Call ``write(tmp_path)`` then move the temp file over ``path`` (same folder, fsync'd, atomic rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_quantized(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    recipe: Recipe | str | dict[str, Any],
    model_fingerprint: str | None = None,
    extra: dict[str, Any] | None = None,
) -> CheckpointHeader:
    """Write every parameter and buffer of a quantized ``model`` to ``path`` atomically.

    Args:
        model: a model with quantized layers (after :func:`fpq_plugin.quantize_`).
        path: destination ``.safetensors`` file; written to a temp file and renamed, so readers never see half a file.
        recipe: the recipe used (stored in the header).
        model_fingerprint: content hash of the float model it came from (cache keys, provenance).
        extra: JSON-able extra information.

    Returns:
        The header that was written.
    """
    from safetensors.torch import save_file

    layers = {n: m.layer_spec() for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}
    if not layers:
        raise CheckpointError(f"{os.fspath(path)}: the model has no quantized layers; run fpq_plugin.quantize_ first")
    tensors = _unique_tensors(model)
    header = CheckpointHeader(
        format_version=FORMAT_VERSION,
        fpq_version=_version(),
        recipe=get_recipe(recipe),
        layers=layers,
        tensors_sha256=tensor_digest(tensors),
        model_fingerprint=model_fingerprint,
        model=model_description(model),
        extra=_json_safe(extra or {}),
    )
    atomic_write_bytes(path, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: header.to_json()}))
    return header


def read_header(path: str | os.PathLike) -> CheckpointHeader:
    """Parse and validate the header of ``path`` without reading tensor data."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(path, framework="pt") as fh:
            metadata = fh.metadata()
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    return parse_header(metadata, path)


def build_model_skeleton(header: CheckpointHeader, path: str) -> nn.Module:
    """An empty (meta-device) diffusers model from the header's stored config."""
    if header.model is None:
        raise CheckpointError(
            f"{path}: the checkpoint does not say how to build its model; pass model=<float or meta model>"
        )
    try:
        import diffusers
        from accelerate import init_empty_weights
    except ImportError:
        raise CheckpointError(
            f"{path}: rebuilding a {header.model['class']} needs diffusers and accelerate: pip install diffusers accelerate"
        ) from None
    cls = getattr(diffusers, header.model["class"])
    try:
        with init_empty_weights():
            return cls.from_config(header.model["config"])
    except Exception as e:
        raise CheckpointError(f"{path}: the stored model config does not build a {cls.__name__}: {e}") from None


def _swap_in_empty_layers(model: nn.Module, header: CheckpointHeader, path: str) -> None:
    from fpq_plugin.api import set_submodule

    for name, spec in header.layers.items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: layer {name!r} does not exist in the given model") from None
        empty = LAYER_KINDS[spec["kind"]].from_spec(spec, device="meta")
        if isinstance(current, QuantizedLayer):
            same = current.layer_spec()
            same.pop("bias_dtype", None)
            if {k: v for k, v in spec.items() if k != "bias_dtype"} != same:
                raise CheckpointError(f"{path}: layer {name!r} is already quantized differently in the given model")
        else:
            q_type = quantized_type_for(current)
            if q_type is not LAYER_KINDS[spec["kind"]]:
                raise CheckpointError(
                    f"{path}: layer {name!r} is a {type(current).__name__} in the model but a {spec['kind']} "
                    "in the checkpoint; is this the right model?"
                )
            if tuple(current.weight.shape) != empty.weight_shape:
                raise CheckpointError(
                    f"{path}: layer {name!r} has weight shape {tuple(current.weight.shape)} in the model but "
                    f"{empty.weight_shape} in the checkpoint; is this the right model?"
                )
        set_submodule(model, name, empty)


def load_quantized(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    device: str | torch.device = "cpu",
    verify: bool = True,
) -> tuple[nn.Module, CheckpointHeader]:
    """Load a quantized checkpoint.

    Args:
        path: an fpq ``.safetensors`` file.
        model: the float model (or a ``meta``-device skeleton of it) to load into; its layers named in the
            header are replaced. ``None`` builds the diffusers UNet the header describes.
        device: where the loaded tensors go.
        verify: check the tensors' sha256 against the header (detects tampering and bit rot).

    Returns:
        ``(model, header)``; the model is in eval mode.
    """
    from safetensors.torch import load_file

    path = os.fspath(path)
    header = read_header(path)
    if model is None:
        model = build_model_skeleton(header, path)
    _swap_in_empty_layers(model, header, path)
    try:
        tensors = load_file(path, device=str(device))
    except Exception as e:
        raise CheckpointError(f"{path}: tensor data is unreadable (truncated or corrupt?): {e}") from None
    if verify and tensor_digest(tensors) != header.tensors_sha256:
        raise CheckpointError(f"{path}: tensor data does not match the header's sha256; the file was modified or damaged")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    quantized_prefixes = tuple(f"{n}." for n in header.layers)
    for key, want in expected.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        if key.startswith(quantized_prefixes) and got.dtype != want.dtype:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {got.dtype}, expected {want.dtype}")
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except (RuntimeError, FPQError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    leftover = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: these tensors were not in the file and stay empty: {leftover[:5]}")
    return model.eval(), header
