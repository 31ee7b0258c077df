"""fpq as a ComfyUI node pack: ComfyUI imports this file when the repository sits in ``ComfyUI/custom_nodes/``.

The nodes are registered only inside ComfyUI (the import guard keeps this folder importable anywhere else).
"""

import importlib.util
import logging
import os
import sys

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

try:
    # Both only importable inside a running ComfyUI: a folder named "comfy" next to a clone (sys.path holds the
    # clone's parent while pytest imports this package) must not register the nodes.
    import comfy.utils  # noqa: F401
    import folder_paths  # noqa: F401
except ImportError:
    pass
else:
    if importlib.util.find_spec("fpq_plugin") is None:
        # A plain clone (no `pip install`): the fpq_plugin package sits next to this file. Appended, not
        # prepended, so nothing here shadows ComfyUI's own top-level modules.
        sys.path.append(os.path.dirname(os.path.abspath(__file__)))
        logging.getLogger("fpq").info("fpq: using the fpq_plugin package of %s", os.path.dirname(__file__))
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
