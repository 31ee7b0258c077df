"""Which transformer-block LayerNorms write their consumer's FP8 cast, and why the others do not (GPU).

Built for the open failure of ``tests/nn/test_fused_layer_norm.py::test_on_the_gpu_the_norm_writes_the_consumers_
cast_with_agreeing_results`` (H100, 2026-12-07: 8 casts written where the tiny UNet's 4 blocks x 3 norms expect 12;
the CPU logic with the fp8 backend forced finds all 12). Prints, for each norm call of one W8A8 forward: the consumer
path, the input shape, whether a cast was asked for, and the consumer's backend and kernel state.

    PYTHONPATH=tests:tests/nn python benchmarks/diagnose_layer_norm_casts.py
"""

from __future__ import annotations

import torch
from helpers import inputs_to
from test_fused_layer_norm import _w8a8_unet

from fpq_plugin.kernels import backend as kb
from fpq_plugin.nn import fused_layer_norm as fln


def main() -> None:
    unet, inputs = _w8a8_unet()
    unet = unet.to("cuda", torch.bfloat16)
    inputs = inputs_to(inputs, "cuda", torch.bfloat16)
    seen = []
    asked = fln._consumer_cast

    def spy(norm, x):
        st = asked(norm, x)
        link = norm.__dict__.get(fln._LINK)
        consumer = link.consumer() if link is not None else None
        state = kb._state(consumer) if consumer is not None and hasattr(consumer, "weight_codes") else None
        seen.append((link.path if link else None, tuple(x.shape), x.is_contiguous(), st is not None,
                     getattr(consumer, "_fpq_auto_backend", None),
                     None if state is None else (state.k, state.n, state.xs_value, sorted(state.cublas_bad))))
        return st

    fln._consumer_cast = spy
    try:
        with torch.no_grad():
            unet(**inputs)  # the first call resolves each layer's backend
            seen.clear()
            unet(**inputs)
    finally:
        fln._consumer_cast = asked
    print(f"{len(seen)} norm calls reached the cast question (fewer than 12: the others ran PyTorch's LayerNorm)")
    for row in seen:
        print(*row)


if __name__ == "__main__":
    main()
