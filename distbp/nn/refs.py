"""Registries of layer and loss classes, and `module:Name` references to classes in user modules."""
from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys

_REF = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*)$")
_file_loading: str | None = None  # set while a file's config is read: no module is imported for it


@contextlib.contextmanager
def no_imports(source: str):
    """In the block, a reference to a module not imported yet is an error: loading source never runs code."""
    global _file_loading
    before, _file_loading = _file_loading, source
    try:
        yield
    finally:
        _file_loading = before


def add(registry: dict, name: str, cls: type, what: str) -> type:
    """registry[name] = cls; a name taken by another class is an error (the same class again replaces it)."""
    old = registry.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"{what} type {name!r} registered twice ({old.__module__}.{old.__qualname__} and "
                         f"{cls.__module__}.{cls.__qualname__}); register yours under another name")
    registry[name] = cls
    return cls


def module_of(ref) -> str | None:
    """The module a `module:Name` reference names, None for a plain registered name."""
    m = _REF.match(ref) if isinstance(ref, str) else None
    return m.group(1) if m else None


def lookup(ref, registry: dict, what: str, decorator: str) -> type:
    """The class a registered name or a `module:Name` reference means (importing the module); else a
    ValueError whose message follows the reference ("'x' is not one of ...")."""
    if ref in registry:
        return registry[ref]
    module = module_of(ref)
    if module is None:
        raise ValueError(f"is not one of {', '.join(sorted(registry))}, or module:ClassName of a {what} "
                         "registered in your own module")
    name = ref.split(":")[1]
    if _file_loading and module not in sys.modules:
        raise ValueError(f"is in module {module}, which distbp does not import for {_file_loading} (loading "
                         f"a file never runs code); HINT: import {module} in Python first, then distbp.load")
    if os.getcwd() not in sys.path:  # `type = "mylayers:Swish"` finds ./mylayers.py, as `python -m` would
        sys.path.append(os.getcwd())
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
            raise  # the user's module itself imports something missing: its own traceback says what
        raise ValueError(f"names module {module}, which is not in the current directory or on "
                         "PYTHONPATH") from None
    cls = getattr(mod, name, None)
    if cls is None or cls not in registry.values():
        raise ValueError(f"names no registered {what} class: decorate {name} in {module} with "
                         f"@{decorator}(\"{name.lower()}\")")
    return cls
