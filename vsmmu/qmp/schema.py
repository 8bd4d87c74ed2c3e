"""A tiny declarative schema for QMP command arguments.

A command declares its arguments as a sequence of :class:`Arg`; the monitor
checks a request's ``arguments`` object against it before the handler runs,
so a handler only ever sees present, well-typed arguments.  The error texts
are QEMU's (``qapi/qobject-input-visitor.c``), so a client written against
QEMU reads ours the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from vsmmu.qmp.errors import QmpCommandError, QmpError

# QAPI integers are int64 or uint64; accepting the union lets 64-bit
# addresses through while refusing values no QEMU client could send.
QAPI_INT_MIN: Final = -(1 << 63)
QAPI_INT_MAX: Final = (1 << 64) - 1

#: The Python types an argument may declare, with the name QEMU uses for each
#: in "Invalid parameter type" messages.
JSON_TYPE_NAMES: Final[Mapping[type, str]] = {
    str: "string",
    int: "integer",
    bool: "boolean",
    list: "array",
    dict: "object",
}


@dataclass(frozen=True)
class Arg:
    """One argument of a QMP command.

    :param name: the member name in ``arguments``.
    :param type: ``str``, ``int``, ``bool``, ``list`` or ``dict``.
    :param optional: when true the argument may be absent; the handler then
        finds no key for it (use ``args.get(name, default)``).
    """

    name: str
    type: type
    optional: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise QmpError("argument name is empty; expected a non-empty string")
        if self.type not in JSON_TYPE_NAMES:
            allowed = ", ".join(t.__name__ for t in JSON_TYPE_NAMES)
            raise QmpError(
                f"argument {self.name!r} declares type {self.type!r}; expected one of {allowed}"
            )


def check_arg_specs(command: str, specs: Sequence[Arg]) -> None:
    """Raise :class:`QmpError` if ``specs`` declares one argument name twice."""
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise QmpError(f"command {command!r} declares argument {spec.name!r} twice")
        seen.add(spec.name)


def _has_type(value: object, expected: type) -> bool:
    # bool is a subclass of int in Python but not in JSON: keep them apart.
    if expected is int:
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and QAPI_INT_MIN <= value <= QAPI_INT_MAX
        )
    return isinstance(value, expected)


def validate_arguments(specs: Sequence[Arg], arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``arguments`` against ``specs`` and return them as a new dict.

    Members are checked in declaration order, then unknown members, as QEMU's
    input visitor does, so the first error reported matches QEMU's.

    :raise QmpCommandError: ``Parameter 'x' is missing``, ``Invalid parameter
        type for 'x', expected: integer`` or ``Parameter 'x' is unexpected``.
    """
    for spec in specs:
        if spec.name not in arguments:
            if spec.optional:
                continue
            raise QmpCommandError(f"Parameter '{spec.name}' is missing")
        if not _has_type(arguments[spec.name], spec.type):
            raise QmpCommandError(
                f"Invalid parameter type for '{spec.name}', expected: {JSON_TYPE_NAMES[spec.type]}"
            )
    declared = {spec.name for spec in specs}
    for name in arguments:
        if name not in declared:
            raise QmpCommandError(f"Parameter '{name}' is unexpected")
    return dict(arguments)
