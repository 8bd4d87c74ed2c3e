"""The vfio-user protocol layer: one request in, at most one reply out.

:class:`Session` holds what one connection negotiated and turns each request
into calls on a :class:`~vsmmu.vfio_user.device.PciFunction`.  It is
synchronous and knows no sockets, so it is tested (and fuzzed) directly.
Every refusal is a :class:`CommandError` turned into an error reply with its
errno and one log line; a request flagged NO_REPLY is never answered, even
when it fails.  Descriptors are either given to the device/DMA table or closed
before :meth:`Session.handle` returns.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import struct
from collections.abc import Callable

from vsmmu.vfio_user import uapi
from vsmmu.vfio_user.device import BarRegion, IrqSet, PciFunction
from vsmmu.vfio_user.messages import (
    CommandError,
    Message,
    close_fds,
    error_reply_to,
)

logger = logging.getLogger(__name__)
trace = logging.getLogger(__name__ + ".trace")

_Handler = Callable[["Session", Message], bytes]

# Plain ints on the request path: every trapped guest register access passes here,
# and enum members are slow to read and to combine.
_VERSION = int(uapi.Command.VERSION)
_REQUEST = int(uapi.MSG_TYPE_REQUEST)
_NO_REPLY = int(uapi.MsgFlag.NO_REPLY)
_REQUEST_FLAGS = frozenset({_REQUEST, _REQUEST | _NO_REPLY})
"""The only flags a request may carry."""
_REPLY = int(uapi.MSG_TYPE_REPLY)
_CONFIG = int(uapi.PciRegion.CONFIG)
_DEBUG = logging.DEBUG
_REGION_RW_SIZE = uapi.REGION_RW.size
_REGION_RW_UNPACK = uapi.REGION_RW.unpack_from
_COMMAND_NAMES = {int(command): command.name for command in uapi.Command}


def _unpack(layout: struct.Struct | uapi.Layout, message: Message) -> tuple[int, ...]:
    if len(message.payload) < layout.size:
        raise CommandError(
            errno.EINVAL,
            f"{message.command_name}: payload of {len(message.payload)} bytes, "
            f"expected at least {layout.size}",
        )
    return layout.unpack_from(message.payload)


def _refuse_flags(flags: int) -> None:
    if flags & ~uapi.MSG_KNOWN_FLAGS or flags & uapi.MsgFlag.ERROR:
        raise CommandError(errno.EINVAL, f"request flags {flags:#x}: unknown bits")
    raise CommandError(errno.EINVAL, f"message type {flags:#x}: not a request")


def _no_fds(message: Message) -> None:
    if message.fds:
        raise CommandError(
            errno.EINVAL, f"{message.command_name}: {len(message.fds)} fds, expected none"
        )


class Session:
    """Protocol state of one client connection to one device."""

    def __init__(self, device: PciFunction) -> None:
        self.device = device
        self.negotiated = False
        #: What the client told us in VERSION (its own defaults until then).
        self.client_max_fds = uapi.DEFAULT_MAX_FDS
        self.client_max_xfer = uapi.DEFAULT_MAX_XFER
        self.max_xfer = uapi.DEFAULT_MAX_XFER
        #: Requests seen, by command name, plus ``"posted"`` for NO_REPLY ones
        #: and ``"refused"`` for those answered (or dropped) with an error.
        self.stats: collections.Counter[str] = collections.Counter()
        #: Descriptors the next reply carries (a region's mmap fd), owned by the function.
        self._lent_fds: list[int] = []
        self._tracing = False  # the trace logger's DEBUG, read once per request

    @property
    def max_message_size(self) -> int:
        """The largest message this session accepts."""
        return self.max_xfer + uapi.MAX_FIXED_PART

    def handle(self, message: Message) -> Message | None:
        """Process one request; return its reply, or None when none is due.

        The one path for every request, register accesses included: counted
        once, checked, handed to its command's handler, answered (or, for
        NO_REPLY, not) here.
        """
        command = message.command
        flags = message.flags
        name = _COMMAND_NAMES.get(command) or message.command_name
        self._tracing = trace.isEnabledFor(_DEBUG)
        if self._tracing:
            trace.debug("<- %s id=%d flags=%#x len=%d fds=%d", name, message.msg_id, flags,
                        len(message.payload), len(message.fds))
        stats = self.stats
        stats[name] += 1
        posted = flags & _NO_REPLY
        if posted:
            stats["posted"] += 1
        try:
            if message.fds_lost:
                raise CommandError(errno.EMFILE, f"{name}: the kernel truncated the fds sent "
                                   "with it (MSG_CTRUNC): the service may be out of "
                                   "descriptors, or too many were sent")
            if flags not in _REQUEST_FLAGS:
                _refuse_flags(flags)
            handler = _HANDLERS.get(command)
            if handler is None:
                raise CommandError(errno.ENOSYS, f"{name}: not a server command")
            if not self.negotiated and command != _VERSION:
                raise CommandError(errno.EINVAL, f"{name} before VERSION")
            payload = handler(self, message)
            error = 0
        except CommandError as exc:
            stats["refused"] += 1
            logger.warning("vfio-user %s refused (errno %d): %s", name, exc.errno, exc)
            error = exc.errno
        except Exception:
            logger.exception("vfio-user %s failed in the device", name)
            error = errno.EIO
        if message.fds:
            message.close()
        lent = self._lent_fds
        if lent:
            # Lent by the function, which keeps them open: only a success reply carries them.
            self._lent_fds = []
        if posted:
            return None
        if error:
            return error_reply_to(message, error)
        if lent:
            return Message(message.msg_id, command, _REPLY, 0, payload, lent)
        return Message(message.msg_id, command, _REPLY, 0, payload)

    # -- VERSION -----------------------------------------------------------

    def _version(self, message: Message) -> bytes:
        _no_fds(message)
        if self.negotiated:
            raise CommandError(errno.EINVAL, "VERSION: already negotiated")
        major, minor = _unpack(uapi.VERSION_BODY, message)
        if major != uapi.VERSION_MAJOR:
            raise CommandError(errno.ENOTSUP, f"VERSION {major}.{minor}: expected major 0")
        self._parse_capabilities(message.payload[uapi.VERSION_BODY.size :])
        caps: dict[str, object] = {
            uapi.CAP_MAX_FDS: uapi.SERVER_MAX_FDS,
            uapi.CAP_MAX_XFER: self.max_xfer,
            uapi.CAP_PGSIZES: uapi.DEFAULT_PGSIZE,
            uapi.CAP_MAX_DMA_MAPS: self.device.dma.max_mappings,
            uapi.CAP_WRITE_MULTIPLE: True,
        }
        body = self._version_body(caps)
        # QEMU receives the reply into its request's buffer: never send more.
        if uapi.HEADER_SIZE + len(body) > uapi.HEADER_SIZE + len(message.payload):
            body = self._version_body({})
        self.negotiated = True
        logger.info(
            "vfio-user VERSION negotiated: client max_xfer=%d max_fds=%d",
            self.client_max_xfer,
            self.client_max_fds,
        )
        return body

    @staticmethod
    def _version_body(caps: dict[str, object]) -> bytes:
        text = json.dumps({uapi.CAP_ROOT: caps}, separators=(",", ":")).encode() + b"\0"
        return uapi.VERSION_BODY.pack(uapi.VERSION_MAJOR, uapi.VERSION_MINOR) + text

    def _parse_capabilities(self, raw: bytes) -> None:
        text = raw.rstrip(b"\0")
        if not text:
            return
        try:
            document = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise CommandError(errno.EINVAL, f"VERSION capabilities: not JSON ({exc})") from exc
        caps = document.get(uapi.CAP_ROOT, {}) if isinstance(document, dict) else None
        if not isinstance(caps, dict):
            raise CommandError(errno.EINVAL, "VERSION capabilities: expected a JSON object")
        max_fds = caps.get(uapi.CAP_MAX_FDS, uapi.DEFAULT_MAX_FDS)
        max_xfer = caps.get(uapi.CAP_MAX_XFER, uapi.DEFAULT_MAX_XFER)
        for name, value in ((uapi.CAP_MAX_FDS, max_fds), (uapi.CAP_MAX_XFER, max_xfer)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CommandError(errno.EINVAL, f"VERSION {name}={value!r}: expected an int >= 0")
        self.client_max_fds = max_fds
        self.client_max_xfer = max_xfer

    # -- DMA ---------------------------------------------------------------

    def _dma_map(self, message: Message) -> bytes:
        argsz, flags, fd_offset, gpa, size = _unpack(uapi.DMA_MAP, message)
        if argsz < uapi.DMA_MAP.size:
            raise CommandError(errno.EINVAL, f"DMA_MAP argsz {argsz}: expected >= 32")
        if len(message.fds) > 1:
            raise CommandError(errno.EINVAL, f"DMA_MAP: {len(message.fds)} fds, expected 0 or 1")
        fds = message.take_fds()
        self.device.dma.map(gpa, size, flags, fds[0] if fds else None, fd_offset)
        return b""

    def _dma_unmap(self, message: Message) -> bytes:
        _no_fds(message)
        argsz, flags, gpa, size = _unpack(uapi.DMA_UNMAP, message)
        if argsz < uapi.DMA_UNMAP.size:
            raise CommandError(errno.EINVAL, f"DMA_UNMAP argsz {argsz}: expected >= 24")
        if flags & ~uapi.DMA_UNMAP_KNOWN_FLAGS or flags & uapi.DMA_UNMAP_GET_DIRTY_BITMAP:
            raise CommandError(errno.EINVAL, f"DMA_UNMAP flags {flags:#x}: unsupported")
        if flags & uapi.DMA_UNMAP_ALL:
            if gpa or size:
                raise CommandError(errno.EINVAL, "DMA_UNMAP ALL: address and size must be 0")
            self.device.dma.unmap_all()
        else:
            self.device.dma.unmap(gpa, size)
        return uapi.DMA_UNMAP.pack(uapi.DMA_UNMAP.size, flags, gpa, size)

    # -- device information ------------------------------------------------

    def _get_info(self, message: Message) -> bytes:
        _no_fds(message)
        argsz, _, _, _ = _unpack(uapi.DEVICE_INFO, message)
        if argsz < uapi.DEVICE_INFO.size:
            raise CommandError(errno.EINVAL, f"DEVICE_GET_INFO argsz {argsz}: expected >= 16")
        flags = uapi.DEVICE_FLAGS_PCI | uapi.DEVICE_FLAGS_RESET
        return uapi.DEVICE_INFO.pack(
            uapi.DEVICE_INFO.size, flags, uapi.PCI_NUM_REGIONS, uapi.PCI_NUM_IRQS
        )

    def _get_region_info(self, message: Message) -> bytes:
        _no_fds(message)
        argsz, _, index, _, _, _ = _unpack(uapi.REGION_INFO, message)
        if argsz < uapi.REGION_INFO.size:
            raise CommandError(errno.EINVAL, f"GET_REGION_INFO argsz {argsz}: expected >= 32")
        if index >= uapi.PCI_NUM_REGIONS:
            raise CommandError(errno.EINVAL, f"GET_REGION_INFO index {index}: expected < 9")
        info = self.device.region_info(index)
        flags, cap_offset, caps = info.flags, 0, info.caps
        needed = uapi.REGION_INFO.size + len(caps)
        if caps and argsz >= needed:
            flags |= uapi.REGION_INFO_FLAG_CAPS
            cap_offset = uapi.REGION_INFO.size
        else:
            # As VFIO does: argsz says how much the capabilities need, the client asks again.
            caps = b""
        if info.fd is not None:
            self._lent_fds = [info.fd]
        return uapi.REGION_INFO.pack(needed, flags, index, cap_offset, info.size,
                                     info.offset) + caps

    def _get_irq_info(self, message: Message) -> bytes:
        _no_fds(message)
        argsz, _, index, _ = _unpack(uapi.IRQ_INFO, message)
        if argsz < uapi.IRQ_INFO.size:
            raise CommandError(errno.EINVAL, f"GET_IRQ_INFO argsz {argsz}: expected >= 16")
        if index >= uapi.PCI_NUM_IRQS:
            raise CommandError(errno.EINVAL, f"GET_IRQ_INFO index {index}: expected < 5")
        info = self.device.irq_info(index)
        return uapi.IRQ_INFO.pack(uapi.IRQ_INFO.size, info.flags, index, info.count)

    # -- interrupts --------------------------------------------------------

    def _set_irqs(self, message: Message) -> bytes:
        argsz, flags, index, start, count = _unpack(uapi.IRQ_SET, message)
        data_type = flags & uapi.IRQ_SET_DATA_TYPE_MASK
        action = flags & uapi.IRQ_SET_ACTION_TYPE_MASK
        known = uapi.IRQ_SET_DATA_TYPE_MASK | uapi.IRQ_SET_ACTION_TYPE_MASK
        if argsz < uapi.IRQ_SET.size or flags & ~known:
            raise CommandError(errno.EINVAL, f"SET_IRQS argsz {argsz} flags {flags:#x}: invalid")
        if data_type.bit_count() != 1 or action.bit_count() != 1:
            raise CommandError(
                errno.EINVAL, f"SET_IRQS flags {flags:#x}: expected one data type and one action"
            )
        if index >= uapi.PCI_NUM_IRQS:
            raise CommandError(errno.EINVAL, f"SET_IRQS index {index}: expected < 5")
        vectors = self.device.irq_info(index).count
        if start + count > vectors:
            raise CommandError(
                errno.EINVAL,
                f"SET_IRQS index {index} start {start} count {count}: only {vectors} vectors",
            )
        request = IrqSet(index, data_type, action, start, count)
        if data_type == uapi.IRQ_SET_DATA_EVENTFD:
            if message.fds and len(message.fds) != count:
                raise CommandError(
                    errno.EINVAL, f"SET_IRQS: {len(message.fds)} fds for {count} vectors"
                )
            request.fds = message.take_fds()
        else:
            _no_fds(message)
        if data_type == uapi.IRQ_SET_DATA_BOOL:
            request.bools = message.payload[uapi.IRQ_SET.size : uapi.IRQ_SET.size + count]
            if len(request.bools) != count:
                raise CommandError(errno.EINVAL, f"SET_IRQS DATA_BOOL: {count} bytes expected")
        try:
            self.device.set_irqs(request)
        finally:
            close_fds(request.fds)
        return b""

    # -- regions -----------------------------------------------------------

    def _region(self, name: str, region: int, offset: int, count: int) -> BarRegion | None:
        """Check one access to a region: its BAR, or None for config space.

        Every region access (read, write, write-multi) is bounded here.
        """
        bar = self.device.bars.get(region)
        if bar is not None:
            size = bar.size
        elif region >= uapi.PCI_NUM_REGIONS:
            raise CommandError(errno.EINVAL, f"{name} region {region}: expected < 9")
        elif region == _CONFIG:
            size = self.device.region_size(region)
        else:
            raise CommandError(errno.EINVAL, f"{name} region {region}: not implemented")
        if count > self.max_xfer:
            raise CommandError(errno.E2BIG, f"{name} count {count}: max {self.max_xfer}")
        if offset + count > size:
            raise CommandError(
                errno.EINVAL,
                f"{name} region {region} offset {offset:#x} count {count}: size is {size:#x}",
            )
        return bar

    def _region_read(self, message: Message) -> bytes:
        payload = message.payload
        if message.fds or len(payload) < _REGION_RW_SIZE:
            _no_fds(message)
            _unpack(uapi.REGION_RW, message)
        offset, region, count = _REGION_RW_UNPACK(payload)
        bar = self._region("REGION_READ", region, offset, count)
        if bar is None:
            data = self.device.config_read(offset, count)
        else:
            value = bar.read(offset, count)
            data = value.to_bytes(count, "little") if isinstance(value, int) else bytes(value)
            if len(data) != count:
                raise CommandError(
                    errno.EIO, f"BAR{region} read handler gave {len(data)} bytes, not {count}"
                )
        if self._tracing:
            trace.debug("region %d read %#x/%d -> %s", region, offset, count, data.hex())
        return payload[:_REGION_RW_SIZE] + data

    def _write(self, bar: BarRegion | None, region: int, offset: int, data: bytes) -> None:
        if self._tracing:
            trace.debug("region %d write %#x/%d <- %s", region, offset, len(data), data.hex())
        if bar is None:
            self.device.config_write(offset, data)
        else:
            bar.write(offset, data)

    def _region_write(self, message: Message) -> bytes:
        payload = message.payload
        if message.fds or len(payload) < _REGION_RW_SIZE:
            _no_fds(message)
            _unpack(uapi.REGION_RW, message)
        offset, region, count = _REGION_RW_UNPACK(payload)
        data = payload[_REGION_RW_SIZE:]
        if len(data) != count:
            raise CommandError(
                errno.EINVAL, f"REGION_WRITE count {count}: {len(data)} data bytes follow"
            )
        bar = self._region("REGION_WRITE", region, offset, count)
        self._write(bar, region, offset, data)
        return payload[:_REGION_RW_SIZE]

    def _region_write_multi(self, message: Message) -> bytes:
        _no_fds(message)
        (total,) = _unpack(uapi.WRITE_MULTI_COUNT, message)
        expected = uapi.WRITE_MULTI_COUNT.size + total * uapi.WRITE_MULTI_ONE.size
        if total > uapi.WRITE_MULTI_MAX or len(message.payload) != expected:
            raise CommandError(
                errno.EINVAL,
                f"REGION_WRITE_MULTI of {total} writes in {len(message.payload)} bytes",
            )
        writes = [
            uapi.WRITE_MULTI_ONE.unpack_from(
                message.payload, uapi.WRITE_MULTI_COUNT.size + n * uapi.WRITE_MULTI_ONE.size
            )
            for n in range(total)
        ]
        for offset, region, count, data in writes:
            if count > uapi.WRITE_MULTI_DATA:
                raise CommandError(errno.EINVAL, f"REGION_WRITE_MULTI count {count}: max 8")
            bar = self._region("REGION_WRITE_MULTI", region, offset, count)
            self._write(bar, region, offset, data[:count])
        return b""

    # -- the rest ----------------------------------------------------------

    def _reset(self, message: Message) -> bytes:
        _no_fds(message)
        logger.info("vfio-user DEVICE_RESET")
        self.device.reset()
        return b""

    def _unsupported(self, message: Message) -> bytes:
        raise CommandError(errno.ENOTSUP, f"{message.command_name}: not supported")

    def _client_side(self, message: Message) -> bytes:
        raise CommandError(errno.EINVAL, f"{message.command_name}: a server-to-client request")


_HANDLERS: dict[int, _Handler] = {
    uapi.Command.VERSION: Session._version,
    uapi.Command.DMA_MAP: Session._dma_map,
    uapi.Command.DMA_UNMAP: Session._dma_unmap,
    uapi.Command.DEVICE_GET_INFO: Session._get_info,
    uapi.Command.DEVICE_GET_REGION_INFO: Session._get_region_info,
    uapi.Command.DEVICE_GET_REGION_IO_FDS: Session._unsupported,
    uapi.Command.DEVICE_GET_IRQ_INFO: Session._get_irq_info,
    uapi.Command.DEVICE_SET_IRQS: Session._set_irqs,
    uapi.Command.REGION_READ: Session._region_read,
    uapi.Command.REGION_WRITE: Session._region_write,
    uapi.Command.DMA_READ: Session._client_side,
    uapi.Command.DMA_WRITE: Session._client_side,
    uapi.Command.DEVICE_RESET: Session._reset,
    uapi.Command.DIRTY_PAGES: Session._unsupported,
    uapi.Command.REGION_WRITE_MULTI: Session._region_write_multi,
}
