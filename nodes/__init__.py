"""fpq's ComfyUI nodes (V1 node schema). Node ids are saved in users' workflows: never rename them."""

import logging
import os

import fpq_plugin

from .io_nodes import LoadFPQuantizedUNet, SaveFPQuantizedUNet
from .quantize_node import FPQuantizeUNet

logging.getLogger("fpq").info(
    "fpq: nodes use fpq_plugin from %s", os.path.dirname(os.path.realpath(fpq_plugin.__file__))
)

NODE_CLASS_MAPPINGS = {
    "FPQuantizeUNet": FPQuantizeUNet,
    "FPQLoadQuantizedUNet": LoadFPQuantizedUNet,
    "FPQSaveQuantizedUNet": SaveFPQuantizedUNet,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "FPQuantizeUNet": "FP Quantize UNet",
    "FPQLoadQuantizedUNet": "Load FP Quantized UNet",
    "FPQSaveQuantizedUNet": "Save FP Quantized UNet",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
