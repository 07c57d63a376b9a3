"""The package as pip builds it: a PEP 517 build (pyproject.toml) from setup.cfg's metadata,
with py.typed and LICENSE in the wheel, the docs and examples in the sdist, test requirements
that install on every Python the package supports, and no pytest plugin forced on every
pytest run."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

from .conftest import T, import_or_skip
from .test_cli import ROOT

__all__: list[str] = []

#: The Python versions the package supports (setup.cfg's python_requires and classifiers).
SUPPORTED = ["3.9", "3.10", "3.11", "3.12", "3.13"]

#: The Python versions each pinned test requirement has a distribution for.
SUPPORTS = {
    "hat-juggler": {"3.8", "3.9", "3.10", "3.11"},  # cp38 to cp311 wheels, no sdist
    "hat-util": {"3.10", "3.11", "3.12", "3.13"},  # 0.6.13: Requires-Python >=3.10
}


def _metadata() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _copy_source(dst, *dirs: str) -> None:
    dst.mkdir()
    for name in ("setup.cfg", "setup.py", "pyproject.toml", "README.rst", "LICENSE", "MANIFEST.in"):
        shutil.copy(ROOT / name, dst / name)
    for name in ("juggler", *dirs):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "_build", ".hypothesis"))


def test_wheel_is_built_through_pep_517_and_ships_py_typed_and_the_license(tmp_path):
    pytest.importorskip("setuptools", reason="the build backend runs in this environment (no network)")
    src = tmp_path / "src"
    _copy_source(src)
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
        assert any(n.endswith(".dist-info/LICENSE") for n in names), names
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        text = z.read(entry_points).decode()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = z.read(metadata).decode()
    assert "[console_scripts]\njuggler = juggler.cli:main" in text
    # the fixtures load where a test suite asks for them (docs/testing.rst), not everywhere
    assert "pytest11" not in text
    assert "License: BSD-3-Clause" in meta
    for version in SUPPORTED:
        assert f"Classifier: Programming Language :: Python :: {version}\n" in meta
    requires = [line.split(": ", 1)[1] for line in meta.splitlines() if line.startswith("Requires-Dist: ")]
    # `pip install . && juggler demo` (the README's first command) needs the embedded redis
    assert "fakeredis[lua]>=2.41" in requires
    # pytest only with an extra: the plugin is for the test suites that load it
    assert [r for r in requires if r.startswith("pytest") and "extra ==" not in r] == []
    assert any(r.startswith("pytest>=7") and 'extra == "pytest"' in r for r in requires), requires


def test_sdist_carries_the_docs_examples_and_license_the_readme_names(tmp_path):
    pytest.importorskip("setuptools", reason="the build backend runs in this environment (no network)")
    src = tmp_path / "src"
    _copy_source(src, "docs", "examples", "tests", "benchmarks", ".ci")
    out = subprocess.run(
        [sys.executable, "-c", f"import setuptools.build_meta as b; print(b.build_sdist({str(tmp_path / 'dist')!r}))"],
        cwd=src, capture_output=True, text=True, timeout=T(300),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    (sdist,) = (tmp_path / "dist").glob("juggler-*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for name in ("LICENSE", "README.rst", "docs/conf.py", "docs/quickstart.rst", "examples/quickstart.py",
                 "examples/auth.py", "tests/conftest.py", "benchmarks/soak.py", "juggler/static/juggler.js",
                 ".ci/run"):  # fmt: skip
        assert name in names, f"{name} is not in the sdist"
    assert not [n for n in names if "__pycache__" in n or n.startswith("docs/_build")]


def test_test_requirements_install_on_every_supported_python():
    """``pip install '.[test]'`` on 3.9 to 3.13: each pinned requirement applies only where it
    has a distribution (its environment marker), and the interop tests skip where it has none."""
    from packaging.requirements import Requirement

    cfg = _metadata()
    assert cfg["options"]["python_requires"].strip() == f">={SUPPORTED[0]}"
    requirements = [Requirement(line) for line in _lines(cfg["options.extras_require"]["test"])]
    for req in requirements:
        for version in SUPPORTED:
            applies = req.marker is None or req.marker.evaluate({"python_version": version, "python_full_version": f"{version}.0"})
            if req.name in SUPPORTS:
                # hat-util is pinned only where hat-juggler, which needs it, installs
                wanted = version in SUPPORTS[req.name] and version in SUPPORTS["hat-juggler"]
                assert applies == wanted, (str(req), version)
    assert {r.name for r in requirements} >= set(SUPPORTS)
    classifiers = _lines(cfg["metadata"]["classifiers"])
    assert [c.rsplit(" ", 1)[1] for c in classifiers if c.startswith("Programming Language :: Python :: 3.")] == SUPPORTED


def test_import_or_skip_skips_with_its_reason_but_fails_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not here on purpose"):
        import_or_skip("juggler_no_such_module", "not here on purpose")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(ModuleNotFoundError):
        import_or_skip("juggler_no_such_module", "not here on purpose")
    with pytest.raises(pytest.skip.Exception, match="no release for this Python"):  # (nothing CI could install)
        import_or_skip("juggler_no_such_module", "no release for this Python", installable=False)
