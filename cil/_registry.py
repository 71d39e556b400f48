"""A name -> factory registry, like timm's ``register_model``.

Built-in entries live in the top-level ``methods`` and ``streams`` packages; they are imported the first time a
registry is queried, so importing :mod:`cil` has no side effects.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Callable[..., object])


class Registry(Generic[T]):
    """Maps snake_case names to classes or factory functions.

    Args:
        kind: What is registered ("method", "stream"), used in error messages.
        builtin_package: Package whose import registers the built-in entries.
    """

    def __init__(self, kind: str, builtin_package: str) -> None:
        self.kind = kind
        self.builtin_package = builtin_package
        self._entries: dict[str, T] = {}
        self._builtins_loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``; a second registration of a name is an error."""

        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice ({self._entries[name]} and {obj})")
            self._entries[name] = obj
            return obj

        return decorator

    def _load_builtins(self) -> None:
        if not self._builtins_loaded:
            self._builtins_loaded = True
            importlib.import_module(self.builtin_package)

    def get(self, name: str) -> T:
        """Returns the entry registered as ``name``; an unknown name lists the known ones and the closest match."""
        self._load_builtins()
        if name not in self._entries:
            hint = difflib.get_close_matches(name, self._entries, n=1)
            did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
            raise KeyError(f"unknown {self.kind} {name!r}.{did_you_mean} Registered: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._entries)

    def name_of(self, obj: object) -> str | None:
        """The registered name of a class (or of an instance's class), if any."""
        self._load_builtins()
        cls = obj if isinstance(obj, type) else type(obj)
        for name, entry in self._entries.items():
            if entry is cls:
                return name
        return None
