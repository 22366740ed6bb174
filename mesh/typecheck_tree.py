"""Builds build/typecheck/aimesh, a symlink tree of the installed package layout, for mypy.

mypy cannot follow setuptools' editable-install path hook, which maps mesh/ to
aimesh.mesh and so on; this tree shows it the same package as the wheel has.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

LINKS = {"mesh": "mesh", "interceptors": "interceptors", "clients": "clients"}


def build(root: Path) -> Path:
    out = root / "build" / "typecheck"
    if out.exists():
        shutil.rmtree(out)
    pkg = out / "aimesh"
    pkg.mkdir(parents=True)
    for entry in (root / "gen" / "aimesh").iterdir():
        (pkg / entry.name).symlink_to(entry.resolve())
    for name, rel in LINKS.items():
        (pkg / name).symlink_to((root / rel).resolve())
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
