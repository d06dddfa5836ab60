"""Names a package imports on first access rather than with the package (PEP 562)."""

import importlib
import sys
from typing import Callable, Dict, List, Tuple

__all__ = ["deferred_names"]


def deferred_names(
    package: str, names: Dict[str, str]
) -> Tuple[Callable[[str], object], Callable[[], List[str]]]:
    """
    The module ``__getattr__`` and ``__dir__`` of ``package`` that import each of ``names`` from
    its submodule when it is first asked for (``from package import name`` included).

    Args:
        package (str): the package's ``__name__``.
        names (dict[str, str]): name -> submodule of ``package`` that defines it.

    Returns:
        tuple: ``(__getattr__, __dir__)``, to be assigned in the package's ``__init__``.
    """

    def __getattr__(name: str) -> object:
        if name in names:
            return getattr(importlib.import_module(f".{names[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> List[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__
