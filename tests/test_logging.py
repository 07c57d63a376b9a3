"""Logger names: each module logs to its own (``__name__``), and docs/logging.rst lists them all."""

import ast
import re
from pathlib import Path

import juggler

PACKAGE = Path(juggler.__file__).parent
DOC = PACKAGE.parent / "docs" / "logging.rst"
CHANNELS = {"juggler.messages"}  # log_messages(): a channel of its own, documented as such


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _logger_names() -> dict[str, set[str]]:
    """For each module that logs, the names it passes to ``logging.getLogger``."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr != "getLogger" or not node.args:  # getLogger(): the root, not a name
                continue
            arg = node.args[0]
            if isinstance(arg, ast.Name) and arg.id == "__name__":
                name = module
            else:
                assert isinstance(arg, ast.Constant), f"{module}: getLogger({ast.unparse(arg)})"
                name = arg.value
            found.setdefault(module, set()).add(name)
    return found


def test_modules_log_to_their_own_logger():
    borrowed = {m: names - {m} - CHANNELS for m, names in _logger_names().items() if names - {m} - CHANNELS}
    assert not borrowed, f"log to logging.getLogger(__name__), not another module's logger: {borrowed}"


def test_the_docs_list_every_logger_and_no_other():
    used = set().union(*_logger_names().values())
    assert {"juggler.server", "juggler.callee", "juggler.client", "juggler.messages"} <= used
    listed = set(re.findall(r"^``(juggler[a-z_.]*)``", DOC.read_text(), re.M))
    assert used - listed == set(), "add these loggers to docs/logging.rst"
    assert listed - used == set(), "docs/logging.rst lists loggers that nothing logs to"
