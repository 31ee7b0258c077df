"""The fpq command line on a real tiny pipeline folder: quantize, cache, inspect (table and JSON), Ctrl-C, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fpq_plugin.cache import QuantCache
from fpq_plugin.cli import main
from fpq_plugin.models.tiny_pipeline import save_tiny_pipeline
from fpq_plugin.stats import layer_stats

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "tiny", "sd15", seed=0)


def test_quantize_then_cache_and_inspect(folder, tmp_path, capsys) -> None:
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    args = [str(folder), str(out), "--recipe", "w8a16", "--method", "fast", "--prompts", "2",
            "--cache-dir", str(cache), "--steps", "4"]
    assert main(["quantize", *args]) == 0
    assert "calibrated" in capsys.readouterr().out
    checkpoint = out / "unet" / "fpq_unet.safetensors"
    assert checkpoint.is_file()
    assert main(["quantize", *args]) == 2  # the output exists
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["quantize", *args, "--overwrite"]) == 0
    assert "restored from cache" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or old folders left
    assert main(["cache", "list", "--cache-dir", str(cache)]) == 0
    listing = capsys.readouterr().out
    assert "w8a16" in listing and "ok" in listing
    (key,) = [e.key for e in QuantCache(cache).entries()]

    # The table: per-layer formats, sizes and sparsity, totals, recipe, fingerprint and method.
    assert main(["inspect", str(checkpoint)]) == 0
    text = capsys.readouterr().out
    for expected in ("e4m3fn", "sparsity", "fingerprint: sha256:", "method: fast (rounding_iters=0", "down_blocks.0", "KiB", "52.0% of bf16"):
        assert expected in text, expected

    # JSON: the same numbers as the library, from the file, the pipeline folder and the cache key.
    expected = layer_stats(checkpoint)
    for target in (str(checkpoint), str(out), key):
        extra = ["--cache-dir", str(cache)] if target == key else []
        assert main(["inspect", target, "--json", *extra]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["quantized_layers"] == len(expected.layers) > 10
        assert data["sparsity"] == pytest.approx(expected.sparsity)
        assert data["recipe"]["name"] == "w8a16" and data["model_fingerprint"].startswith("sha256:")
        assert data["format_counts"] == {"e4m3fn": len(expected.layers)}
        assert [layer["name"] for layer in data["layers"]] == [s.name for s in expected.layers]
    assert data["extra"]["fpq_cache_key"] == key and data["extra"]["method"] == "fast"

    assert main(["inspect", str(out), "--summary"]) == 0
    assert "down_blocks.0" not in capsys.readouterr().out
    assert main(["cache", "clear", "--cache-dir", str(cache)]) == 0
    assert "removed 1 entries" in capsys.readouterr().out


def test_inspect_errors_name_the_target_and_the_fix(tmp_path, capsys) -> None:
    assert main(["inspect", str(tmp_path / "nowhere"), "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "fpq cache list" in err
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "unet/fpq_unet.safetensors" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert main(["inspect", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_bad_recipe_is_a_clean_error(folder, tmp_path, capsys) -> None:
    assert main(["quantize", str(folder), str(tmp_path / "x"), "--recipe", "w3a3"]) == 2
    assert "unknown recipe 'w3a3'" in capsys.readouterr().err


def test_ctrl_c_during_calibration_leaves_no_files(folder, tmp_path) -> None:
    """A real SIGINT to a running `fpq quantize`: exit 130, no cache entry, no output folder, no temp files."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fpq_plugin.cli", "quantize", str(folder), str(out), "--recipe", "w4a8",
         "--method", "standard", "--prompts", "8", "--steps", "20", "--cache-dir", str(cache)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO),
        # Children inherit an ignored SIGINT (earlier tests' worker pools can leave it so in this process); the
        # child must start with the default disposition, as from a shell, so Python turns SIGINT into Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # The lock file appears when the build (calibration + quantization) starts; it takes well over a second.
    deadline = time.monotonic() + 300
    while not list(cache.glob("*.lock")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    assert list(cache.glob("*.lock")), "calibration never started within 300 s"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    # Cancellation is checked between layers and every 50 rounding iterations: seconds on a quiet CPU, but a loaded
    # machine (CI runners, parallel test sessions) can stretch one search step to a minute.
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "cancelled" in err
    assert not out.exists()
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
