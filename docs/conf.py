import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "juggler"
author = "the juggler developers"
copyright = "2026, the juggler developers; BSD-3-Clause license"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.intersphinx"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
html_theme = "alabaster"
exclude_patterns = ["_build", "_inventories", "settings.inc"]

# Links to the standard library and redis-py. Their inventories are files in _inventories
# (README.txt there says where each comes from): the build needs no network (CI has none)
# and cannot fail, or link differently, because a site is down.
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", "_inventories/python.inv"),
    "redis": ("https://redis.readthedocs.io/en/stable", "_inventories/redis-py.inv"),
}
