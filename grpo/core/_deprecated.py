"""Old names that stay importable after a rename, each warning where it is used."""

from __future__ import annotations

import importlib
import warnings


def renamed(module: str, aliases: dict[str, str]):
    """A module ``__getattr__`` that resolves each old name of ``module`` to its new home.

    Args:
        module: the module's ``__name__``.
        aliases: ``{old_name: "package.module.new_name"}``.

    Returns:
        ``__getattr__(name)``: the new object, with a ``DeprecationWarning`` naming it.
    """

    def __getattr__(name: str):
        if name not in aliases:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target = aliases[name]
        where, _, new = target.rpartition(".")
        warnings.warn(
            f"{module}.{name} is deprecated; use {target}", DeprecationWarning, stacklevel=2
        )
        return getattr(importlib.import_module(where), new)

    return __getattr__
