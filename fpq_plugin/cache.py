"""The quantization cache: one verified fpq checkpoint per (model, recipe, calibration) combination.

Quantizing a UNet with activation calibration takes minutes; loading the result takes seconds. The front doors
(the diffusers ``FPQuantPipeline``, the ComfyUI node) therefore keep every quantized model they build in a cache
folder, under a key that says exactly what went into it::

    from fpq_plugin.cache import QuantCache, cache_key
    from fpq_plugin.fingerprint import fingerprint_module

    fp = fingerprint_module(unet)
    key = cache_key(fp, recipe, prompt_set_id(prompts), method_version="calib-1", extra={"steps": 10})
    cache = QuantCache()                                  # FPQ_CACHE_DIR, else ~/.cache/fpq
    unet, header, hit = cache.get_or_build(
        key, lambda: quantize_and_return(unet), unet, recipe=recipe, model_fingerprint=fp
    )

Guarantees:

* **Never a bad entry.** Every hit is a full :func:`fpq_plugin.io.load_quantized` with the tensor sha256
  checked, plus checks that the entry was stored under this key and made from the expected float weights.
  A truncated, bit-flipped, foreign (not fpq), stale-version or mismatched file is logged as a warning naming the
  file and the reason, deleted, and reported as a miss, so the caller rebuilds it.
* **A failed load leaves the caller's model untouched.** When a ``model`` is given, the entry is loaded into a
  meta-device copy of it first (no weight memory) and moved into ``model`` only once everything checked out,
  so a rebuild after a bad entry starts from the original float model.
* **No partial files.** Entries are written by :func:`fpq_plugin.io.save_quantized` (temp file, fsync, atomic
  rename). Temp files left by a killed process are removed once they are a day old.
* **One build per key.** :meth:`QuantCache.get_or_build` holds an inter-process lock on the key (``<key>.lock``
  next to the entry; ``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows) while it builds, and looks in the
  cache again once it holds the lock, so the second process of a race uses the first one's result. Locks die
  with their process; the small lock files themselves are left in place (deleting a lock file another process
  is waiting on would let two processes build at once).

The cache folder is, in order: the explicit argument (ComfyUI passes its own models folder), the environment
variable ``FPQ_CACHE_DIR``, or the user cache folder (``$XDG_CACHE_HOME/fpq`` or ``~/.cache/fpq``; on Windows
``%LOCALAPPDATA%\\fpq\\cache``).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fpq_plugin.errors import CheckpointError
from fpq_plugin.io import FORMAT_VERSION, CheckpointHeader, load_quantized, read_header, save_quantized
from fpq_plugin.recipes import Recipe, get_recipe

logger = logging.getLogger(__name__)

__all__ = [
    "ENV_VAR",
    "CacheEntry",
    "CacheLockTimeout",
    "QuantCache",
    "cache_dir",
    "cache_key",
]

ENV_VAR = "FPQ_CACHE_DIR"
ENTRY_SUFFIX = ".fpq.safetensors"
LOCK_SUFFIX = ".lock"
BAD_SUFFIX = ".bad"
KEY_HEX_CHARS = 24
"""Length of the keys :func:`cache_key` makes (96 bits)."""
CACHE_KEY_FIELD = "fpq_cache_key"
"""Field of the checkpoint header's ``extra`` in which :meth:`QuantCache.put` records the entry's key."""
STALE_TMP_SECONDS = 24 * 3600
DEFAULT_LOCK_TIMEOUT = 3600.0
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


class CacheLockTimeout(CheckpointError, TimeoutError):
    """Waiting for another process to finish building a cache entry took longer than the lock timeout."""


# ---- where, and under which name --------------------------------------------------------------------------------


def cache_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder (not created here).

    Args:
        explicit: A folder chosen by the caller; wins over everything else. ``None`` or ``""`` means "not given".

    Returns:
        ``explicit``, else ``$FPQ_CACHE_DIR``, else ``%LOCALAPPDATA%\\fpq\\cache`` on Windows and
        ``$XDG_CACHE_HOME/fpq`` (``~/.cache/fpq`` when unset or relative) elsewhere; ``~`` is expanded.
    """
    if explicit is not None and os.fspath(explicit) != "":
        return Path(os.path.expanduser(os.fspath(explicit)))
    env = os.environ.get(ENV_VAR, "")
    if env:
        return Path(os.path.expanduser(env))
    if os.name == "nt":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Local")
        return Path(base) / "fpq" / "cache"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path(os.path.expanduser("~")) / ".cache"
    return base / "fpq"


def cache_key(
    model_fingerprint: str,
    recipe: Recipe | str | dict[str, Any],
    prompt_set: str | None,
    *,
    method_version: str,
    extra: dict[str, Any] | None = None,
) -> str:
    """A short, stable key for one quantization of one float model.

    The key is the sha256 of a canonical JSON (sorted keys, no whitespace, ASCII) of every input that changes the
    result: the float model's fingerprint, the full recipe (``Recipe.to_dict()``), the calibration prompt set id,
    the checkpoint format version, the calibration method's version and any extra settings (steps, resolution,
    guidance, seeds...). Changing any of them gives a new key, so stale entries are simply never found.

    Args:
        model_fingerprint: :func:`fpq_plugin.fingerprint.fingerprint_module` of the float model.
        recipe: A Recipe, preset name, dict or YAML path (resolved with :func:`fpq_plugin.recipes.get_recipe`).
        prompt_set: :func:`fpq_plugin.prompts.prompt_set_id` of the calibration prompts, or ``None`` for
            weight-only recipes that calibrate nothing.
        method_version: Version string of the calibration/search code that builds the entry; bump it when that
            code changes its results.
        extra: Other JSON-able settings that change the result.

    Returns:
        The first :data:`KEY_HEX_CHARS` (24) lowercase hex digits of the sha256.

    Raises:
        ValueError: A part is not a string where one is required, or ``extra`` is not JSON-serialisable.
        RecipeError: ``recipe`` does not resolve.
    """
    if not isinstance(model_fingerprint, str) or not model_fingerprint:
        raise ValueError(f"model_fingerprint must be a non-empty string, got {model_fingerprint!r}")
    if prompt_set is not None and not isinstance(prompt_set, str):
        raise ValueError(f"prompt_set must be a prompt_set_id string or None, got {type(prompt_set).__name__}")
    if not isinstance(method_version, str) or not method_version:
        raise ValueError(f"method_version must be a non-empty string, got {method_version!r}")
    payload = {
        "schema": "fpq.cache-key/1",
        "model_fingerprint": model_fingerprint,
        "recipe": get_recipe(recipe).to_dict(),
        "prompt_set": prompt_set,
        "checkpoint_format_version": FORMAT_VERSION,
        "method_version": method_version,
        "extra": extra or {},
    }
    try:
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cache key parts must be JSON-serialisable (check `extra`): {e}") from None
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:KEY_HEX_CHARS]


# ---- inter-process lock -------------------------------------------------------------------------------------------


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without blocking; False if another holder has it."""
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # lock byte 0 (may lie beyond the end of the file)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EDEADLK, errno.EAGAIN):
                return False
            raise
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _unlock(fd: int) -> None:
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


def _lock_holder(path: Path) -> str:
    """The pid the lock file names, for error messages (best effort)."""
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float | None) -> Iterator[None]:
    """Hold an exclusive inter-process lock on ``path`` (created if missing) for the ``with`` body.

    Raises:
        CacheLockTimeout: Another process held it for longer than ``timeout`` seconds.
        CheckpointError: The lock file cannot be created.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise CheckpointError(_unwritable_message(path.parent, e)) from None
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        waited = False
        while not _try_lock(fd):
            if not waited:
                logger.info("fpq cache: waiting for %s (another process is building this entry)", path)
                waited = True
            if deadline is not None and time.monotonic() >= deadline:
                raise CacheLockTimeout(
                    f"timed out after {timeout:g} s waiting for the fpq cache lock {path}: another process "
                    f"(pid {_lock_holder(path)}) is still building this entry. Wait for it and try again, give a "
                    "longer lock_timeout, or, if no other fpq process is running, delete the lock file"
                )
            remaining = float("inf") if deadline is None else max(0.0, deadline - time.monotonic())
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.5)
        try:
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            except OSError:
                pass  # the pid is only for messages
            yield
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


# ---- loading into a caller's model without touching it on failure ------------------------------------------------


def _meta_clone(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` costing no tensor memory.

    Tensors of the state dict (what a checkpoint holds) become empty meta tensors; other tensors (non-persistent
    buffers such as precomputed position tables) are shared with ``model``, as a checkpoint cannot restore them.
    """
    in_state = {id(t) for t in model.state_dict(keep_vars=True).values()}
    memo: dict[int, Any] = {}
    for t in (*model.parameters(), *model.buffers()):
        if id(t) in memo:
            continue
        if id(t) not in in_state:
            memo[id(t)] = t
            continue
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _adopt(model: nn.Module, loaded: nn.Module, header: CheckpointHeader) -> None:
    """Move a fully loaded meta clone's quantized layers and tensors into the original ``model``."""
    from fpq_plugin.api import set_submodule

    for name in header.layers:
        set_submodule(model, name, loaded.get_submodule(name))
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.eval()


def _load_entry(
    path: Path, model: nn.Module | None, device: str | torch.device
) -> tuple[nn.Module, CheckpointHeader]:
    if model is None:
        return load_quantized(path, device=device)
    try:
        staging = _meta_clone(model)
    except Exception as e:  # an exotic module that cannot be deep-copied: load in place, as load_quantized does
        logger.debug("fpq cache: cannot make a meta copy of %s (%s); loading in place", type(model).__name__, e)
        return load_quantized(path, model, device=device)
    staging, header = load_quantized(path, staging, device=device)
    _adopt(model, staging, header)
    return model, header


# ---- the cache ----------------------------------------------------------------------------------------------------


def _unwritable_message(folder: Path, e: OSError) -> str:
    reason = e.strerror or str(e)
    return (
        f"the fpq cache folder {folder} cannot be created or written ({reason}); choose another folder with the "
        f"{ENV_VAR} environment variable (e.g. {ENV_VAR}=/path/with/space) or pass one explicitly "
        "(QuantCache(root=...))"
    )


@dataclass(frozen=True)
class CacheEntry:
    """One file in the cache, as read from its header (tensors are not loaded).

    Attributes:
        key: The entry's key (its file stem).
        path: The checkpoint file.
        size: File size in bytes.
        recipe: The recipe's name, or None when the header is unreadable.
        fingerprint: The float model's fingerprint recorded in the header.
        created: When the file was written (seconds since the epoch; its modification time).
        fpq_version: The fpq version that wrote it.
        error: Why the entry is unusable (then the other header fields are None), else None.
    """

    key: str
    path: Path
    size: int
    recipe: str | None
    fingerprint: str | None
    created: float
    fpq_version: str | None = None
    error: str | None = None


class QuantCache:
    """A folder of quantized checkpoints keyed by :func:`cache_key`.

    Args:
        root: The folder; see :func:`cache_dir` for the default. Created if missing.
        lock_timeout: Seconds :meth:`get_or_build` waits for another process building the same key (``None``:
            no limit). Quantizing SDXL with calibration can take many minutes, hence the generous default.

    Raises:
        CheckpointError: The folder cannot be created or written; the message names it and says how to choose
            another (``FPQ_CACHE_DIR``).
    """

    def __init__(
        self, root: str | os.PathLike[str] | None = None, *, lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT
    ) -> None:
        self.root = cache_dir(root)
        self.lock_timeout = lock_timeout
        self._check_writable()

    def __repr__(self) -> str:
        return f"QuantCache({str(self.root)!r})"

    def _check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=self.root)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise CheckpointError(_unwritable_message(self.root, e)) from None

    # ---- paths ------------------------------------------------------------------------------------------------------
    def path_for(self, key: str) -> Path:
        """The checkpoint file of ``key`` (``<root>/<key>.fpq.safetensors``).

        Raises:
            ValueError: ``key`` is not 1-128 letters, digits, ``_`` or ``-`` (starting with a letter or digit).
        """
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(
                f"invalid fpq cache key {key!r}: use 1-128 letters, digits, '_' or '-' (cache_key() makes one)"
            )
        return self.root / f"{key}{ENTRY_SUFFIX}"

    def _lock_path(self, key: str) -> Path:
        return self.path_for(key).with_name(f"{key}{LOCK_SUFFIX}")

    # ---- read -------------------------------------------------------------------------------------------------------
    def get(
        self,
        key: str,
        model: nn.Module | None = None,
        *,
        expected_fingerprint: str | None = None,
        device: str | torch.device = "cpu",
    ) -> tuple[nn.Module, CheckpointHeader] | None:
        """Load the entry of ``key`` if there is a good one.

        Args:
            key: The entry's key.
            model: The float model (or a meta skeleton) to load into, as for :func:`fpq_plugin.load_quantized`;
                ``None`` rebuilds the diffusers UNet the header describes. ``model`` is changed only on a hit.
            expected_fingerprint: When given, an entry made from other float weights is treated as bad.
            device: Where the loaded tensors go.

        Returns:
            ``(model, header)`` on a hit, ``None`` on a miss. An unusable entry (any ``CheckpointError``:
            truncated, corrupt, tampered, foreign, unknown version, not fitting the model; or stored under
            another key, or made from other weights) is logged as a warning, deleted and reported as a miss.
        """
        path = self.path_for(key)
        try:
            before = os.stat(path)
        except FileNotFoundError:
            logger.debug("fpq cache: miss for %s", key)
            return None
        try:
            header = read_header(path)
            problem = self._header_problem(key, header, expected_fingerprint)
            if problem:
                raise CheckpointError(f"{path}: {problem}")
            loaded, header = _load_entry(path, model, device)
        except CheckpointError as e:
            self._discard(path, before, str(e))
            return None
        logger.info("fpq cache: hit %s (%s)", path, header.recipe.name)
        return loaded, header

    @staticmethod
    def _header_problem(key: str, header: CheckpointHeader, expected_fingerprint: str | None) -> str | None:
        stored_key = header.extra.get(CACHE_KEY_FIELD)
        if stored_key != key:
            return (
                f"the entry was stored under key {stored_key!r}, not {key!r} (renamed or copied in by hand?)"
                if stored_key is not None
                else "the file was not written by the fpq cache (its header has no cache key)"
            )
        if expected_fingerprint is not None and header.model_fingerprint != expected_fingerprint:
            return (
                f"the entry was made from float weights {header.model_fingerprint!r}, "
                f"not the expected {expected_fingerprint!r}"
            )
        return None

    def _discard(self, path: Path, before: os.stat_result, reason: str) -> None:
        """Delete a bad entry (or move it aside when it cannot be deleted), unless it was replaced meanwhile."""
        prefix = f"{path}: "
        reason = reason[len(prefix) :] if reason.startswith(prefix) else reason
        logger.warning("fpq cache: entry %s is unusable and will be rebuilt: %s", path, reason)
        try:
            now = os.stat(path)
            if (now.st_ino, now.st_size, now.st_mtime_ns) != (before.st_ino, before.st_size, before.st_mtime_ns):
                logger.info("fpq cache: %s was replaced by another process meanwhile; keeping the new file", path)
                return
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as e:  # e.g. Windows, while another process has the file open
            try:
                os.replace(path, path.with_name(path.name + BAD_SUFFIX))
            except OSError:
                logger.warning("fpq cache: could not delete the bad entry %s (%s); delete it by hand", path, e)

    # ---- write ------------------------------------------------------------------------------------------------------
    def put(
        self,
        key: str,
        model: nn.Module,
        *,
        recipe: Recipe | str | dict[str, Any],
        model_fingerprint: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Store a quantized model under ``key`` (atomically; a reader sees the old file or the new one).

        Args:
            key: The entry's key.
            model: The quantized model (after :func:`fpq_plugin.quantize_`).
            recipe: The recipe it was quantized with.
            model_fingerprint: Fingerprint of the float model it came from (checked by ``get``).
            extra: JSON-able information stored in the header (the key is added as ``fpq_cache_key``).

        Returns:
            The entry's path.

        Raises:
            CheckpointError: The model has no quantized layers, or the folder cannot be written (the message
                names it and says how to choose another).
        """
        return self._store(key, model, recipe=recipe, model_fingerprint=model_fingerprint, extra=extra)[0]

    def _store(
        self,
        key: str,
        model: nn.Module,
        *,
        recipe: Recipe | str | dict[str, Any],
        model_fingerprint: str | None,
        extra: dict[str, Any] | None,
    ) -> tuple[Path, CheckpointHeader]:
        path = self.path_for(key)
        extra = {**(extra or {}), CACHE_KEY_FIELD: key}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            header = save_quantized(model, path, recipe=recipe, model_fingerprint=model_fingerprint, extra=extra)
        except CheckpointError:
            raise
        except OSError as e:
            raise CheckpointError(_unwritable_message(self.root, e)) from None
        logger.info("fpq cache: stored %s (%.1f MiB)", path, path.stat().st_size / 2**20)
        return path, header

    @contextlib.contextmanager
    def lock(self, key: str, timeout: float | None = None) -> Iterator[None]:
        """Hold the inter-process lock of ``key`` (``<root>/<key>.lock``).

        Args:
            key: The entry's key.
            timeout: Seconds to wait; default ``self.lock_timeout``.

        Raises:
            CacheLockTimeout: Another process held it longer than ``timeout``.
        """
        with _file_lock(self._lock_path(key), self.lock_timeout if timeout is None else timeout):
            yield

    def get_or_build(
        self,
        key: str,
        build_fn: Callable[[], nn.Module],
        model: nn.Module | None = None,
        *,
        recipe: Recipe | str | dict[str, Any],
        model_fingerprint: str | None = None,
        extra: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
        timeout: float | None = None,
    ) -> tuple[nn.Module, CheckpointHeader, bool]:
        """Load the entry of ``key``, or build and store it, with at most one builder per key at a time.

        Args:
            key: The entry's key (from :func:`cache_key`).
            build_fn: Called with no arguments on a miss; returns the quantized model (typically it calibrates
                and quantizes ``model`` in place and returns it).
            model: The float model to load a hit into (see :meth:`get`); untouched unless there is a hit.
            recipe: The recipe ``build_fn`` uses (stored in the header).
            model_fingerprint: The float model's fingerprint: stored on a build, required to match on a hit.
            extra: JSON-able information stored in the header.
            device: Where a hit's tensors are loaded.
            timeout: Seconds to wait for another process building the same key; default ``self.lock_timeout``.

        Returns:
            ``(model, header, hit)``: ``hit`` is True when the model came from the cache (possibly written by a
            process that built it while this one waited), False when ``build_fn`` ran.

        Raises:
            CacheLockTimeout: Another process kept building longer than ``timeout``.
            CheckpointError: The built model cannot be stored (no quantized layers, folder not writable).
        """
        found = self.get(key, model, expected_fingerprint=model_fingerprint, device=device)
        if found is not None:
            return found[0], found[1], True
        with self.lock(key, timeout):
            found = self.get(key, model, expected_fingerprint=model_fingerprint, device=device)
            if found is not None:
                logger.info("fpq cache: %s was built by another process while this one waited", key)
                return found[0], found[1], True
            logger.info("fpq cache: miss for %s; building it", key)
            built = build_fn()
            if not isinstance(built, nn.Module):
                raise TypeError(f"build_fn must return the quantized model (an nn.Module), got {type(built).__name__}")
            _, header = self._store(key, built, recipe=recipe, model_fingerprint=model_fingerprint, extra=extra)
            return built, header, False

    # ---- housekeeping -----------------------------------------------------------------------------------------------
    def _clean_stale_tmp(self) -> int:
        """Delete temp files (``.*.tmp``) older than a day: left by killed writers. Returns how many."""
        removed = 0
        cutoff = time.time() - STALE_TMP_SECONDS
        for tmp in self.root.glob(".*.tmp"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
                    logger.info("fpq cache: removed stale temp file %s", tmp)
            except OSError:
                continue
        return removed

    def entries(self) -> list[CacheEntry]:
        """Every entry in the folder, read from the headers only (tensors are not loaded or verified).

        Unreadable entries are listed with ``error`` set. Also removes temp files older than a day.

        Returns:
            The entries, sorted by key.
        """
        if not self.root.is_dir():
            return []
        self._clean_stale_tmp()
        out = []
        for path in sorted(self.root.glob(f"*{ENTRY_SUFFIX}")):
            key = path.name[: -len(ENTRY_SUFFIX)]
            try:
                st = path.stat()
            except OSError:
                continue
            try:
                header = read_header(path)
                problem = self._header_problem(key, header, None)
                if problem:
                    raise CheckpointError(problem)
            except CheckpointError as e:
                prefix = f"{path}: "
                error = str(e)[len(prefix) :] if str(e).startswith(prefix) else str(e)
                out.append(CacheEntry(key, path, st.st_size, None, None, st.st_mtime, None, error))
                continue
            out.append(
                CacheEntry(
                    key,
                    path,
                    st.st_size,
                    header.recipe.name,
                    header.model_fingerprint,
                    st.st_mtime,
                    header.fpq_version,
                )
            )
        return out

    def remove(self, key: str) -> bool:
        """Delete the entry of ``key`` (and a set-aside bad copy). Returns whether an entry existed."""
        path = self.path_for(key)
        with contextlib.suppress(FileNotFoundError):
            path.with_name(path.name + BAD_SUFFIX).unlink()
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        logger.info("fpq cache: removed %s", path)
        return True

    def clear(self) -> int:
        """Delete every entry (and set-aside bad copies and temp files older than a day).

        Lock files are kept: they are empty but for a pid, and deleting one that another process waits on would
        let two processes build the same entry.

        Returns:
            The number of entries deleted.
        """
        if not self.root.is_dir():
            return 0
        self._clean_stale_tmp()
        removed = 0
        for path in self.root.glob(f"*{ENTRY_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        for path in self.root.glob(f"*{ENTRY_SUFFIX}{BAD_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        logger.info("fpq cache: cleared %d entries from %s", removed, self.root)
        return removed
