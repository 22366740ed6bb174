"""The package as a user installs it: a built wheel imports cleanly with no source tree."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (whl,) = out.glob("aimesh-*.whl")
    return whl


def test_wheel_holds_every_package_and_the_console_script(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "aimesh/py.typed",
        "aimesh/inference/v1/inference_pb2.py",
        "aimesh/inference/v1/inference_pb2.pyi",
        "aimesh/inference/v1/inference_pb2_grpc.py",
        "aimesh/mesh/cli.py",
        "aimesh/mesh/sim/service.py",
        "aimesh/interceptors/decode.py",
        "aimesh/clients/inference.py",
        "aimesh/clients/betterproto/aimesh/inference/v1/__init__.py",
    ):
        assert required in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "aimesh = aimesh.mesh.cli:main" in text


def test_installed_copy_imports_without_the_source_tree(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    deps = sysconfig.get_paths()["purelib"]
    code = (
        "import aimesh, aimesh.mesh.cli, aimesh.clients, aimesh.interceptors;"
        "from aimesh.inference.v1 import inference_pb2, inference_pb2_grpc;"
        "from aimesh.clients.betterproto.aimesh.inference.v1 import InferenceStub;"
        "print(aimesh.__file__)"
    )
    # -S: no site processing, so the editable install's path hook is not loaded; the
    # dependencies come from site-packages on PYTHONPATH, aimesh from the wheel only.
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        env={"PYTHONPATH": f"{site}:{deps}"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(site))
