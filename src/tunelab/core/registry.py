"""One name -> class table for every plug-in kind: methods, objectives, continual strategies, selection
scorers and selectors.

A table knows the package its plug-ins live in and imports every module of it (not starting with `_`) the
first time a name is looked up, so adding a plug-in is one new file with a decorator; nothing lists modules.
An unknown name raises `UnknownName` (one error type the CLI reports as a clean message).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, TypeVar

T = TypeVar("T", bound=type)


class UnknownName(KeyError):
    """A registry was asked for a name it does not have; the message lists the known names.

    A KeyError (callers that look names up may catch that), but its own type, so the CLI reports exactly this
    and lets other KeyErrors (bugs) through as tracebacks."""

    def __str__(self) -> str:  # KeyError would repr() the message; this reads as a sentence
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """`@table.register("dpo", paper="https://...")` sets `cls.name` / `cls.paper` and files the class.

    `kind` names what is registered in errors ("unknown method 'x'; known: a, b"); `package` (a dotted
    module path) is imported module by module on first lookup, which runs the plug-ins' decorators;
    `skip` names modules of that package that hold no plug-ins (the base class, say).
    """

    def __init__(self, kind: str, package: str | None = None, skip: tuple[str, ...] = ()):
        self.kind, self.package, self.skip = kind, package, skip
        self._classes: dict[str, T] = {}
        self._discovered = package is None

    def register(self, name: str, paper: str | None = None) -> Callable[[T], T]:
        def wrap(cls: T) -> T:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            setattr(cls, "name", name)  # every plug-in class carries its registered name and paper
            setattr(cls, "paper", paper)
            self._classes[name] = cls
            return cls

        return wrap

    def discover(self) -> None:
        """Import every plug-in module of `package` once (their decorators fill the table)."""
        if self._discovered or self.package is None:
            return
        self._discovered = True
        pkg = importlib.import_module(self.package)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if not info.name.startswith("_") and info.name not in self.skip:
                importlib.import_module(f"{self.package}.{info.name}")

    def get(self, name: str) -> T:
        self.discover()
        if name not in self._classes:
            raise UnknownName(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._classes))}")
        return self._classes[name]

    def sorted(self) -> dict[str, T]:
        self.discover()
        return dict(sorted(self._classes.items()))

    def __contains__(self, name: str) -> bool:
        self.discover()
        return name in self._classes
