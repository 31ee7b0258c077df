"""``QConv2d``: a quantized drop-in for ``torch.nn.Conv2d`` (any stride, padding, dilation and groups).

The weight ``(N, C/groups, kh, kw)`` is stored as the matrix ``(N, C/groups * kh * kw)``: the same row layout an
implicit-GEMM kernel reduces over, and the same per-output-channel scale as Linear.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fpq_plugin.errors import LayerQuantizationError
from fpq_plugin.formats import Format
from fpq_plugin.nn.base import QuantizedLayer


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


class QConv2d(QuantizedLayer):
    """2-D convolution with quantized weights and an optional static activation quantizer.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as in ``nn.Conv2d``
            (``padding`` may be ``"same"``/``"valid"``; only ``padding_mode="zeros"`` is supported).
        weight_format, input_format, bias, per_channel, bias_dtype, device: as in :class:`QLinear`.
    """

    kind = "conv2d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        weight_format: Format | str,
        input_format: Format | str | None = None,
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        per_channel: bool = True,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise LayerQuantizationError(
                f"channels ({in_channels} in, {out_channels} out) must be divisible by groups={groups}"
            )
        self.in_channels = in_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        reduction = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        self._init_quant_state(
            out_channels,
            reduction,
            weight_format,
            input_format,
            per_channel=per_channel,
            has_bias=bias,
            bias_dtype=bias_dtype,
            device=device,
        )

    @property
    def out_channels(self) -> int:
        return self.out_features

    @classmethod
    def empty_like(
        cls, module: nn.Conv2d, weight_format: Format | str, input_format: Format | str | None, **kw: Any
    ) -> QConv2d:
        """An un-filled QConv2d with ``module``'s geometry; rejects padding modes other than zeros."""
        if module.padding_mode != "zeros":
            raise LayerQuantizationError(
                f"padding_mode={module.padding_mode!r} is not supported (only 'zeros'); skip this layer"
            )
        return cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            weight_format,
            input_format,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            bias_dtype=module.bias.dtype if module.bias is not None else torch.float32,
            device=module.weight.device,
            **kw,
        )

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device: torch.device | str | None = "meta") -> QConv2d:
        """Rebuild an empty layer from :meth:`layer_spec` output."""
        padding = spec["padding"]
        return cls(
            spec["in_channels"],
            spec["out_channels"],
            tuple(spec["kernel_size"]),
            spec["weight_format"],
            spec["input_format"],
            stride=tuple(spec["stride"]),
            padding=padding if isinstance(padding, str) else tuple(padding),
            dilation=tuple(spec["dilation"]),
            groups=spec["groups"],
            bias=spec["bias"],
            per_channel=spec["per_channel"],
            bias_dtype=getattr(torch, spec["bias_dtype"]) if spec["bias"] else torch.float32,
            device=device,
        )

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_channels // self.groups, *self.kernel_size)

    def _geometry(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_features,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
        }

    def _geometry_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_features}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}"
        )
