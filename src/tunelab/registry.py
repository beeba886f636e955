"""One name -> class table, filled by a class decorator: methods, objectives and continual strategies."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """`@table.register("dpo", paper="https://...")` sets `cls.name` / `cls.paper` and files the class.

    `kind` names what is registered in errors: "unknown method 'x'; known: a, b".
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, T] = {}

    def register(self, name: str, paper: str | None = None) -> Callable[[T], T]:
        def wrap(cls: T) -> T:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            cls.name, cls.paper = name, paper
            self._classes[name] = cls
            return cls

        return wrap

    def get(self, name: str) -> T:
        if name not in self._classes:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._classes))}")
        return self._classes[name]

    def sorted(self) -> dict[str, T]:
        return dict(sorted(self._classes.items()))

    def __contains__(self, name: str) -> bool:
        return name in self._classes
