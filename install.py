"""Install fpq's dependencies into the running Python (ComfyUI-Manager runs this from the node's folder).

Idempotent: requirements that are already satisfied are left alone. torch is never installed, upgraded or
downgraded here (ComfyUI's environment owns it): the installed torch, torchvision and torchaudio are pinned with a
pip constraints file, so a dependency that would need another torch fails to install instead of replacing it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS = os.path.join(HERE, "requirements.txt")
TORCH_PACKAGES = ("torch", "torchvision", "torchaudio")


def requirements(path: str = REQUIREMENTS) -> list[str]:
    """The requirement lines of ``path`` (comments and blank lines dropped); torch itself is refused."""
    with open(path, encoding="utf-8") as fh:
        reqs = [line.split("#", 1)[0].strip() for line in fh]
    reqs = [r for r in reqs if r]
    for r in reqs:
        name = r.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            name = name.split(sep)[0]
        if name.lower() in TORCH_PACKAGES:
            raise SystemExit(f"{path}: {r!r} would change ComfyUI's torch; remove it from requirements.txt")
    return reqs


def torch_pins() -> list[str]:
    """``name==version`` of the torch packages installed in this Python."""
    pins = []
    for name in TORCH_PACKAGES:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pass
    return pins


def main() -> int:
    reqs = requirements()
    with tempfile.TemporaryDirectory() as tmp:
        constraints = os.path.join(tmp, "keep-torch.txt")
        with open(constraints, "w", encoding="utf-8") as fh:
            fh.write("\n".join(torch_pins()) + "\n")
        # Without --upgrade pip keeps every installed version that satisfies the pins: running this twice is a no-op.
        cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-c", constraints, *reqs]
        print("fpq install:", " ".join(cmd), "(constraints:", ", ".join(torch_pins()) or "none", ")", flush=True)
        return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
