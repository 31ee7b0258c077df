"""Content fingerprints of float UNet weights: the model half of quantization cache keys.

A fingerprint answers "are these the same float weights?" fast enough to run every time a front door (the
diffusers ``FPQuantPipeline``, the ComfyUI node) is handed a model, before it looks in :mod:`fpq_plugin.cache`.
It is a ``"sha256:<64 hex>"`` string, computed in two levels:

1. Each floating-point tensor gets its own sha256 over a length-unambiguous JSON record
   ``[name, dtype, shape, nbytes]`` followed by its raw bytes in row-major order: every byte in ``"full"`` mode;
   in ``"sampled"`` mode (the default) every byte of tensors up to :data:`SMALL_TENSOR_BYTES` (512 KiB), and of
   larger tensors :data:`SAMPLE_CHUNKS` (33) probes of :data:`SAMPLE_CHUNK_BYTES` (4 KiB, one page): 32 at a
   fixed stride from byte 0 (so one near the middle) and one ending at the last byte.
2. The fingerprint is the sha256 of a scheme tag (version, mode, sampling constants) followed by the per-tensor
   digests in sorted name order.

Properties:

* **Order, layout and device independent.** Names are sorted, and a tensor's bytes are its logical
  (row-major, little-endian) bytes, the same on CPU, CUDA and MPS and for any strides. Off-CPU tensors gather
  their probes on the device, so only the hashed bytes cross to the host (106 MiB for SDXL in sampled mode).
  Checked on an H100 machine: identical fingerprints for the SDXL-shaped set on CPU and GPU, in both modes.
* **Weights only.** Non-floating tensors (integer position ids, step counters, quantized codes) are ignored, so
  such buffers being present or not changes nothing; :func:`fingerprint_module` hashes parameters only.
  Names are hashed, so the same weights under another naming scheme (ComfyUI's original-SD keys vs diffusers
  keys) give another fingerprint; each front door is consistent with itself, and a cache entry made under one
  naming could not be loaded into a model with the other anyway.
* **dtype matters.** fp16 and bf16 copies of one model have different fingerprints (their quantizations differ
  in the last bits too).
* **Parallel full mode.** Per-tensor digests of full mode run on a thread pool (hashlib releases the GIL on large
  buffers). Sampled mode is one thread: its cost is Python overhead per probe, which threads do not reduce.

Why sampled mode is robust to the changes that matter: a fine-tune (full, or a LoRA/LyCORIS merged into the
weights), a checkpoint merge (weighted sum, add-difference) or a precision round trip changes essentially every
element of every tensor it touches (a LoRA delta ``B @ A`` is dense in the weight it modifies). Every tensor's
name, dtype and shape always count; every small tensor (norms, biases, ``conv_in``/``conv_out``: 891 of SDXL's
1680 tensors) is hashed completely; every large one is probed at 33 places spread from its first byte to its
last. Such an edit therefore lands in the hashed bytes of each tensor it touches with near certainty.

What sampled mode can miss: a change confined to the unprobed bytes of a tensor larger than 512 KiB (74% to
99.8% of such a tensor's bytes), e.g. a single edited element, a few edited or permuted rows or output channels of a
large weight, or an edit crafted to avoid the (public) probe offsets. Use ``mode="full"`` where that matters.
Neither mode defends against a malicious party: fingerprints are cache identities, and each cached checkpoint
carries its own full sha256 (``tensors_sha256``), checked on every load.

Measured (``python -m fpq_plugin.fingerprint --benchmark sdxl --with-load --repeat 5 --json
benchmarks/results/fingerprint_cpu.json``; random fp16 tensors with the 1680 real SDXL UNet shapes, 2.57 G
params, 4.78 GiB; best of 5) on this project's 2-core CI machine (AMD EPYC with SHA-NI), which was shared with
other jobs (load average 4.5):

=======================================================  =======  ================================
method                                                   seconds  range over three runs (seconds)
=======================================================  =======  ================================
plain sha256 over all bytes, one stream                  3.76     3.57 - 5.17
plain blake2b over all bytes, one stream                 9.28     6.47 - 9.87
``mode="full"``, 1 thread                                5.31     3.38 - 5.31
``mode="full"``, 2 threads (the default here)            5.05     3.51 - 5.45
``mode="sampled"`` (the default; 1 thread), 106 MiB      0.18     0.18 - 0.20
for scale: ``safetensors.torch.load_file`` of the same   5.57     2.53 - 6.53
4.78 GiB file from the page cache, plus one copy of
each tensor (what loading into a model costs at least)
=======================================================  =======  ================================

On a 16-core H100 host (once): sampled 0.13 s from CPU memory and 0.17 s from GPU memory; full 0.63 s
(8 threads) from CPU memory and 0.87 s from GPU memory.

So the sampled default costs 3-7% of even a warm-cache load, while full mode costs as much as the load itself on
two busy cores (much less with more cores). blake2b is slower than sha256 here because OpenSSL's sha256 uses the
CPU's SHA instructions (SHA-NI; most x86-64 CPUs since about 2017-2019, ARMv8 crypto extensions).

Example:
    >>> from fpq_plugin.fingerprint import fingerprint_module
    >>> fingerprint_module(pipe.unet)                       # doctest: +SKIP
    'sha256:4f0c...'
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "SAMPLE_CHUNKS",
    "SAMPLE_CHUNK_BYTES",
    "SMALL_TENSOR_BYTES",
    "fingerprint_module",
    "fingerprint_state_dict",
]

MODES = ("full", "sampled")
SCHEME_VERSION = 1
"""Bumped whenever the definition changes (it is part of every fingerprint, so old cache entries just miss)."""
SAMPLE_CHUNK_BYTES = 4096
"""Bytes per probe in sampled mode (one page)."""
SAMPLE_CHUNKS = 33
"""Probes per large tensor in sampled mode: at ``i * ((nbytes - chunk) // 32)`` for ``i = 0..31``, and the last
``chunk`` bytes."""
SMALL_TENSOR_BYTES = 512 * 1024
"""Sampled mode hashes every byte of tensors up to this size (512 KiB)."""


def _sample_offsets(nbytes: int) -> list[int]:
    """Start offsets of the probes of a tensor of ``nbytes`` bytes (sampled mode, large tensors only).

    ``SAMPLE_CHUNKS - 1`` probes at a fixed stride from byte 0, plus one ending at the last byte.
    """
    step = (nbytes - SAMPLE_CHUNK_BYTES) // (SAMPLE_CHUNKS - 1)
    return [i * step for i in range(SAMPLE_CHUNKS - 1)] + [nbytes - SAMPLE_CHUNK_BYTES]


def _gather_probes(u8: torch.Tensor) -> torch.Tensor:
    """The probes of a flat uint8 tensor, concatenated on its device (two copy kernels, no Python loop)."""
    nbytes = u8.numel()
    step = (nbytes - SAMPLE_CHUNK_BYTES) // (SAMPLE_CHUNKS - 1)
    strided = u8.as_strided((SAMPLE_CHUNKS - 1, SAMPLE_CHUNK_BYTES), (step, 1))  # step > chunk: no overlap
    return torch.cat([strided.reshape(-1), u8[nbytes - SAMPLE_CHUNK_BYTES :]])


def _hashed_bytes(t: torch.Tensor, mode: str) -> list[memoryview]:
    """The buffers to hash for one tensor, on the CPU, in order.

    Their concatenation is the same for the same values on any device and in any memory layout. CPU tensors are
    read in place (memoryview slices; no torch kernels, which stall on a busy machine); off-CPU tensors gather
    the probes on their device so that only those cross to the host.
    """
    # .data, not .detach(): a Parameter made under torch.inference_mode and later moved outside it (ComfyUI's models)
    # has no version counter, and a view of its detached alias fails; .data is a fresh alias with its own counter.
    flat = t.data.reshape(-1)  # copies only if t is not contiguous
    if flat.numel() == 0:
        return []
    u8 = flat.view(torch.uint8)
    nbytes = u8.numel()
    sample = mode == "sampled" and nbytes > SMALL_TENSOR_BYTES
    if u8.device.type != "cpu":
        return [memoryview((_gather_probes(u8) if sample else u8).cpu().numpy())]
    view = memoryview(u8.numpy())
    if not sample:
        return [view]
    return [view[off : off + SAMPLE_CHUNK_BYTES] for off in _sample_offsets(nbytes)]


def _tensor_digest(name: str, t: torch.Tensor, mode: str) -> bytes:
    if t.is_meta:
        raise ValueError(f"tensor {name!r} is on the meta device (it has no data); fingerprint the real weights")
    record = json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape), t.numel() * t.element_size()])
    h = hashlib.sha256(record.encode("utf-8"))
    for piece in _hashed_bytes(t, mode):
        h.update(piece)
    return h.digest()


def _default_workers(mode: str) -> int:
    # Sampled mode is bound by Python overhead per probe (small hashlib updates), which threads do not speed up.
    return max(1, min(8, os.cpu_count() or 1)) if mode == "full" else 1


def fingerprint_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    mode: str = "sampled",
    workers: int | None = None,
) -> str:
    """Content hash of the floating-point tensors of a state dict.

    Args:
        state_dict: Tensor name -> tensor, on any device(s) and in any order. Non-floating tensors are ignored.
        mode: ``"sampled"`` (default; fast: every byte of tensors up to 512 KiB, 33 evenly spread 4 KiB probes
            of each larger one) or ``"full"`` (every byte). The two modes give different fingerprints for the
            same weights. See the module docstring for what sampled mode can miss.
        workers: Threads hashing tensors in parallel; default ``min(8, cpu_count)`` in full mode and 1 in sampled
            mode. Does not change the result.

    Returns:
        ``"sha256:<64 lowercase hex>"``.

    Raises:
        ValueError: Unknown ``mode``, no floating-point tensor at all, or a tensor on the meta device.
    """
    if mode not in MODES:
        raise ValueError(f"fingerprint mode must be one of {MODES}, got {mode!r}")
    names = sorted(n for n, t in state_dict.items() if torch.is_tensor(t) and t.is_floating_point())
    if not names:
        raise ValueError(
            "the state dict holds no floating-point tensors; fingerprint the float model before quantizing it"
        )
    workers = _default_workers(mode) if workers is None else max(1, int(workers))
    start = time.perf_counter()
    if workers == 1 or len(names) == 1:
        digests = [_tensor_digest(n, state_dict[n], mode) for n in names]
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fpq-fingerprint") as pool:
            digests = list(pool.map(lambda n: _tensor_digest(n, state_dict[n], mode), names))
    scheme = f"fpq.fingerprint/v{SCHEME_VERSION}/{mode}"
    if mode == "sampled":
        scheme += f"/{SAMPLE_CHUNKS}x{SAMPLE_CHUNK_BYTES}/small{SMALL_TENSOR_BYTES}"
    h = hashlib.sha256(scheme.encode("ascii") + b"\n")
    for d in digests:
        h.update(d)
    elapsed = time.perf_counter() - start
    logger.debug("fingerprint (%s) of %d tensors in %.3f s with %d thread(s)", mode, len(names), elapsed, workers)
    return "sha256:" + h.hexdigest()


def fingerprint_module(module: nn.Module, *, mode: str = "sampled", workers: int | None = None) -> str:
    """Fingerprint of a module's floating-point parameters (buffers are left out).

    Tied parameters count under every name they have, as in ``module.state_dict()``, so for a module without
    floating buffers (diffusers UNets have none) this equals ``fingerprint_state_dict(module.state_dict())`` and
    the fingerprint of the state dict in its weights file.

    Args:
        module: The float model.
        mode: ``"sampled"`` or ``"full"``; see :func:`fingerprint_state_dict`.
        workers: Hashing threads; see :func:`fingerprint_state_dict`.

    Returns:
        ``"sha256:<64 lowercase hex>"``.
    """
    params = dict(module.named_parameters(remove_duplicate=False))
    return fingerprint_state_dict(params, mode=mode, workers=workers)


# ---- benchmark ----------------------------------------------------------------------------------------------------


def _random_state_dict(config: str, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with the real shapes of a named UNet config (built on the meta device, then filled)."""
    from fpq_plugin.models.unet_configs import build_unet

    shapes = {n: tuple(t.shape) for n, t in build_unet(config, meta=True).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=dtype)
        t.view(torch.uint8).random_(0, 256, generator=gen)  # raw bit patterns: the hash does not care about values
        out[name] = t
    return out


def _best_of(fn: Any, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _plain_stream(state_dict: Mapping[str, torch.Tensor], algo: str) -> str:
    h = hashlib.new(algo)
    for name in sorted(state_dict):
        h.update(memoryview(state_dict[name].reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def benchmark(config: str = "sdxl", *, repeat: int = 3, with_load: bool = False) -> dict[str, Any]:
    """Time the fingerprint options on random fp16 tensors of a UNet config's real shapes (CPU).

    Args:
        config: A name known to :func:`fpq_plugin.models.unet_configs.unet_config`.
        repeat: Timings are the best of this many runs.
        with_load: Also save the tensors to a temporary safetensors file and time ``load_file`` (for scale).

    Returns:
        A JSON-able dict of the setup and the timings in seconds.
    """
    import platform
    import tempfile

    sd = _random_state_dict(config, torch.float16)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    result: dict[str, Any] = {
        "config": config,
        "dtype": "float16",
        "tensors": len(sd),
        "params": sum(t.numel() for t in sd.values()),
        "bytes": total,
        "sampled_bytes_hashed": sum(
            n if n <= SMALL_TENSOR_BYTES else SAMPLE_CHUNKS * SAMPLE_CHUNK_BYTES
            for n in (t.numel() * t.element_size() for t in sd.values())
        ),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "default_workers_full": _default_workers("full"),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "repeat": repeat,
        "seconds": {},
    }
    if with_load:
        # For scale: loading the same tensors from a safetensors file already in the page cache (the best case of a
        # real load). load_file maps the file lazily; a model load then copies every byte into the parameters,
        # which the "materialised" timing includes (load_file + a copy of each tensor).
        from safetensors.torch import load_file, save_file

        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "unet.safetensors")
            save_file(sd, path)
            del sd
            sd = {}
            for _ in range(repeat):
                start = time.perf_counter()
                lazy = load_file(path)
                lazy_s = time.perf_counter() - start
                sd = {}  # free the previous copy first
                sd = {k: v.clone() for k, v in lazy.items()}
                full_s = time.perf_counter() - start
                del lazy
                result["seconds"]["safetensors_load_file_lazy_page_cache"] = min(
                    lazy_s, result["seconds"].get("safetensors_load_file_lazy_page_cache", float("inf"))
                )
                result["seconds"]["safetensors_load_file_materialised_page_cache"] = min(
                    full_s, result["seconds"].get("safetensors_load_file_materialised_page_cache", float("inf"))
                )
    timings = result["seconds"]
    timings["plain_sha256_one_stream"] = _best_of(lambda: _plain_stream(sd, "sha256"), repeat)
    timings["plain_blake2b_one_stream"] = _best_of(lambda: _plain_stream(sd, "blake2b"), repeat)
    for mode in ("full", "sampled"):
        for workers in sorted({1, _default_workers("full")}):
            timings[f"{mode}_{workers}_threads"] = _best_of(
                lambda m=mode, w=workers: fingerprint_state_dict(sd, mode=m, workers=w), repeat
            )
    return result


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m fpq_plugin.fingerprint", description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", metavar="CONFIG", default="sdxl", help="UNet config whose shapes to use")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--with-load", action="store_true", help="also time safetensors load_file for scale")
    parser.add_argument("--json", metavar="PATH", help="write the result here (default: stdout)")
    args = parser.parse_args(argv)
    result = benchmark(args.benchmark, repeat=args.repeat, with_load=args.with_load)
    result["command"] = "python -m fpq_plugin.fingerprint " + " ".join(argv if argv is not None else sys.argv[1:])
    text = json.dumps(result, indent=2) + "\n"
    if args.json:
        from pathlib import Path

        from fpq_plugin.io import atomic_write_bytes

        atomic_write_bytes(args.json, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
