"""Progress of calibration and quantization as rich bars, one per phase.

The front doors report long work through one callback type, :data:`PhaseProgress`::

    progress(phase, done, total, detail)

``phase`` is one of :data:`PHASES` (``"calibrate"``: UNet calls of the calibration sampling runs; ``"quantize"``:
reconstruction units, each a format/scale search plus learned rounding), ``detail`` names the current prompt or
unit. The callback may raise (``KeyboardInterrupt``, :class:`fpq_plugin.CancelledError`) to cancel: the work stops
at the next UNet call or unit and nothing is written to the cache or the output folder.

:class:`RichPhaseBars` turns the callback into rich progress bars on stderr; ``FPQuantPipeline.from_pretrained``
and ``fpq quantize`` use it when the console is interactive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["PHASES", "PhaseProgress", "RichPhaseBars", "is_interactive"]

PhaseProgress = Callable[[str, int, int, str], None]

PHASES: dict[str, str] = {
    "calibrate": "calibration sampling (UNet calls)",
    "quantize": "search + rounding (units)",
}


def is_interactive() -> bool:
    """Whether stderr is a terminal that can redraw progress bars (rich's own test: not a pipe, not dumb)."""
    from rich.console import Console

    return Console(stderr=True).is_interactive


class RichPhaseBars:
    """A :data:`PhaseProgress` callback drawing one rich bar per phase, as a context manager.

    Args:
        console: The rich console to draw on (default: stderr).
        transient: Remove the bars when done (default: keep them as a record of what ran).

    Example::

        with RichPhaseBars() as bars:
            pipe = FPQuantPipeline.from_pretrained("sd15/", "w4a8", progress=bars)
    """

    def __init__(self, console: Any = None, *, transient: bool = False) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console or Console(stderr=True)
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description:<36}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("[dim]{task.fields[detail]}"),
            console=self.console,
            transient=transient,
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> RichPhaseBars:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def __call__(self, phase: str, done: int, total: int, detail: str = "") -> None:
        task = self._tasks.get(phase)
        if task is None:
            task = self._progress.add_task(PHASES.get(phase, phase), total=total, detail=detail)
            self._tasks[phase] = task
        self._progress.update(task, completed=done, total=max(total, done), detail=detail)
