"""Named plug-in classes (feature maps, recurrences): registered by name, or loaded as
``"package.module:ClassName"``, with their options checked against ``__init__``."""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Generic, TypeVar

from .errors import DistillError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """``kind`` names the plug-in in messages ("feature map"); ``base`` is the class every entry
    subclasses, ``base_path`` its import path as users write it; ``fixed`` are the ``__init__``
    parameters the caller supplies (never user options)."""

    def __init__(self, kind: str, base: T, base_path: str, fixed: tuple[str, ...]):
        self.kind, self.base, self.base_path, self.fixed = kind, base, base_path, {"self", *fixed}
        self.classes: dict[str, T] = {}

    def register(self, name: str):
        """Class decorator: ``@registry.register("mine")``; sets ``cls.name``. Duplicates are refused."""

        def wrap(cls: T) -> T:
            if name in self.classes:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self.classes[name].__qualname__})")
            if not (inspect.isclass(cls) and issubclass(cls, self.base)):
                raise TypeError(f"{cls!r} must subclass {self.base_path}")
            self.classes[name] = cls
            cls.name = name
            return cls

        return wrap

    def resolve(self, name: str) -> T:
        """A registered name, or ``"package.module:ClassName"``; a one-line error otherwise."""
        if ":" in name:
            module_name, _, attr = name.partition(":")
            try:
                cls = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as err:
                raise DistillError(f"cannot load {self.kind} {name!r} ({err}); check the module:Class path") from None
            if not (inspect.isclass(cls) and issubclass(cls, self.base)):
                raise DistillError(f"{self.kind} {name!r} must be a subclass of {self.base_path}")
            return cls
        if name not in self.classes:
            raise DistillError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self.classes))} "
                "(or give 'package.module:ClassName')"
            )
        return self.classes[name]

    def check_options(self, name: str, cls: T, kwargs: dict[str, Any]) -> None:
        """Refuse options that ``cls.__init__`` does not take, listing the ones it does."""
        accepted = set(inspect.signature(cls.__init__).parameters) - self.fixed
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise DistillError(
                f"{self.kind} {name!r} does not take {', '.join(unknown)}; it takes: {', '.join(sorted(accepted)) or 'nothing'}"
            )
