"""The Sphinx documentation: it builds offline without a warning, every name ``juggler``
exports is documented under the name users import, and links reach the stdlib and redis-py.
Every complete Python program of README.rst and docs/ runs here, against a real redis the suite
starts on a free port where it needs one (examples/ are run by test_e2e and test_production)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import juggler

from .conftest import T, free_port
from .test_cli import ROOT, env

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


# -- every complete Python program of README.rst and docs/ runs (issue 22) -------------------------

#: The Python blocks that are not complete programs, and why; every other block is run below.
FRAGMENTS = {
    ("docs/quickstart.rst", "def on_reconnect(client, lost):"): "a pattern for a service: `url` and a loop forever",
}


def python_blocks(path: Path) -> list[str]:
    """The ``.. code-block:: python`` blocks of an rST file, dedented."""
    lines = path.read_text().splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != ".. code-block:: python":
            continue
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or lines[j].strip().startswith(":")):
            j += 1  # the directive's options and the blank line
        indent = len(lines[j]) - len(lines[j].lstrip())
        body = []
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) >= indent):
            body.append(lines[j])
            j += 1
        blocks.append(textwrap.dedent("\n".join(body)).strip() + "\n")
    return blocks


def doc_block(name: str, first_line: str) -> str:
    (block,) = [b for b in python_blocks(ROOT / name) if b.startswith(first_line)]
    return block


#: (file, first line) of each program the tests below run.
RUN = {
    ("README.rst", "import os"),
    ("README.rst", "from juggler import statesync"),
    ("docs/statesync.rst", "from juggler import statesync"),
    ("docs/testing.rst", 'pytest_plugins = ["juggler.pytest_plugin"]'),
    ("docs/testing.rst", "def add(args):"),
}


def test_every_python_block_is_run_or_named_a_fragment():
    found = set()
    for path in [ROOT / "README.rst", *sorted((ROOT / "docs").glob("*.rst"))]:
        name = str(path.relative_to(ROOT))
        for block in python_blocks(path):
            first = block.splitlines()[0]
            key = next((k for k in RUN | set(FRAGMENTS) if k[0] == name and first.startswith(k[1])), None)
            assert key is not None, f"{name}: a Python block no test runs: {first!r} (run it, or name it in FRAGMENTS)"
            found.add(key)
    assert found == RUN | set(FRAGMENTS)  # none of these went away unnoticed


def run_program(tmp_path, source: str, timeout: float = 60, **extra_env: str) -> subprocess.CompletedProcess:
    program = tmp_path / "program.py"
    program.write_text(source)
    return subprocess.run([sys.executable, str(program)], cwd=tmp_path, env=env(**extra_env), capture_output=True,
                          text=True, timeout=T(timeout))  # fmt: skip


@pytest.mark.realredis
def test_readme_example_runs_against_a_real_redis(tmp_path, redis_server):
    out = run_program(tmp_path, doc_block("README.rst", "import os"), JUGGLER_REDIS_URL=redis_server.url)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout == "[1, 2] news.today {'title': 'x'}\n"


def test_readme_example_ends_at_once_with_one_line_when_redis_is_not_there(tmp_path):
    url = f"redis://127.0.0.1:{free_port()}/0"
    out = run_program(tmp_path, doc_block("README.rst", "import os"), timeout=30, JUGGLER_REDIS_URL=url)
    assert out.returncode == 1
    assert out.stderr == f"no redis at {url}: start redis-server, or set JUGGLER_REDIS_URL\n"


def test_readme_statesync_example_prints_what_its_comments_say(tmp_path):
    out = run_program(tmp_path, doc_block("README.rst", "from juggler import statesync"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout == "server data: {'count': 0}\nclient data: {'a': [1, 2]}\n"


def test_statesync_docs_example_runs_and_its_callback_prints(tmp_path):
    out = run_program(tmp_path, doc_block("docs/statesync.rst", "from juggler import statesync"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(out.stdout.splitlines()) == ["got {'any': 'json'}", "server data: {'count': 0}"]


def test_testing_docs_example_passes_with_the_plugin_loaded_as_it_says(tmp_path):
    (tmp_path / "conftest.py").write_text(doc_block("docs/testing.rst", 'pytest_plugins = ["juggler.pytest_plugin"]'))
    (tmp_path / "test_example.py").write_text(doc_block("docs/testing.rst", "def add(args):"))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"],
                         cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=T(120))  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 passed" in out.stdout


def test_the_docs_no_longer_say_what_the_code_contradicts():
    """Sentences issue 22 found false, each with what the code does."""
    text = " ".join(" ".join(p.read_text().split()) for p in [ROOT / "README.rst", *(ROOT / "docs").glob("*.rst")])
    false = {
        "every websocket connection that may SUB has its own redis pub-sub connection": "one per server",
        "Each websocket's pub-sub connection": "one per server",
        "juggler does not send keep-alive messages of its own": "the server pings (--ping-interval, 30 s)",
        "does not reconnect on its own": "Client.connect(url, reconnect=True)",
        'connect("/ws", { reconnect: true }); // the page\'s own server': "a juggler server serves no user pages",
    }
    assert [claim for claim in false if claim in text] == []
    from juggler.config import SETTINGS

    assert SETTINGS["ping_interval"].default == 30.0  # what docs/deployment.rst now says
