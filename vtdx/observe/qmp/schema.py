"""Command table entries: a command's name, its arguments and the function that answers.

``query-commands``, ``query-vtdx-help`` and every argument check are generated from these
entries, so a command is declared once. Argument errors use QEMU's wording ("Parameter 'x'
is missing", "Invalid parameter type for 'x', expected: integer").
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vtdx.observe.answers import ArgHelp
from vtdx.observe.qmp.errors import QmpError

#: A command's implementation: keyword arguments as checked by its ``Arg`` entries. A
#: coroutine function runs on the event loop; a plain function in a worker thread.
Handler = Callable[..., object]


def type_error(name: str, expected: str) -> QmpError:
    return QmpError(f"Invalid parameter type for '{name}', expected: {expected}")


def as_int(name: str, value: object) -> int:
    """An integer argument; also a string such as ``"0x1b090c"`` (see ``Arg``)."""
    if isinstance(value, bool):
        raise type_error(name, "integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.replace("_", ""), 0)
        except ValueError:
            pass
    raise type_error(name, "integer")


def as_number(name: str, value: object) -> float | int:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise type_error(name, "number") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise type_error(name, "number")
    return value


@dataclass(frozen=True, slots=True)
class Arg:
    """One command argument: its JSON type and how to check it.

    ``type`` is ``int``, ``number``, ``bool``, ``str`` or ``any``; another name (``leaf``,
    ``status``...) documents a domain type whose ``convert`` does the checking and raises
    QmpError. ``int`` also accepts a string such as ``"0x1b090c"``: qmp-shell passes
    anything that is not a decimal literal as a string, and addresses are written in hex.
    """

    name: str
    type: str
    doc: str = ""
    optional: bool = False
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    convert: Callable[[object], object] | None = None

    def check(self, value: object) -> object:
        if self.convert is not None:
            return self.convert(value)
        if self.type == "int":
            value = as_int(self.name, value)
        elif self.type == "number":
            value = as_number(self.name, value)
        elif self.type == "bool":
            if not isinstance(value, bool):
                raise type_error(self.name, "boolean")
        elif self.type == "str":
            if not isinstance(value, str):
                raise type_error(self.name, "string")
            if self.choices and value not in self.choices:
                raise QmpError(f"Parameter '{self.name}' does not accept value '{value}'"
                               f" (one of: {', '.join(self.choices)})")
        if isinstance(value, int | float):
            if self.minimum is not None and value < self.minimum:
                raise QmpError(f"Parameter '{self.name}' must be >= {self.minimum:g}")
            if self.maximum is not None and value > self.maximum:
                raise QmpError(f"Parameter '{self.name}' must be <= {self.maximum:g}")
        return value

    def describe(self) -> ArgHelp:
        d: ArgHelp = {"name": self.name, "type": self.type, "optional": self.optional}
        if self.doc:
            d["doc"] = self.doc
        if self.choices:
            d["choices"] = list(self.choices)
        return d


@dataclass(frozen=True, slots=True)
class Command:
    """A QMP command: name, argument spec and the function that answers it.

    Synchronous handlers run in a worker thread: they take the module mutex, which a
    SEAMCALL in flight may hold for a moment, and the event loop must keep serving.
    """

    name: str
    handler: Handler
    doc: str = ""
    args: tuple[Arg, ...] = ()

    def bind(self, arguments: Mapping[str, object]) -> dict[str, object]:
        """Checked keyword arguments for the handler, or QmpError."""
        known = {a.name: a for a in self.args}
        for key in arguments:
            if key not in known:
                raise QmpError(f"Parameter '{key}' is unexpected")
        out: dict[str, object] = {}
        for a in self.args:
            if a.name in arguments:
                out[a.name] = a.check(arguments[a.name])
            elif not a.optional:
                raise QmpError(f"Parameter '{a.name}' is missing")
        return out

    async def run(self, arguments: Mapping[str, object]) -> object:
        """The command's ``return`` value (``{}`` for a handler returning None)."""
        kwargs = self.bind(arguments)
        if inspect.iscoroutinefunction(self.handler):
            result = await self.handler(**kwargs)
        else:
            result = await asyncio.to_thread(self.handler, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        return {} if result is None else result
