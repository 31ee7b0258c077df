from __future__ import annotations

import pytest

from fpq_plugin.errors import RecipeError
from fpq_plugin.recipes import PRESETS, Recipe, get_recipe


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_dicts(name: str) -> None:
    recipe = PRESETS[name]
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert get_recipe(name) is recipe


def test_preset_bit_widths() -> None:
    assert get_recipe("w8a8").weight_bits == 8 and get_recipe("w8a8").activation_format == "e4m3fn"
    assert get_recipe("w4a8").weight_bits == 4 and set(get_recipe("w4a8").weight_formats) == {"e2m1", "e3m0", "e1m2"}
    assert not get_recipe("w4a16").quantizes_activations
    assert get_recipe("int4").weight_formats == ("int4",) and get_recipe("int4").activation_format == "int8"


def test_yaml_with_preset_and_overrides(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("preset: w4a8\nname: my-w4a8\nskip: [conv_in, conv_out]\nactivation_format: auto\n")
    recipe = get_recipe(path)
    assert recipe.name == "my-w4a8" and recipe.skip == ("conv_in", "conv_out")
    assert recipe.activation_candidates() == ("e4m3fn", "e5m2")
    assert recipe.weight_formats == PRESETS["w4a8"].weight_formats


@pytest.mark.parametrize(
    "text,match",
    [
        ("preset: w8a8\nweight_format: e2m1\n", r"mine.yaml.*unknown recipe field\(s\) \['weight_format'\]"),
        ("name: x\nweight_formats: [e2m1, e4m3fn]\n", "mix bit widths"),
        ("name: x\nweight_formats: [e2m1, int4]\n", "mix FP and INT"),
        ("name: x\nweight_formats: [e9m9]\n", "unknown number format 'e9m9'"),
        ("name: x\nweight_formats: [e2m1]\nactivation_format: e2m1\n", "activation_format must be one of"),
        ("name: x\nweight_formats: [e2m1]\nrounding: magic\n", "rounding must be one of"),
        ("preset: w8a8\nversion: 7\n", "schema version 7"),
        ("name: x\n", "needs 'weight_formats'"),
        ("- a\n- b\n", "must be a mapping"),
        ("name: [unclosed\n", "not valid YAML"),
        ("preset: nope\n", "unknown recipe 'nope'"),
    ],
)
def test_bad_yaml_names_file_and_field(tmp_path, text: str, match: str) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=match):
        get_recipe(path)


def test_missing_file_and_unknown_name() -> None:
    with pytest.raises(RecipeError, match="cannot read recipe file"):
        get_recipe("/nonexistent/recipe.yaml")
    with pytest.raises(RecipeError, match="presets: w8a8"):
        get_recipe("w3a3")


def test_search_activation_format_covers_every_8bit_fp_encoding() -> None:
    recipe = get_recipe("w8a8-search")
    assert recipe.activation_candidates() == ("e4m3fn", "e5m2", "e3m4", "e2m5")
    assert set(recipe.weight_formats) == {"e4m3fn", "e5m2", "e3m4", "e2m5"} and recipe.weight_bits == 8
    assert get_recipe("w8a8").activation_candidates() == ("e4m3fn",)
    w4 = get_recipe("w4a8-search")  # FP4 weights (encoding searched too), searched 8-bit FP activations
    assert w4.activation_candidates() == recipe.activation_candidates()
    assert set(w4.weight_formats) == {"e2m1", "e3m0", "e1m2"} and w4.weight_bits == 4
    assert Recipe("x", ("e2m1",), "e3m4").activation_candidates() == ("e3m4",)
