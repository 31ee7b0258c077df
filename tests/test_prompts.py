"""Tests of the calibration prompt set and its loader (fpq_plugin.prompts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fpq_plugin.errors import RecipeError
from fpq_plugin.prompts import DEFAULT_PROMPTS_PATH, load_prompts, prompt_set_id


# --- the default set ---------------------------------------------------------------------------------------


def test_default_file_exists_and_is_utf8() -> None:
    assert DEFAULT_PROMPTS_PATH.is_file()
    DEFAULT_PROMPTS_PATH.read_bytes().decode("utf-8")


def test_default_set_size_and_uniqueness() -> None:
    prompts = load_prompts()
    assert 400 <= len(prompts) <= 500
    lowered = [p.lower() for p in prompts]
    duplicates = sorted({p for p in lowered if lowered.count(p) > 1})
    assert not duplicates, f"duplicate prompts (case-insensitive): {duplicates}"


def test_default_lines_are_short_and_clean() -> None:
    for number, line in enumerate(DEFAULT_PROMPTS_PATH.read_text(encoding="utf-8").splitlines(), start=1):
        assert len(line) <= 400, f"line {number} is {len(line)} characters long"
        assert line == line.strip(), f"line {number} has leading or trailing whitespace"
    for prompt in load_prompts():
        assert len(prompt.split()) >= 2, prompt


def test_default_set_has_short_and_long_prompts() -> None:
    word_counts = [len(p.split()) for p in load_prompts()]
    assert sum(n <= 4 for n in word_counts) >= 20
    assert sum(30 <= n <= 60 for n in word_counts) >= 20
    assert max(word_counts) <= 60


def test_none_and_default_path_agree() -> None:
    assert load_prompts() == load_prompts(DEFAULT_PROMPTS_PATH) == load_prompts(str(DEFAULT_PROMPTS_PATH))


# --- files and lists ---------------------------------------------------------------------------------------


def test_load_from_file_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "mine.txt"
    path.write_text(
        "# my prompts\n\n  a red bicycle  \n   \n#another comment\na café at night, watercolor\n\t\n  # indented comment\n",
        encoding="utf-8",
    )
    assert load_prompts(path) == ["a red bicycle", "a café at night, watercolor"]
    assert load_prompts(str(path)) == ["a red bicycle", "a café at night, watercolor"]


def test_load_from_file_with_crlf(tmp_path: Path) -> None:
    path = tmp_path / "windows.txt"
    path.write_bytes(b"first prompt\r\nsecond prompt\r\n")
    assert load_prompts(path) == ["first prompt", "second prompt"]


def test_list_input_is_validated_copy() -> None:
    given = ["  a blue door ", "two cats on a wall"]
    loaded = load_prompts(given)
    assert loaded == ["a blue door", "two cats on a wall"]
    loaded.append("x")
    assert given == ["  a blue door ", "two cats on a wall"]
    assert load_prompts(("a tuple prompt",)) == ["a tuple prompt"]


# --- limit and seed ----------------------------------------------------------------------------------------


def test_limit_without_seed_is_spread_and_deterministic() -> None:
    full = load_prompts()
    subset = load_prompts(limit=50)
    assert len(subset) == 50
    assert subset == load_prompts(limit=50)
    assert subset[0] == full[0]
    positions = [full.index(p) for p in subset]
    assert positions == sorted(positions)
    assert positions[-1] >= len(full) * 0.9, "subset should reach the end of the file"


def test_limit_with_seed_is_deterministic_sample() -> None:
    full = load_prompts()
    a = load_prompts(limit=40, seed=7)
    assert len(a) == 40
    assert a == load_prompts(limit=40, seed=7)
    assert len(set(a)) == 40 and set(a) <= set(full)
    assert a != load_prompts(limit=40, seed=8)


def test_limit_on_list_and_above_size() -> None:
    items = [f"prompt {i}" for i in range(10)]
    assert load_prompts(items, limit=5) == ["prompt 0", "prompt 2", "prompt 4", "prompt 6", "prompt 8"]
    assert load_prompts(items, limit=3) == ["prompt 0", "prompt 3", "prompt 6"]
    assert load_prompts(items, limit=100) == items
    assert load_prompts(items, limit=10, seed=1) == items


# --- errors ------------------------------------------------------------------------------------------------


def test_missing_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "no_such_prompts.txt"
    with pytest.raises(RecipeError, match="no_such_prompts.txt"):
        load_prompts(path)


def test_empty_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "only_comments.txt"
    path.write_text("# nothing here\n\n   \n", encoding="utf-8")
    with pytest.raises(RecipeError, match="only_comments.txt") as info:
        load_prompts(path)
    assert "one prompt per line" in str(info.value)


def test_non_utf8_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "latin1_prompts.txt"
    path.write_bytes("un caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="latin1_prompts.txt"):
        load_prompts(path)


@pytest.mark.parametrize("bad", [["ok", 3], ["ok", None], [b"bytes prompt"]])
def test_non_string_entry_raises(bad: list[object]) -> None:
    with pytest.raises(RecipeError, match="not a string"):
        load_prompts(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [["ok", ""], ["   "]])
def test_empty_prompt_in_list_raises(bad: list[str]) -> None:
    with pytest.raises(RecipeError, match="empty"):
        load_prompts(bad)


def test_empty_list_raises() -> None:
    with pytest.raises(RecipeError, match="empty"):
        load_prompts([])


@pytest.mark.parametrize("limit", [0, -3])
def test_limit_below_one_raises(limit: int) -> None:
    with pytest.raises(RecipeError, match="limit"):
        load_prompts(limit=limit)
    with pytest.raises(RecipeError, match="limit"):
        load_prompts(["a prompt"], limit=limit)


def test_wrong_source_type_raises() -> None:
    with pytest.raises(RecipeError):
        load_prompts(42)  # type: ignore[arg-type]


def test_missing_default_file_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import fpq_plugin.prompts as prompts_module

    monkeypatch.setattr(prompts_module, "DEFAULT_PROMPTS_PATH", tmp_path / "gone" / "default.txt")
    with pytest.raises(RecipeError, match="default.txt"):
        load_prompts()


def test_recipe_error_is_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        load_prompts(tmp_path / "missing.txt")


# --- prompt_set_id -----------------------------------------------------------------------------------------


def test_prompt_set_id_is_stable_short_hex() -> None:
    ident = prompt_set_id(["a cat", "a dog"])
    assert ident == prompt_set_id(["a cat", "a dog"])
    assert len(ident) == 16
    int(ident, 16)
    # pinned value of sha256("a cat\na dog")[:16]: a change here would invalidate every calibration cache
    assert ident == "f658c42ad55fc07e"


def test_prompt_set_id_is_order_and_content_sensitive() -> None:
    assert prompt_set_id(["a cat", "a dog"]) != prompt_set_id(["a dog", "a cat"])
    assert prompt_set_id(["a cat", "a dog"]) != prompt_set_id(["a cat", "a dog", "a bird"])
    assert prompt_set_id(load_prompts(limit=10)) == prompt_set_id(load_prompts(limit=10))
