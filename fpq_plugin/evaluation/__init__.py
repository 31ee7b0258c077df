"""Evaluation harness (``fpq eval``): the paper's protocol on fpq's reference models.

- :mod:`~fpq_plugin.evaluation.metrics`: PSNR, SSIM, Fréchet distance.
- :mod:`~fpq_plugin.evaluation.harness`: variants (the paper's table rows and ablations) and :func:`evaluate`.
- :mod:`~fpq_plugin.evaluation.report`: Markdown report, JSON, image grid and bar plots.
"""

from fpq_plugin.evaluation.harness import (
    ABLATION_VARIANTS,
    PAPER_VARIANTS,
    EvalResult,
    EvalSettings,
    Variant,
    evaluate,
)
from fpq_plugin.evaluation.report import markdown_table, write_report

__all__ = [
    "ABLATION_VARIANTS",
    "PAPER_VARIANTS",
    "EvalResult",
    "EvalSettings",
    "Variant",
    "evaluate",
    "markdown_table",
    "write_report",
]
