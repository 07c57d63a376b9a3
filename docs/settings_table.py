"""Writes docs/settings.inc, the table of every `juggler` setting, from juggler.config.

    python docs/settings_table.py      (tests/test_cli.py checks the file is up to date)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from juggler.config import COMMANDS, SETTINGS  # noqa: E402

OUT = Path(__file__).resolve().parent / "settings.inc"


def render() -> str:
    header = ("flag", "environment", "file key", "default", "commands", "meaning")
    rows = []
    for name, s in SETTINGS.items():
        negated = s.switch and s.default
        flag = f"``--no-{s.flag[2:]}``" if negated else f"``{s.flag}``"
        default = "none" if s.default is None else str(s.default).lower() if isinstance(s.default, bool) else str(s.default)
        commands = ", ".join(c for c, names in COMMANDS.items() if name in names)
        rows.append((flag, f"``{s.env_var}``", f"``{name}``", default, commands, s.help.replace("*", "\\*")))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([*lines, rule]) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
