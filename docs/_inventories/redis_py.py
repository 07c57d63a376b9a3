"""Writes redis-py.inv: the Sphinx inventory of the redis-py names juggler's docs link to.

    python docs/_inventories/redis_py.py

redis-py's own objects.inv (https://redis.readthedocs.io/en/stable/objects.inv) holds these
and many more; the docs build runs without network, so it uses this file. Each name is at the
anchor redis-py's documentation gives it: its connections page documents the clients and
connection classes with ``autoclass`` (``connections.html#redis.Redis``), its exceptions page
the module redis.exceptions with ``automodule``. Add a name here when the docs link to one more.
"""

from __future__ import annotations

import zlib
from pathlib import Path

NAMES = [
    # (name, role, page)
    ("redis.Redis", "py:class", "connections.html"),
    ("redis.cluster.RedisCluster", "py:class", "connections.html"),
    ("redis.connection.Connection", "py:class", "connections.html"),
    ("redis.connection.ConnectionPool", "py:class", "connections.html"),
    ("redis.exceptions.RedisError", "py:exception", "exceptions.html"),
    ("redis.exceptions.ConnectionError", "py:exception", "exceptions.html"),
    ("redis.exceptions.TimeoutError", "py:exception", "exceptions.html"),
    ("redis.exceptions.ResponseError", "py:exception", "exceptions.html"),
]

OUT = Path(__file__).resolve().parent / "redis-py.inv"


def render() -> bytes:
    header = "# Sphinx inventory version 2\n# Project: redis-py\n# Version: \n"
    header += "# The remainder of this file is compressed using zlib.\n"
    body = "".join(f"{name} {role} 1 {page}#$ -\n" for name, role, page in NAMES)
    return header.encode() + zlib.compress(body.encode())


if __name__ == "__main__":
    OUT.write_bytes(render())
    print(f"wrote {OUT}")
