"""State and behaviour shared by the quantized layers.

A quantized layer keeps everything as registered buffers, so ``.to()``, ``state_dict()`` and ComfyUI's memory
accounting see it:

* ``weight_codes``: uint8 ``(N, K)`` for 8-bit formats (the hardware bit patterns for e4m3fn/e5m2), or
  ``(N, ceil(K / 2))`` with two 4-bit codes per byte (see :mod:`fpq_plugin.formats.packing`).
* ``weight_scale``: fp32 ``(N,)`` per output channel or ``(1,)`` per tensor.
* ``weight_zero_point``: fp32 like ``weight_scale``, INT formats only.
* ``input_scale`` (fp32 0-d) and, for INT8, ``input_zero_point``: the static activation quantizer, absent for
  weight-only layers.
* ``bias``: a frozen float parameter in the original dtype.

The arithmetic lives in the backends (:mod:`fpq_plugin.backends`); the layer only describes itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from fpq_plugin.errors import LayerQuantizationError
from fpq_plugin.formats import Format, get_format, pack_nibbles, unpack_nibbles
from fpq_plugin.quantizers import QuantizedWeight


#: Called with a layer after ``.to()`` / ``.cuda()`` / ``.half()``... has replaced its tensors. The GPU backends
#: register one that drops the state they prepared from the old tensors, so that those are freed with the move
#: (ComfyUI offloads a model to free VRAM; a cache holding the GPU copies would keep it in use).
ON_MOVE: list[Callable[[QuantizedLayer], None]] = []

#: Buffers that stay fp32 whatever dtype the model is cast to.
FP32_BUFFERS = frozenset({"weight_scale", "weight_zero_point", "input_scale", "input_zero_point"})


class TraceSpec(NamedTuple):
    """A layer's formats as plain constants, for the code ``torch.compile`` traces.

    Dynamo guards a Python object that several layers share (every e4m3fn layer holds the same Format) with
    identity checks between all the places it is read from, evaluated in Python on every compiled call; ints and
    strings are guarded by value in C++. Reading this instead of the Format objects removed ~150 such checks from a
    compiled UNet's guards (benchmarks/NOTES_GPU.md, 2026-12-03).
    """

    weight_kind: str  # "fp" or "int"
    weight_name: str
    exp_bits: int  # FP bit fields (0 for INT)
    man_bits: int
    bias: float
    packed: bool  # two 4-bit codes per byte
    input_name: str | None  # activation format, None for weight-only layers

    @classmethod
    def of(cls, weight_format: Format, input_format: Format | None) -> TraceSpec:
        fp = weight_format.kind != "int"
        return cls(weight_format.kind, weight_format.name, weight_format.exp_bits if fp else 0,
                   weight_format.man_bits if fp else 0, float(weight_format.bias) if fp else 0.0,
                   weight_format.bits <= 4, input_format.name if input_format is not None else None)


class QuantizedLayer(nn.Module):
    """Base of :class:`QLinear` and :class:`QConv2d`; subclasses define the geometry and ``kind``."""

    kind: str = ""

    def _apply(self, fn, recurse: bool = True):
        # ``.to(torch.bfloat16)`` / ``.half()`` cast every floating tensor; the scales and zero points must stay
        # fp32 (the kernels read them as fp32, and a bf16 scale would move every quantization grid point). They
        # follow the move's device but keep their dtype and exact values, taken from the tensors before the cast.
        before = {n: b for n, b in self._buffers.items() if n in FP32_BUFFERS and b is not None}
        out = super()._apply(fn, recurse)
        for name, old in before.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != old.dtype:
                self._buffers[name] = old.to(moved.device)
        for release in ON_MOVE:
            release(self)
        return out

    def _init_quant_state(
        self,
        out_features: int,
        reduction: int,
        weight_format: Format | str,
        input_format: Format | str | None,
        *,
        per_channel: bool,
        has_bias: bool,
        bias_dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        self.weight_format = get_format(weight_format)
        self.input_format = get_format(input_format) if input_format is not None else None
        self.trace_spec = TraceSpec.of(self.weight_format, self.input_format)
        self.out_features = out_features
        self.reduction = reduction  # K: the length of one weight row
        self.per_channel = per_channel
        self.backend = "auto"
        codes_cols = (reduction + 1) // 2 if self.packed else reduction
        self.register_buffer("weight_codes", torch.zeros(out_features, codes_cols, dtype=torch.uint8, device=device))
        n_scales = out_features if per_channel else 1
        self.register_buffer("weight_scale", torch.ones(n_scales, dtype=torch.float32, device=device))
        if self.weight_format.kind == "int":
            self.register_buffer("weight_zero_point", torch.zeros(n_scales, dtype=torch.float32, device=device))
        else:
            self.weight_zero_point = None
        if self.input_format is not None:
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
            if self.input_format.kind == "int":
                self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.float32, device=device))
            else:
                self.input_zero_point = None
        else:
            self.input_scale = None
            self.input_zero_point = None
        if has_bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # ---- description -----------------------------------------------------------------------------------------
    @property
    def packed(self) -> bool:
        """True when two 4-bit codes share a byte."""
        return self.weight_format.bits <= 4

    def layer_spec(self) -> dict[str, Any]:
        """JSON-able description from which :meth:`from_spec` rebuilds an empty layer (checkpoint header)."""
        return {
            "kind": self.kind,
            "weight_format": self.weight_format.name,
            "input_format": self.input_format.name if self.input_format is not None else None,
            "per_channel": self.per_channel,
            "bias": self.bias is not None,
            "bias_dtype": str(self.bias.dtype).removeprefix("torch.") if self.bias is not None else None,
            **self._geometry(),
        }

    def _geometry(self) -> dict[str, Any]:
        raise NotImplementedError

    # ---- filling in quantized values --------------------------------------------------------------------------
    @torch.no_grad()
    def set_weight(self, qweight: QuantizedWeight) -> None:
        """Store codes, scale and zero point (the layer's format and shapes must match)."""
        if qweight.format.name != self.weight_format.name:
            raise LayerQuantizationError(
                f"weight format {qweight.format.name!r} does not match the layer's {self.weight_format.name!r}"
            )
        codes = qweight.codes.reshape(self.out_features, self.reduction)
        codes = pack_nibbles(codes) if self.packed else codes.to(torch.uint8)
        self.weight_codes = codes.to(self.weight_codes.device)
        self.weight_scale = qweight.scale.float().reshape(-1).to(self.weight_codes.device)
        if self.weight_zero_point is not None:
            self.weight_zero_point = qweight.zero_point.float().reshape(-1).to(self.weight_codes.device)

    @torch.no_grad()
    def set_input_quantizer(self, scale: float, zero_point: float | None = None) -> None:
        """Set the static activation scale (and INT8 zero point)."""
        if self.input_format is None:
            raise LayerQuantizationError("this layer is weight-only; it has no input quantizer")
        if not (scale > 0 and scale < float("inf")):
            raise LayerQuantizationError(f"activation scale must be a positive finite number, got {scale}")
        self.input_scale = torch.tensor(float(scale), dtype=torch.float32, device=self.weight_codes.device)
        if self.input_zero_point is not None:
            self.input_zero_point = torch.tensor(
                float(zero_point or 0.0), dtype=torch.float32, device=self.weight_codes.device
            )

    # ---- views used by the backends ------------------------------------------------------------------------------
    def weight_code_matrix(self) -> torch.Tensor:
        """Unpacked codes ``(N, K)``, uint8."""
        if self.packed:
            return unpack_nibbles(self.weight_codes, self.reduction)
        return self.weight_codes

    def weight_grid_values(self) -> torch.Tensor:
        """fp32 ``(N, K)``: ``value(code) - zero_point``, i.e. the weight before the per-channel scale."""
        values = self.weight_format.decode(self.weight_code_matrix())
        if self.weight_zero_point is not None:
            values = values - self.weight_zero_point.unsqueeze(-1)
        return values

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the codes stand for, in the float module's shape."""
        w = self.weight_grid_values() * self.weight_scale.unsqueeze(-1)
        return w.reshape(self.weight_shape).to(dtype)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight, for code that reads ``module.weight`` (costs a full dequantization)."""
        return self.dequantized_weight(self.bias.dtype if self.bias is not None else torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from fpq_plugin.backends import dispatch

        return dispatch(self, x)

    def quantized_bytes(self) -> int:
        """Bytes of every buffer and parameter of this layer."""
        return sum(t.numel() * t.element_size() for t in (*self.buffers(), *self.parameters()))

    def extra_repr(self) -> str:
        act = self.input_format.name if self.input_format is not None else "none"
        return f"{self._geometry_repr()}, weight={self.weight_format.name}, input={act}, backend={self.backend}"

    def _geometry_repr(self) -> str:
        raise NotImplementedError
