"""The fpq command line on a real tiny pipeline folder: quantize, cache list/remove, inspect, and errors."""

from __future__ import annotations

import pytest

from fpq_plugin.cli import main
from fpq_plugin.models.tiny_pipeline import save_tiny_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "tiny", "sd15", seed=0)


def test_quantize_then_cache_and_inspect(folder, tmp_path, capsys) -> None:
    cache = tmp_path / "cache"
    args = [str(folder), str(tmp_path / "out"), "--recipe", "w8a16", "--method", "fast", "--prompts", "2",
            "--cache-dir", str(cache)]
    assert main(["quantize", *args]) == 0
    assert "calibrated" in capsys.readouterr().out
    assert (tmp_path / "out" / "unet" / "fpq_unet.safetensors").is_file()
    assert main(["quantize", *args]) == 0
    assert "restored from cache" in capsys.readouterr().out
    assert main(["cache", "list", "--cache-dir", str(cache)]) == 0
    listing = capsys.readouterr().out
    assert "w8a16" in listing and "ok" in listing
    assert main(["inspect", str(tmp_path / "out" / "unet" / "fpq_unet.safetensors")]) == 0
    assert "e4m3fn" in capsys.readouterr().out
    assert main(["cache", "clear", "--cache-dir", str(cache)]) == 0
    assert "removed 1 entries" in capsys.readouterr().out


def test_bad_recipe_is_a_clean_error(folder, tmp_path, capsys) -> None:
    assert main(["quantize", str(folder), str(tmp_path / "x"), "--recipe", "w3a3"]) == 2
    assert "unknown recipe 'w3a3'" in capsys.readouterr().err
