"""Exceptions of the QMP monitor layer, and the QMP error classes they map to."""

from __future__ import annotations

import enum


class ErrorClass(enum.StrEnum):
    """The ``class`` member of a QMP error response, as QEMU names them.

    Almost everything is ``GenericError``; QEMU keeps the other classes only
    for compatibility, and so do we.
    """

    GENERIC_ERROR = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_ACTIVE = "DeviceNotActive"
    DEVICE_NOT_FOUND = "DeviceNotFound"


class QmpError(Exception):
    """Base class of every error raised by :mod:`vsmmu.qmp`."""


class QmpCommandError(QmpError):
    """Raised by a command handler to fail the command with a message for the client.

    The monitor answers ``{"error": {"class": error_class, "desc": str(self)}}``.
    Write the message for the person at the other end: name the object, the
    value and what was expected (``"StreamID 0x40 is out of range (0..0x3f)"``).
    """

    def __init__(self, desc: str, error_class: ErrorClass = ErrorClass.GENERIC_ERROR) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


class QmpTransportError(QmpError):
    """The monitor's socket could not be set up or a client broke the framing."""


class QmpFramingError(QmpTransportError):
    """A client's input cannot be split into messages (too long, nested too deep).

    The stream cannot be resynchronised after this; the connection is closed.
    """
