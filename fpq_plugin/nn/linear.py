"""``QLinear``: a quantized drop-in for ``torch.nn.Linear``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fpq_plugin.formats import Format
from fpq_plugin.nn.base import QuantizedLayer


class QLinear(QuantizedLayer):
    """Linear layer with quantized weights (FP8, FP4 or INT) and an optional static activation quantizer.

    Args:
        in_features, out_features: as in ``nn.Linear``.
        weight_format: format (or name) of the weight codes.
        input_format: format of the activation, or ``None`` for weight-only.
        bias: whether the layer has a bias.
        per_channel: one weight scale per output feature (else one per tensor).
        bias_dtype: dtype of the stored bias.
        device: where the buffers live (``"meta"`` to allocate nothing).
    """

    kind = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_format: Format | str,
        input_format: Format | str | None = None,
        *,
        bias: bool = True,
        per_channel: bool = True,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self._init_quant_state(
            out_features,
            in_features,
            weight_format,
            input_format,
            per_channel=per_channel,
            has_bias=bias,
            bias_dtype=bias_dtype,
            device=device,
        )

    @classmethod
    def empty_like(
        cls, module: nn.Linear, weight_format: Format | str, input_format: Format | str | None, **kw: Any
    ) -> QLinear:
        """An un-filled QLinear with ``module``'s geometry, on ``module``'s device."""
        return cls(
            module.in_features,
            module.out_features,
            weight_format,
            input_format,
            bias=module.bias is not None,
            bias_dtype=module.bias.dtype if module.bias is not None else torch.float32,
            device=module.weight.device,
            **kw,
        )

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device: torch.device | str | None = "meta") -> QLinear:
        """Rebuild an empty layer from :meth:`layer_spec` output."""
        return cls(
            spec["in_features"],
            spec["out_features"],
            spec["weight_format"],
            spec["input_format"],
            bias=spec["bias"],
            per_channel=spec["per_channel"],
            bias_dtype=getattr(torch, spec["bias_dtype"]) if spec["bias"] else torch.float32,
            device=device,
        )

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def _geometry(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features}

    def _geometry_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
