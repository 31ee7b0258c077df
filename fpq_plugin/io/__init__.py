"""Checkpoint I/O: one versioned safetensors format with a JSON header."""

from fpq_plugin.io.checkpoint import atomic_write_bytes, load_quantized, read_header, save_quantized
from fpq_plugin.io.digest import tensor_digest
from fpq_plugin.io.header import FORMAT_VERSION, CheckpointHeader, parse_header

__all__ = [
    "FORMAT_VERSION",
    "CheckpointHeader",
    "atomic_write_bytes",
    "load_quantized",
    "parse_header",
    "read_header",
    "save_quantized",
    "tensor_digest",
]
