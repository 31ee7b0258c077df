"""Per-layer weight statistics of a quantized (or float) model: formats, sizes and weight sparsity.

Rounding weights to a coarse grid sends the small ones to exactly 0, so low-bit quantization *raises weight
sparsity*; the paper compares FP and INT on it. Which of FP4 and INT4 ends up sparser depends on the weights and the
scale search (on bell-shaped random weights with round-to-nearest and MSE scales, tests/test_stats.py measured
e2m1 9.5% vs int4 13.4% zeros, e4m3fn 0%), so measure it rather than assume it. This module measures it the same
way for every caller (``fpq inspect``, the evaluation harness, the demo)::

    from fpq_plugin.stats import layer_stats

    stats = layer_stats(unet)                              # a model: quantized and float Linear/Conv2d layers
    stats = layer_stats("unet.fpq.safetensors")            # an fpq checkpoint, read layer by layer (no model built)
    print(f"{stats.sparsity:.2%} of the quantized weights are exactly zero")
    for layer in stats.layers:
        print(layer.name, layer.weight_format, layer.sparsity, layer.bytes)

Definitions (identical for models and checkpoints):

* **sparsity** of a layer: the fraction of its *dequantized* weight elements (``codes -> value - zero_point``,
  times the scale: exactly what :meth:`fpq_plugin.nn.QuantizedLayer.dequantized_weight` returns in fp32) that
  are exactly ``0.0``. For a float layer it is the fraction of exact zeros in its weight. Biases are not weights.
* **overall sparsity** (:attr:`ModelStats.sparsity`): zeros over elements summed over the *quantized* layers
  (element-weighted, not a mean of per-layer fractions); :attr:`ModelStats.float_sparsity` is the same over the
  float Linear/Conv2d layers that were left in full precision.
* **bytes** of a layer: every tensor it stores (codes, scales, zero points, activation scale, bias);
  ``bf16_bytes``: its weight and bias at 2 bytes per element, the usual baseline. :attr:`ModelStats.total_bytes`
  counts every tensor of the model or file, layers or not.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from fpq_plugin.errors import CheckpointError
from fpq_plugin.nn import LAYER_KINDS, QuantizedLayer, quantized_type_for

__all__ = ["LayerStats", "ModelStats", "layer_stats"]


@dataclass(frozen=True)
class LayerStats:
    """Statistics of one Linear/Conv2d layer.

    Attributes:
        name: The module path (``down_blocks.0.attentions.0.proj_in``).
        kind: ``"linear"`` or ``"conv2d"``.
        quantized: Whether the layer is a quantized fpq layer (else a float layer kept in full precision).
        weight_format: The weight format's name (``"e4m3fn"``, ``"e2m1"``, ``"int4"``...) or, for a float layer,
            its dtype (``"float32"``).
        input_format: The activation format, or None (weight-only or float).
        shape: The weight's shape as the float module has it (``(out, in)`` or ``(out, in, kh, kw)``).
        numel: Weight elements.
        zeros: Weight elements that are exactly zero after dequantization.
        bytes: Bytes of every tensor the layer stores.
        bf16_bytes: Bytes its weight and bias would take in bf16.
    """

    name: str
    kind: str
    quantized: bool
    weight_format: str
    input_format: str | None
    shape: tuple[int, ...]
    numel: int
    zeros: int
    bytes: int
    bf16_bytes: int

    @property
    def sparsity(self) -> float:
        """Fraction of weight elements that are exactly zero (0 for an empty layer)."""
        return self.zeros / self.numel if self.numel else 0.0


@dataclass
class ModelStats:
    """Statistics of every Linear/Conv2d layer of a model or checkpoint, plus totals.

    Attributes:
        layers: One :class:`LayerStats` per layer, in module order (checkpoints: header order).
        total_bytes: Bytes of every tensor of the model or file (layers, norms, embeddings...).
        header: For a checkpoint, its :class:`fpq_plugin.io.CheckpointHeader`; else None.
        source: What was measured: the file's path, or the model's class name.
    """

    layers: list[LayerStats] = field(default_factory=list)
    total_bytes: int = 0
    header: Any = None
    source: str = ""

    def _quantized(self) -> Iterator[LayerStats]:
        return (s for s in self.layers if s.quantized)

    @property
    def sparsity(self) -> float:
        """Zeros over elements, summed over the quantized layers (0 when there are none)."""
        numel = sum(s.numel for s in self._quantized())
        return sum(s.zeros for s in self._quantized()) / numel if numel else 0.0

    @property
    def float_sparsity(self) -> float:
        """Zeros over elements, summed over the float Linear/Conv2d layers (0 when there are none)."""
        floats = [s for s in self.layers if not s.quantized]
        numel = sum(s.numel for s in floats)
        return sum(s.zeros for s in floats) / numel if numel else 0.0

    @property
    def quantized_layer_bytes(self) -> int:
        """Bytes stored by the quantized layers."""
        return sum(s.bytes for s in self._quantized())

    @property
    def quantized_layer_bf16_bytes(self) -> int:
        """Bytes the quantized layers' weights and biases would take in bf16."""
        return sum(s.bf16_bytes for s in self._quantized())

    def format_counts(self) -> dict[str, int]:
        """``{weight format: number of layers}``, float layers under their dtype."""
        counts: dict[str, int] = {}
        for s in self.layers:
            counts[s.weight_format] = counts.get(s.weight_format, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (``fpq inspect --json``): totals and one dict per layer with its ``sparsity``."""
        header = self.header
        return {
            "source": self.source,
            "total_bytes": self.total_bytes,
            "quantized_layers": sum(1 for _ in self._quantized()),
            "float_layers": sum(1 for s in self.layers if not s.quantized),
            "quantized_layer_bytes": self.quantized_layer_bytes,
            "quantized_layer_bf16_bytes": self.quantized_layer_bf16_bytes,
            "sparsity": self.sparsity,
            "float_sparsity": self.float_sparsity,
            "format_counts": self.format_counts(),
            "recipe": header.recipe.to_dict() if header is not None else None,
            "model_fingerprint": header.model_fingerprint if header is not None else None,
            "format_version": header.format_version if header is not None else None,
            "fpq_version": header.fpq_version if header is not None else None,
            "model_class": (header.model or {}).get("class") if header is not None else None,
            "extra": header.extra if header is not None else None,
            "layers": [{**asdict(s), "shape": list(s.shape), "sparsity": s.sparsity} for s in self.layers],
        }


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@torch.no_grad()
def _zeros_from_codes(layer: QuantizedLayer) -> int | None:
    """Exact-zero count from the codes alone (uint8 compares: ~20x faster than dequantizing), or None when the
    shortcut could differ from ``dequantized_weight() == 0``: a scale that is 0, negative, not finite or so small
    that ``value * scale`` could underflow to 0 in fp32, or a zero point that is not an integer code."""
    fmt, scale = layer.weight_format, layer.weight_scale.float()
    if scale.numel() == 0 or not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        return None
    table = fmt.decode(torch.arange(2**fmt.bits, dtype=torch.int32)).float()  # value of every code
    codes = layer.weight_code_matrix()  # (N, K) uint8
    if layer.weight_zero_point is None:
        smallest = table.abs()[(table != 0) & torch.isfinite(table)].min()
        if float(smallest * scale.min()) == 0.0:  # fp32 underflow possible: only the exact path is exact
            return None
        zero_codes = [int(c) for c in torch.nonzero(table == 0).flatten()]  # +0 and -0 for FP formats
        return int(sum(int((codes == c).sum()) for c in zero_codes))
    zp = layer.weight_zero_point.float().reshape(-1)
    if not bool((zp == zp.round()).all()) or not bool(((zp >= 0) & (zp < 2**fmt.bits)).all()):
        return None
    if not bool((table == torch.arange(2**fmt.bits).float()).all()):  # INT codes are their own values
        return None
    zp_codes = zp.to(torch.uint8).unsqueeze(-1).expand(codes.shape[0], 1)  # (N, 1): per-channel or per-tensor
    return int((codes == zp_codes).sum())


@torch.no_grad()
def _quantized_layer_stats(name: str, layer: QuantizedLayer, *, exact: bool = False) -> LayerStats:
    shape = layer.weight_shape
    numel = 1
    for d in shape:
        numel *= d
    zeros = None if exact else _zeros_from_codes(layer)
    if zeros is None:
        zeros = int((layer.dequantized_weight(torch.float32) == 0).sum())  # exactly the values the layer uses
    bias_numel = layer.bias.numel() if layer.bias is not None else 0
    return LayerStats(
        name=name,
        kind=layer.kind,
        quantized=True,
        weight_format=layer.weight_format.name,
        input_format=layer.input_format.name if layer.input_format is not None else None,
        shape=tuple(shape),
        numel=numel,
        zeros=zeros,
        bytes=layer.quantized_bytes(),
        bf16_bytes=2 * (numel + bias_numel),
    )


@torch.no_grad()
def _float_layer_stats(name: str, module: nn.Module, kind: str) -> LayerStats:
    weight = module.weight.detach()
    bias = getattr(module, "bias", None)
    bias_numel = bias.numel() if bias is not None else 0
    return LayerStats(
        name=name,
        kind=kind,
        quantized=False,
        weight_format=str(weight.dtype).removeprefix("torch."),
        input_format=None,
        shape=tuple(weight.shape),
        numel=weight.numel(),
        zeros=int((weight == 0).sum()) if not weight.is_meta else 0,
        bytes=_nbytes([weight, bias]),
        bf16_bytes=2 * (weight.numel() + bias_numel),
    )


def _model_stats(model: nn.Module, include_float: bool) -> ModelStats:
    stats = ModelStats(source=type(model).__name__, total_bytes=_nbytes(model.state_dict().values()))
    seen: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, QuantizedLayer):
            stats.layers.append(_quantized_layer_stats(name, module))
        elif include_float:
            q_type = quantized_type_for(module)
            if q_type is not None:
                stats.layers.append(_float_layer_stats(name, module, q_type.kind))
    return stats


def _checkpoint_stats(path: str) -> ModelStats:
    """Read an fpq checkpoint one layer at a time: memory stays at one layer's dequantized weight."""
    from safetensors import safe_open

    from fpq_plugin.io import read_header

    header = read_header(path)
    stats = ModelStats(header=header, source=path)
    try:
        with safe_open(path, framework="pt") as fh:
            keys = set(fh.keys())
            for key in keys:
                sl = fh.get_slice(key)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                stats.total_bytes += numel * _dtype_size(sl.get_dtype())
            for name, spec in header.layers.items():
                layer = LAYER_KINDS[spec["kind"]].from_spec(spec, device="cpu")
                own = {k: v for k, v in layer.state_dict().items()}
                tensors = {}
                for local in own:
                    full = f"{name}.{local}"
                    if full not in keys:
                        raise CheckpointError(f"{path}: layer {name!r} has no tensor {full!r}; the file is damaged")
                    tensors[local] = fh.get_tensor(full)
                try:
                    layer.load_state_dict(tensors, strict=True, assign=True)
                except RuntimeError as e:
                    raise CheckpointError(f"{path}: layer {name!r} does not match its header entry: {e}") from None
                stats.layers.append(_quantized_layer_stats(name, layer))
    except CheckpointError:
        raise
    except Exception as e:  # safetensors' own errors for truncated or garbled data
        raise CheckpointError(f"{path}: tensor data is unreadable (truncated or corrupt?): {e}") from None
    return stats


_DTYPE_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


def _dtype_size(name: str) -> int:
    return _DTYPE_SIZES.get(str(name).upper(), 1)


def layer_stats(source: nn.Module | str | os.PathLike[str], *, include_float: bool = True) -> ModelStats:
    """Formats, sizes and weight sparsity of every Linear/Conv2d layer of a model or an fpq checkpoint.

    Args:
        source: A model (quantized with fpq or not; its quantized layers are measured as they compute, float
            Linear/Conv2d layers as they are) or the path of an fpq checkpoint (``fpq_plugin.save_quantized``,
            a cache entry, or ``unet/fpq_unet.safetensors`` of a saved quantized pipeline). A checkpoint is read
            one layer at a time with no model built, so it also works where diffusers is not installed.
        include_float: For a model, also list the float Linear/Conv2d layers (skipped or not yet quantized).
            A checkpoint lists only its quantized layers (its float tensors are not Linear/Conv2d-tagged).

    Returns:
        A :class:`ModelStats`; ``stats.sparsity`` is the element-weighted zero fraction over quantized layers.

    Raises:
        CheckpointError: The path is not a readable fpq checkpoint (the message names the file and why).
        TypeError: ``source`` is neither a module nor a path.

    Example::

        fpq.quantize_(unet, "w4a16")
        s = layer_stats(unet)
        print(f"W4A16: {s.sparsity:.1%} zero weights, {s.quantized_layer_bytes / 2**20:.1f} MiB")
    """
    if isinstance(source, nn.Module):
        return _model_stats(source, include_float)
    if isinstance(source, (str, os.PathLike)):
        return _checkpoint_stats(os.fspath(source))
    raise TypeError(f"layer_stats takes a model or a checkpoint path, got {type(source).__name__}")
