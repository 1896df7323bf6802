"""A tiny name -> implementation registry.

Metrics, healing methods and architecture adapters are each one registered unit, so adding one
touches one file: the module defines the class and decorates it with ``@REGISTRY.register("name")``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from layerprune.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps user-facing names to implementations and explains unknown names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UsageError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """The names, sorted: what help texts and error messages list."""
        return sorted(self._items)

    def registered(self) -> list[tuple[str, T]]:
        """``(name, unit)`` pairs in the order they were registered: an order a package chose on purpose
        (e.g. the cheap selection strategies before the re-scoring one)."""
        return list(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def import_package_modules(package: str, path: list[str]) -> None:
    """Import every module of ``package`` (its ``__path__``), so that a unit registers itself by
    existing: adding a metric or a healing method is one new file, with no list to extend."""
    for module in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        importlib.import_module(f"{package}.{module.name}")
