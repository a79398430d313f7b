"""Frozen value classes that cost next to nothing to define.

``@dataclass(frozen=True)`` compiles six methods per class with ``exec``: with the two dozen
classes of the model and the configuration that was ~8 ms of every start, more than all the
rest of our code (see docs/speed.md). :func:`record` gives the same behaviour from one shared,
already compiled implementation of each method: the class is still a dataclass
(``dataclasses.fields``/``replace``/``asdict`` and ``match`` work), instances compare and hash
by value, print like dataclasses, and refuse attribute assignment.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar, dataclass_transform

_Class = TypeVar("_Class", bound=type)


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    cls = type(self)
    names, defaults = cls.__record_fields__
    if len(args) > len(names):
        raise TypeError(f"{cls.__name__}() takes {len(names)} arguments but {len(args)} were given")
    values = dict(zip(names, args, strict=False))
    for name in names[len(args):]:
        if name in kwargs:
            values[name] = kwargs.pop(name)
        elif name in defaults:
            values[name] = defaults[name]()
        else:
            raise TypeError(f"{cls.__name__}() missing required argument {name!r}")
    if kwargs:
        raise TypeError(f"{cls.__name__}() got unexpected or repeated arguments {sorted(kwargs)}")
    # Frozen: write the instance dict directly, as dataclasses do through object.__setattr__.
    self.__dict__.update(values)
    post_init = getattr(self, "__post_init__", None)
    if post_init is not None:
        post_init()


def _eq(self: Any, other: Any) -> bool:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return self.__dict__ == other.__dict__


def _hash(self: Any) -> int:
    return hash(tuple(self.__dict__.values()))


def _repr(self: Any) -> str:
    fields = ", ".join(f"{name}={value!r}" for name, value in self.__dict__.items())
    return f"{type(self).__qualname__}({fields})"


def _setattr(self: Any, name: str, value: Any) -> None:
    raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")


def _delattr(self: Any, name: str) -> None:
    raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")


_METHODS = {
    "__init__": _init,
    "__eq__": _eq,
    "__hash__": _hash,
    "__repr__": _repr,
    "__setattr__": _setattr,
    "__delattr__": _delattr,
}


def _default_maker(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory
    value = field.default
    return lambda: value


@dataclass_transform(frozen_default=True)
def record(cls: _Class) -> _Class:
    """``@dataclass(frozen=True)``, without compiling code for each class."""
    if cls.__doc__ is None:
        # dataclasses would build this from inspect.signature(), which parses text: slow.
        cls.__doc__ = f"{cls.__name__}({', '.join(cls.__annotations__)})"
    cls = dataclasses.dataclass(init=False, repr=False, eq=False)(cls)
    fields = dataclasses.fields(cls)
    names = tuple(field.name for field in fields)
    defaults = {
        field.name: _default_maker(field)
        for field in fields
        if field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
    }
    cls.__record_fields__ = (names, defaults)  # type: ignore[attr-defined]
    for name, method in _METHODS.items():
        if name not in cls.__dict__:
            setattr(cls, name, method)
    return cls
