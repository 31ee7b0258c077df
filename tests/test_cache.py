"""Quantization cache: keys, hits and misses, every kind of bad entry rebuilt, two processes racing on one key."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fpq_plugin as fpq
from fpq_plugin.cache import CacheLockTimeout, QuantCache, cache_dir, cache_key
from fpq_plugin.errors import CheckpointError
from fpq_plugin.fingerprint import fingerprint_module
from fpq_plugin.io.header import METADATA_KEY
from fpq_plugin.models.unet_configs import build_unet

KEY = "0123456789abcdef01234567"


def _float_unet():
    return build_unet("tiny")


_QUANTIZED: list = []
_FLOAT: list = []


def _float_reference():
    """One float tiny UNet kept for comparisons (build_unet is deterministic)."""
    if not _FLOAT:
        _FLOAT.append(_float_unet())
    return _FLOAT[0]


def _quantized_unet():
    """A w8a16 (weight-only: no calibration) tiny UNet; quantized once per session, then copied (fast)."""
    if not _QUANTIZED:
        model = _float_unet()
        fpq.quantize_(model, "w8a16")
        _QUANTIZED.append(model)
    return copy.deepcopy(_QUANTIZED[0])


@pytest.fixture(scope="module")
def fingerprint() -> str:
    return fingerprint_module(_float_unet())


class Builder:
    """A build_fn standing in for calibrate-and-quantize of a given float model; counts its calls."""

    def __init__(self, model) -> None:
        self.model = model
        self.calls = 0

    def __call__(self):
        self.calls += 1
        # The cache must hand back the float model untouched after a miss or a bad entry.
        assert not fpq.quantized_layers(self.model), "the float model was modified before build_fn ran"
        assert _same_state(self.model, _float_reference()), "the float model's weights were modified"
        return _quantized_unet()  # what fpq.quantize_(self.model, "w8a16") gives, without re-running it


def _build(cache: QuantCache, fingerprint: str, key: str = KEY):
    model = _float_unet()
    builder = Builder(model)
    out = cache.get_or_build(key, builder, model, recipe="w8a16", model_fingerprint=fingerprint)
    return out, builder


def _same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


# ---- keys and folders ---------------------------------------------------------------------------------------------


def test_cache_key_is_stable_and_covers_every_part() -> None:
    fp = "sha256:" + "ab" * 32
    key = cache_key(fp, "w8a8", "p1", method_version="1", extra={"steps": 10, "cfg": 7.5})
    assert len(key) == 24 and all(c in "0123456789abcdef" for c in key)
    assert cache_key(fp, fpq.get_recipe("w8a8"), "p1", method_version="1", extra={"cfg": 7.5, "steps": 10}) == key
    extra = {"steps": 10, "cfg": 7.5}
    variants = [
        cache_key("sha256:" + "cd" * 32, "w8a8", "p1", method_version="1", extra={"steps": 10, "cfg": 7.5}),
        cache_key(fp, "w4a8", "p1", method_version="1", extra={"steps": 10, "cfg": 7.5}),
        cache_key(fp, fpq.get_recipe("w8a8").replace(skip=("conv_in",)), "p1", method_version="1", extra=extra),
        cache_key(fp, "w8a8", "p2", method_version="1", extra={"steps": 10, "cfg": 7.5}),
        cache_key(fp, "w8a8", "p1", method_version="2", extra={"steps": 10, "cfg": 7.5}),
        cache_key(fp, "w8a8", "p1", method_version="1", extra={"steps": 20, "cfg": 7.5}),
    ]
    assert len({key, *variants}) == len(variants) + 1
    with pytest.raises(ValueError, match="JSON"):
        cache_key(fp, "w8a8", "p1", method_version="1", extra={"bad": object()})


def test_cache_dir_precedence(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("FPQ_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if os.name != "nt":
        assert cache_dir() == tmp_path / "xdg" / "fpq"
    monkeypatch.setenv("FPQ_CACHE_DIR", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "explicit") == tmp_path / "explicit"


def test_fpq_cache_dir_env_is_respected(monkeypatch, tmp_path, fingerprint) -> None:
    monkeypatch.setenv("FPQ_CACHE_DIR", str(tmp_path / "from-env"))
    cache = QuantCache()
    assert cache.root == tmp_path / "from-env" and cache.root.is_dir()
    (model, _, hit), _ = _build(cache, fingerprint)
    assert not hit and cache.path_for(KEY).parent == tmp_path / "from-env" and cache.path_for(KEY).is_file()


def test_unwritable_cache_dir_names_the_folder_and_the_fix(tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError) as info:
        QuantCache(blocker / "cache")
    assert str(blocker / "cache") in str(info.value) and "FPQ_CACHE_DIR" in str(info.value)
    assert isinstance(info.value, OSError)
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "read-only"
        locked.mkdir(mode=0o500)
        with pytest.raises(CheckpointError, match="read-only"):
            QuantCache(locked)


def test_invalid_keys_are_refused(tmp_path) -> None:
    cache = QuantCache(tmp_path)
    for bad in ("../escape", "", "a/b", ".hidden", "x" * 200):
        with pytest.raises(ValueError, match="invalid fpq cache key"):
            cache.path_for(bad)


# ---- hits and misses ----------------------------------------------------------------------------------------------


def test_miss_then_hit(tmp_path, fingerprint) -> None:
    cache = QuantCache(tmp_path)
    assert cache.get(KEY) is None
    (built, header, hit), builder = _build(cache, fingerprint)
    assert not hit and builder.calls == 1 and header.model_fingerprint == fingerprint
    assert header.recipe.name == "w8a16"

    # A second run with a fresh float model: loaded from the cache into that model, build_fn not called.
    (loaded, header2, hit2), builder2 = _build(cache, fingerprint)
    assert hit2 and builder2.calls == 0 and loaded is builder2.model
    assert _same_state(loaded, built)
    assert header2.tensors_sha256 == header.tensors_sha256
    assert set(fpq.quantized_layers(loaded)) == set(fpq.quantized_layers(built))

    # Without a model the UNet is rebuilt from the header.
    got = cache.get(KEY, expected_fingerprint=fingerprint)
    assert got is not None and _same_state(got[0], built)


def _truncate(path: Path, fingerprint: str) -> str:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "truncated or corrupt"


def _flip_bit(path: Path, fingerprint: str) -> str:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10  # inside the last tensor's data
    path.write_bytes(bytes(data))
    return "does not match the header's sha256"


def _foreign(path: Path, fingerprint: str) -> str:
    save_file({"weight": torch.zeros(4, 4)}, str(path))
    return "not an fpq checkpoint"


def _future_version(path: Path, fingerprint: str) -> str:
    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        header = json.loads(fh.metadata()[METADATA_KEY])
    header["format_version"] = 99
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(header)})
    return "upgrade fpq"


def _other_weights(path: Path, fingerprint: str) -> str:
    model = _quantized_unet()
    QuantCache(path.parent).put(KEY, model, recipe="w8a16", model_fingerprint="sha256:" + "0" * 64)
    return "made from float weights"


def _other_key(path: Path, fingerprint: str) -> str:
    cache = QuantCache(path.parent)
    other = "fedcba9876543210fedcba98"
    model = _quantized_unet()
    os.replace(cache.put(other, model, recipe="w8a16", model_fingerprint=fingerprint), path)
    return "stored under key"


@pytest.mark.parametrize(
    "damage", [_truncate, _flip_bit, _foreign, _future_version, _other_weights, _other_key], ids=lambda f: f.__name__
)
def test_bad_entries_are_reported_deleted_and_rebuilt(tmp_path, fingerprint, caplog, damage) -> None:
    cache = QuantCache(tmp_path)
    (built, _, _), _ = _build(cache, fingerprint)
    path = cache.path_for(KEY)
    reason = damage(path, fingerprint)

    with caplog.at_level(logging.WARNING, logger="fpq_plugin.cache"):
        (rebuilt, header, hit), builder = _build(cache, fingerprint)
    assert not hit and builder.calls == 1, "a bad entry must be rebuilt"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(path) in m and reason in m for m in warnings), warnings
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.bad"))

    # The rebuilt entry is good again.
    (loaded, header2, hit2), builder2 = _build(cache, fingerprint)
    assert hit2 and builder2.calls == 0 and _same_state(loaded, built)
    assert header2.model_fingerprint == fingerprint


class _WithTable(torch.nn.Module):
    """A model with a non-persistent buffer (not in checkpoints), like precomputed position tables."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 32)
        self.register_buffer("table", torch.arange(32.0), persistent=False)

    def forward(self, x):
        return self.proj(x) + self.table


def test_hit_into_a_model_with_non_persistent_buffers(tmp_path) -> None:
    torch.manual_seed(0)
    built = _WithTable()
    fpq.quantize_(built, "w8a16")
    cache = QuantCache(tmp_path)
    cache.put(KEY, built, recipe="w8a16", model_fingerprint="sha256:" + "2" * 64)
    fresh = _WithTable()
    got = cache.get(KEY, fresh, expected_fingerprint="sha256:" + "2" * 64)
    assert got is not None and got[0] is fresh and torch.equal(fresh.table, torch.arange(32.0))
    x = torch.randn(2, 16)
    assert torch.equal(fresh(x), built(x))


def test_put_refuses_an_unquantized_model(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no quantized layers"):
        QuantCache(tmp_path).put(KEY, _float_unet(), recipe="w8a16")


def test_lock_timeout_has_a_clear_message(tmp_path, fingerprint) -> None:
    cache, other = QuantCache(tmp_path), QuantCache(tmp_path)
    with cache.lock(KEY):
        start = time.monotonic()
        with pytest.raises(CacheLockTimeout, match="still building this entry") as info:
            other.get_or_build(KEY, lambda: pytest.fail("must not build"), recipe="w8a16", timeout=0.3)
        assert 0.25 < time.monotonic() - start < 5
        assert str(tmp_path / f"{KEY}.lock") in str(info.value) and str(os.getpid()) in str(info.value)
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, TimeoutError)


# ---- listing and removing -----------------------------------------------------------------------------------------


def test_entries_remove_clear_and_stale_temp_files(tmp_path, fingerprint) -> None:
    cache = QuantCache(tmp_path)
    before = time.time()
    _build(cache, fingerprint, KEY)
    _build(cache, fingerprint, "second")
    (tmp_path / f"garbage{'.fpq.safetensors'}").write_bytes(b"\x00" * 10)
    old_tmp, new_tmp = tmp_path / ".x.fpq.safetensors.old.tmp", tmp_path / ".x.fpq.safetensors.new.tmp"
    old_tmp.write_bytes(b"partial")
    new_tmp.write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old_tmp, (two_days_ago, two_days_ago))

    entries = {e.key: e for e in cache.entries()}
    assert set(entries) == {KEY, "second", "garbage"}
    for key in (KEY, "second"):
        e = entries[key]
        assert e.error is None and e.recipe == "w8a16" and e.fingerprint == fingerprint
        assert e.size == cache.path_for(key).stat().st_size > 0 and e.path == cache.path_for(key)
        assert before - 2 <= e.created <= time.time() + 2 and e.fpq_version == fpq.__version__
    assert entries["garbage"].error and "truncated or corrupt" in entries["garbage"].error
    assert not old_tmp.exists() and new_tmp.exists()  # only temp files older than a day go

    assert cache.remove("second") and not cache.remove("second")
    assert {e.key for e in cache.entries()} == {KEY, "garbage"}
    assert cache.clear() == 2 and cache.entries() == []


# ---- two processes racing on one key ------------------------------------------------------------------------------

_RACER = textwrap.dedent(
    """
    import json, logging, os, sys, time
    from pathlib import Path

    import torch
    from torch import nn

    import fpq_plugin as fpq
    from fpq_plugin.cache import QuantCache

    cache_root, calls, ready, name = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 16))

    class WaitSignal(logging.Handler):
        # Tells the other process when this one starts waiting for the lock.

        def emit(self, record):
            if "waiting for" in record.getMessage():
                (ready / f"waiting-{name}").touch()

    logging.getLogger("fpq_plugin.cache").addHandler(WaitSignal())
    logging.getLogger("fpq_plugin.cache").setLevel(logging.INFO)

    def build():
        (calls / f"{name}-{os.getpid()}").write_text("built")
        # Finish only once the other process is blocked on the lock, so the race is exercised every time.
        deadline = time.monotonic() + 30
        while not any(ready.glob("waiting-*")) and time.monotonic() < deadline:
            time.sleep(0.01)
        fpq.quantize_(model, "w8a16")
        return model

    # Start together: both processes are past their imports before either looks in the cache.
    (ready / name).touch()
    deadline = time.monotonic() + 60
    while len(list(ready.glob("[ab]"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    cache = QuantCache(cache_root, lock_timeout=60)
    out, header, hit = cache.get_or_build("race", build, model, recipe="w8a16", model_fingerprint="sha256:" + "1" * 64)
    x = torch.ones(2, 32)
    print(json.dumps({"name": name, "hit": hit, "y": out(x).tolist()}))
    """
)


def test_two_processes_racing_build_once_and_both_get_a_valid_entry(tmp_path) -> None:
    script = tmp_path / "racer.py"
    script.write_text(_RACER)
    calls, ready, root = tmp_path / "calls", tmp_path / "ready", tmp_path / "cache"
    calls.mkdir()
    ready.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(root), str(calls), str(ready), name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert len(list(calls.iterdir())) == 1, "build_fn must run once"
    assert sorted(r["hit"] for r in results) == [False, True]
    waiter = next(r["name"] for r in results if r["hit"])
    assert [p.name for p in ready.glob("waiting-*")] == [f"waiting-{waiter}"]  # it found the lock taken
    assert results[0]["y"] == results[1]["y"]  # the waiting process uses the builder's result
    entries = QuantCache(root).entries()
    assert [(e.key, e.error) for e in entries] == [("race", None)]
    assert not list(root.glob("*.tmp"))
