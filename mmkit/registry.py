"""Registries: a name -> object (or lazy ``"module:attr"`` string) map with helpful errors.

Methods, metrics, benchmarks, model kinds, backends, optimisers and schedulers live in
registries, filled where the thing is defined; plugins register from their own modules.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar

from mmkit.errors import MmkitError, suggest

T = TypeVar("T")


class Registry(dict):
    """A dict from name to an object or a lazy ``"module:attr"`` string, resolved on lookup."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def register(self, name: str, obj: Any = None) -> Any:
        """``reg.register("x", obj)``, or ``@reg.register("x")`` as a decorator."""
        if obj is not None:
            self[name] = obj
            return obj

        def decorate(fn: Callable[..., T]) -> Callable[..., T]:
            self[name] = fn
            return fn

        return decorate

    def resolve(self, name: str, field: str | None = None) -> Any:
        """The registered object; an unknown name is an :class:`MmkitError` suggesting the closest."""
        if name not in self:
            raise MmkitError(f"unknown {self.what} {name!r}{suggest(name, self)}; "
                             f"known: {', '.join(sorted(self))}", field=field)
        obj = self[name]
        if isinstance(obj, str):
            obj = import_string(obj)
            self[name] = obj
        return obj


def import_string(spec: str) -> Any:
    """Import ``"package.module:attr"`` (or just a module)."""
    module, _, attr = spec.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj


def load_plugins(modules: list[str]) -> None:
    """Import user modules that register methods, benchmarks or model kinds (``--plugin``)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise MmkitError(f"cannot import plugin module {name!r}: {exc}", field="--plugin") from exc
