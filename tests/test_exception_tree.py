"""Every public exception juggler defines is in the JugglerError tree of juggler/exceptions.py."""

import importlib
import inspect
import pkgutil
import re

import juggler
from juggler import exceptions

__all__: list[str] = []

def _exception_classes():
    for info in pkgutil.walk_packages(juggler.__path__, "juggler."):
        if info.name.endswith("__main__"):  # runs the command line when imported
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                yield f"{module.__name__}.{name}", obj


def test_public_exceptions_are_juggler_errors_defined_in_one_place():
    stray = {
        path
        for path, cls in _exception_classes()
        if not cls.__name__.startswith("_")
        and (cls.__module__ != "juggler.exceptions" or not issubclass(cls, juggler.JugglerError))
    }
    assert stray == set(), "make these private, or put them in juggler/exceptions.py under JugglerError"


def test_the_tree_in_the_docstring_has_every_exception_and_all_are_exported():
    tree = exceptions.__doc__.split("::", 1)[1].split("\n\n", 2)[1]
    drawn = re.findall(r"^[ │├└─]*([A-Z]\w+)", tree, re.M)
    assert sorted(drawn) == sorted(exceptions.__all__)
    assert set(exceptions.__all__) <= set(juggler.__all__)
