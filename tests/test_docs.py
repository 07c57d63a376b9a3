"""The Sphinx documentation: it builds offline without a warning, every name ``juggler``
exports is documented under the name users import, and links reach the stdlib and redis-py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import juggler

from .conftest import T
from .test_cli import ROOT

__all__: list[str] = []


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory):
    if not os.environ.get("CI"):
        pytest.importorskip("sphinx", reason="pip install '.[docs]'")
    out_dir = tmp_path_factory.mktemp("docs")
    # -W: a warning fails the build, as in CI; the inventories are local files (no network)
    run = subprocess.run([sys.executable, "-m", "sphinx", "-q", "-W", "-b", "html", str(ROOT / "docs"), str(out_dir)],
                         capture_output=True, text=True, timeout=T(180))  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    return out_dir


def test_every_export_is_documented_under_its_import_name(built_docs):
    from sphinx.util.inventory import InventoryFile

    with open(built_docs / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", lambda base, uri: uri)
    documented = {name for role in ("py:class", "py:exception", "py:function") for name in _names(inventory, role)}
    missing = [name for name in juggler.__all__ if f"juggler.{name}" not in documented]
    assert not missing, f"not documented as juggler.NAME: {missing}"
    exceptions = set(_names(inventory, "py:exception"))
    assert {"juggler.CallExpired", "juggler.ConnectionClosed", "juggler.RemoteError"} <= exceptions


def _names(inventory, role):
    data = inventory.data if hasattr(inventory, "data") else inventory  # Sphinx >= 8.2 / older
    return list(data.get(role, {}))


def test_links_reach_the_standard_library_and_redis_py(built_docs):
    html = "".join(p.read_text() for p in built_docs.glob("*.html"))
    assert 'href="https://docs.python.org/3/library/concurrent.futures.html#concurrent.futures.Future"' in html
    assert 'href="https://redis.readthedocs.io/en/stable/connections.html#redis.Redis"' in html
    # a reference to an export by the name users import resolves inside the docs
    assert 'href="api.html#juggler.CallExpired"' in (built_docs / "quickstart.html").read_text()


def test_footer_has_a_copyright(built_docs):
    assert "&#169;2026, the juggler developers; BSD-3-Clause license." in (built_docs / "index.html").read_text()
