"""Calibration prompts: the text that drives the full-precision model while UNet inputs are recorded.

Post-training quantization calibrates activation ranges on real UNet inputs, and those depend on the text
conditioning. fpq ships a default set of original prompts (``calibration_prompts/default.txt``) and accepts the
user's own, either as a list of strings or as a path to a UTF-8 text file with one prompt per line.

Example:
    >>> from fpq_plugin.prompts import load_prompts, prompt_set_id
    >>> prompts = load_prompts(limit=64)           # 64 prompts spread evenly over the default set
    >>> key = prompt_set_id(prompts)               # short stable id, used in calibration cache keys
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Sequence
from pathlib import Path

from fpq_plugin.errors import RecipeError

__all__ = ["DEFAULT_PROMPTS_PATH", "load_prompts", "prompt_set_id"]

DEFAULT_PROMPTS_PATH: Path = Path(__file__).resolve().parent.parent / "calibration_prompts" / "default.txt"
"""The default prompt file in a source checkout (or an editable install)."""

_PACKAGED_DEFAULT = ("_data", "calibration_prompts", "default.txt")  # copy inside the package, for wheel installs


def _read_default_text() -> tuple[str, str]:
    """Return ``(text, name)`` of the default prompt file.

    Looks at :data:`DEFAULT_PROMPTS_PATH` first, then at the copy a non-editable install may carry under
    ``fpq_plugin/_data/calibration_prompts/default.txt``.

    Raises:
        RecipeError: Neither location holds the file.
    """
    if DEFAULT_PROMPTS_PATH.is_file():
        return DEFAULT_PROMPTS_PATH.read_text(encoding="utf-8"), str(DEFAULT_PROMPTS_PATH)
    try:
        from importlib import resources

        resource = resources.files("fpq_plugin").joinpath(*_PACKAGED_DEFAULT)
        if resource.is_file():
            return resource.read_text(encoding="utf-8"), "fpq_plugin/" + "/".join(_PACKAGED_DEFAULT)
    except (ImportError, ModuleNotFoundError, OSError, TypeError):
        pass
    raise RecipeError(
        f"default calibration prompt file not found: {DEFAULT_PROMPTS_PATH} (nor the packaged copy "
        f"fpq_plugin/{'/'.join(_PACKAGED_DEFAULT)}); reinstall fpq, or pass your own prompts as a list of "
        "strings or a path to a .txt file with one prompt per line"
    )


def _parse_lines(text: str) -> list[str]:
    """Return the stripped prompts in ``text``, skipping blank lines and lines starting with ``#``."""
    prompts = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(line)
    return prompts


def _read_file(path: Path) -> list[str]:
    """Read prompts from a UTF-8 text file, one per line.

    Raises:
        RecipeError: The file is missing, unreadable, not UTF-8, or holds no prompts.
    """
    if not path.is_file():
        raise RecipeError(
            f"calibration prompt file not found: {path}; check the path, or pass the prompts as a list of strings"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"calibration prompt file {path} is not valid UTF-8 ({exc}); save it as UTF-8") from exc
    except OSError as exc:
        raise RecipeError(f"cannot read calibration prompt file {path}: {exc}") from exc
    prompts = _parse_lines(text)
    if not prompts:
        raise RecipeError(
            f"calibration prompt file {path} holds no prompts; write one prompt per line "
            "(blank lines and lines starting with '#' are ignored)"
        )
    return prompts


def _validate_list(items: Sequence[object]) -> list[str]:
    """Return a stripped copy of a user's prompt list.

    Raises:
        RecipeError: The list is empty, or an entry is not a string or is blank.
    """
    prompts = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise RecipeError(
                f"calibration prompt #{index} is a {type(item).__name__}, not a string; "
                "pass a list of strings or a path to a .txt file"
            )
        prompt = item.strip()
        if not prompt:
            raise RecipeError(f"calibration prompt #{index} is empty; remove it or write a prompt")
        prompts.append(prompt)
    if not prompts:
        raise RecipeError("the calibration prompt list is empty; pass at least one prompt, or None for the default set")
    return prompts


def _subset(prompts: list[str], limit: int, seed: int | None) -> list[str]:
    """Return ``limit`` prompts: evenly spread in file order when ``seed`` is None, else a seeded sample."""
    n = len(prompts)
    if limit >= n:
        return list(prompts)
    if seed is None:
        # Every k-th prompt (k = n / limit, fractional), so categories interleaved in the file stay mixed.
        return [prompts[(i * n) // limit] for i in range(limit)]
    return random.Random(seed).sample(prompts, limit)


def load_prompts(
    source: str | os.PathLike[str] | Sequence[str] | None = None,
    *,
    limit: int | None = None,
    seed: int | None = None,
) -> list[str]:
    """Load calibration prompts from the default set, a text file or a list.

    Args:
        source: ``None`` for the default set; a path (``str`` or ``os.PathLike``) to a UTF-8 text file with
            one prompt per line (blank lines and lines starting with ``#`` are skipped, prompts are stripped);
            or a sequence of prompt strings, returned as a validated, stripped copy.
        limit: Keep only this many prompts. Without ``seed`` the subset is spread evenly over the set (every
            k-th prompt, in order); with ``seed`` it is a random sample drawn by ``random.Random(seed)``.
            Both are deterministic. A ``limit`` at least the set's size returns the whole set.
        seed: Seed of the random subset; ignored when ``limit`` is None.

    Returns:
        The prompts, as a new list.

    Raises:
        RecipeError: The file is missing or holds no prompts, an entry is not a string or is empty,
            or ``limit`` is below 1.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise RecipeError(f"calibration prompt limit must be a positive integer or None, got {limit!r}")

    if source is None:
        text, name = _read_default_text()
        prompts = _parse_lines(text)
        if not prompts:
            raise RecipeError(f"default calibration prompt file {name} holds no prompts; reinstall fpq")
    elif isinstance(source, (str, os.PathLike)):
        prompts = _read_file(Path(os.fspath(source)).expanduser())
    elif isinstance(source, Sequence):
        prompts = _validate_list(source)
    else:
        raise RecipeError(
            f"calibration prompts must be None, a path to a .txt file or a list of strings, "
            f"got {type(source).__name__}"
        )

    if limit is not None:
        prompts = _subset(prompts, limit, seed)
    return prompts


def prompt_set_id(prompts: Sequence[str]) -> str:
    """Return a short, stable identifier of a prompt set, for cache keys.

    Args:
        prompts: The prompts, in order (order matters).

    Returns:
        The first 16 hex characters of the SHA-256 of the prompts joined by ``"\\n"`` (UTF-8).
    """
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()[:16]
