"""The package as pip builds it: a PEP 517 build (pyproject.toml) from setup.cfg's metadata,
with py.typed and the pytest plugin's entry point in the wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest

from .conftest import T
from .test_cli import ROOT

__all__: list[str] = []


def test_wheel_is_built_through_pep_517_and_ships_py_typed_and_the_plugin(tmp_path):
    pytest.importorskip("setuptools", reason="the build backend runs in this environment (no network)")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "setup.py", "pyproject.toml", "README.rst"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "juggler", src / "juggler", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"), "."],
        cwd=src, capture_output=True, text=True, timeout=T(300),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "(pyproject.toml)" in out.stdout and "setup.py bdist_wheel" not in out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("juggler-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert "juggler/py.typed" in names
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        text = z.read(entry_points).decode()
    assert "[pytest11]\njuggler = juggler.pytest_plugin" in text
    assert "[console_scripts]\njuggler = juggler.cli:main" in text
