"""Maps the fixed repository layout onto one importable package, ``aimesh``.

    gen/aimesh/...      -> aimesh.<proto package>   (grpcio code from protos/)
    mesh/               -> aimesh.mesh              (CLI, sim backend, proxy, ...)
    interceptors/       -> aimesh.interceptors
    clients/            -> aimesh.clients           (facade + betterproto2 clients)

Everything else lives in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
ROOTS = {
    "aimesh": "gen/aimesh",
    "aimesh.mesh": "mesh",
    "aimesh.interceptors": "interceptors",
    "aimesh.clients": "clients",
}


def _packages() -> list[str]:
    found = []
    for name, rel in ROOTS.items():
        base = ROOT / rel
        for init in sorted(base.rglob("__init__.py")):
            parts = init.parent.relative_to(base).parts
            found.append(".".join((name, *parts)))
    return found


setup(
    package_dir=ROOTS,
    packages=_packages(),
    package_data={"": ["py.typed", "*.pyi", "*.proto"]},
)
