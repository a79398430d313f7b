"""Value classes that cost next to nothing to define: dataclasses without the start-up bill.

``@dataclass(frozen=True)`` compiles six methods per class with ``exec``, and importing
``dataclasses`` and processing a class cost more again: with the two dozen classes of the model
and the configuration that was ~10 ms of every start, more than all the rest of our code
(docs/speed.md). :func:`record` gives the same behaviour from one shared, already compiled
implementation of each method: keyword or positional construction with defaults, ``match``
arguments, value equality (and hashing when frozen), dataclass-style ``repr``, and refusal of
attribute assignment when frozen. ``dataclasses.fields``/``replace``/``asdict`` work too: the
dataclass metadata is built the first time something asks for it.

Supported: plain annotations, plain defaults, and :func:`factory` for mutable defaults.
Not supported (use ``@dataclass``): ``ClassVar``/``InitVar``, ``field()`` options, inheritance
between records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, dataclass_transform, overload

_Class = TypeVar("_Class", bound=type)
_Value = TypeVar("_Value")


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


def factory(make: Callable[[], _Value]) -> _Value:
    """A default made afresh for each instance, as ``field(default_factory=make)``."""
    return _Factory(make)  # type: ignore[return-value]


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    cls = type(self)
    names, defaults = cls.__record_fields__
    if len(args) > len(names):
        raise TypeError(f"{cls.__name__}() takes {len(names)} arguments but {len(args)} were given")
    values = dict(zip(names, args, strict=False))
    for name in names[len(args) :]:
        if name in kwargs:
            values[name] = kwargs.pop(name)
        elif name in defaults:
            values[name] = defaults[name]()
        else:
            raise TypeError(f"{cls.__name__}() missing required argument {name!r}")
    if kwargs:
        raise TypeError(f"{cls.__name__}() got unexpected or repeated arguments {sorted(kwargs)}")
    # Written straight into the instance dict, as dataclasses do through object.__setattr__.
    self.__dict__.update(values)


def _eq(self: Any, other: Any) -> bool:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return self.__dict__ == other.__dict__


def _hash(self: Any) -> int:
    return hash(tuple(self.__dict__.values()))


def _repr(self: Any) -> str:
    fields = ", ".join(f"{name}={value!r}" for name, value in self.__dict__.items())
    return f"{type(self).__qualname__}({fields})"


def _frozen_error(name: str) -> Exception:
    import dataclasses

    return dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")


def _setattr(self: Any, name: str, value: Any) -> None:
    raise _frozen_error(name)


def _delattr(self: Any, name: str) -> None:
    raise _frozen_error(name)


class _DataclassFields:
    """``__dataclass_fields__``, built (and cached on the class) the first time it is read."""

    def __get__(self, instance: Any, owner: type) -> Any:
        import dataclasses

        names, defaults = owner.__record_fields__
        namespace: dict[str, Any] = {"__annotations__": {name: owner.__annotations__[name] for name in names}}
        for name, make in defaults.items():
            namespace[name] = dataclasses.field(default_factory=make)
        fields = dataclasses.dataclass(type(owner.__name__, (), namespace)).__dataclass_fields__
        type.__setattr__(owner, "__dataclass_fields__", fields)
        return fields


def _constant(value: Any) -> Callable[[], Any]:
    return lambda: value


@overload
def record(cls: _Class, /) -> _Class: ...
@overload
def record(*, frozen: bool = True) -> Callable[[_Class], _Class]: ...
@dataclass_transform(frozen_default=True, field_specifiers=(factory,))
def record(cls: Any = None, /, *, frozen: bool = True) -> Any:
    """``@dataclass(frozen=True)`` (or ``@record(frozen=False)``: ``@dataclass``), without compiling code."""
    if cls is None:
        return lambda cls: record(cls, frozen=frozen)
    # The class's own annotations, read directly: inspect.get_annotations would import inspect.
    names = tuple(cls.__dict__.get("__annotations__", {}))  # noqa: RUF063
    defaults: dict[str, Callable[[], Any]] = {}
    for name in names:
        if name in cls.__dict__:
            value = cls.__dict__[name]
            defaults[name] = value.make if isinstance(value, _Factory) else _constant(value)
            if isinstance(value, _Factory):
                delattr(cls, name)
    cls.__record_fields__ = (names, defaults)
    cls.__match_args__ = names
    cls.__dataclass_fields__ = _DataclassFields()
    if cls.__doc__ is None:
        cls.__doc__ = f"{cls.__name__}({', '.join(names)})"
    methods: dict[str, Any] = {"__init__": _init, "__eq__": _eq, "__repr__": _repr}
    if frozen:
        methods |= {"__hash__": _hash, "__setattr__": _setattr, "__delattr__": _delattr}
    else:
        methods["__hash__"] = None  # mutable and compared by value: unhashable, as a dataclass
    for name, method in methods.items():
        if name not in cls.__dict__:
            setattr(cls, name, method)
    return cls
