import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "juggler"
author = "the juggler developers"
extensions = ["sphinx.ext.autodoc"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
html_theme = "alabaster"
exclude_patterns = ["_build", "settings.inc"]
