"""cProfile results as the benchmarks store them: the functions with the most own time, per call of the profiled
unit (a UNet forward, a sampling step), plus pstats' cumulative listing for reading."""

from __future__ import annotations

import cProfile
import io
import pstats
from pathlib import Path


def summarize(prof: cProfile.Profile, units: int, top: int, unit: str = "forward", cumulative_lines: int = 25) -> dict:
    """``units``: how many forwards (or steps: ``unit``) the profile covered; every time is divided by it and the
    keys name the unit (``own_ms_per_forward``)."""
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in stats.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}:{fn}", f"calls_per_{unit}": round(nc / units, 1),
                     f"own_ms_per_{unit}": round(tt / units * 1e3, 3),
                     f"cum_ms_per_{unit}": round(ct / units * 1e3, 3)})
    rows.sort(key=lambda r: -r[f"own_ms_per_{unit}"])
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(cumulative_lines)
    return {"top_own_time": rows[:top], "cumulative_text": buf.getvalue()}
