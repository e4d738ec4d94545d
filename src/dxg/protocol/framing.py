"""Frames of the emulated VMBus: one byte stream carries the bus control messages and every
channel's packets, each frame tagged with the channel's relid.

Frame header, 24 bytes little-endian:
    magic u32 ("DXGB") | payload_len u32 | relid u32 | packet_type u16 | flags u16 | trans_id u64
relid 0 is the bus control channel. packet_type follows VMBus: 6 = in-band data, 11 = completion,
9 = a bulk chunk (VMBus's "data using GPA direct": data that does not fit one packet).

flags:
    bit 0      COMPLETION_REQUESTED: a data packet that expects a completion with its trans_id
    bit 1      HAS_BULK: the bulk chunks sent just before this packet on the connection are its
               attachment (a payload of any size up to the receiver's bulk limit)
    bits 8-15  descriptors that travel with this frame (SCM_RIGHTS on its first byte; Unix and
               in-process transports only), at most MAX_FRAME_FDS

Channel payloads (and each bulk chunk) are capped at DXG_MAX_VM_BUS_PACKET_SIZE (128 KiB), as in
the real driver. A bulk attachment is the concatenation of the chunks; the chunks of one packet
are contiguous on the stream and directly precede it. The message is the packet's payload (the
first 128 KiB) followed by the attachment.

A bulk chunk announces its attachment in its trans_id (which a chunk needs for nothing else): the
low 32 bits are the length of the whole attachment, the high 32 bits the low 32 bits of the
trans_id of the packet it belongs to; every chunk of an attachment says the same (0: not said,
as older senders write). A receiver can then hold the message in one buffer allocated at the
first chunk and read the bytes straight into it, or straight into the memory the packet's owner
wants them in (a reply read into the memory it fills: MessageReader's ``place``); it checks that
exactly the announced length arrives.

Sending never joins a large message: ``encode_message`` answers the buffers that carry it (the
frame headers and views of the payload's own buffers, a ``Gather`` when it is made of several),
written with one sendmsg.
"""

import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dxg.protocol.errors import ProtocolError

MAGIC = 0x42475844  # b"DXGB" little-endian
FRAME_HEADER = struct.Struct("<IIIHHQ")
FRAME_HEADER_SIZE = FRAME_HEADER.size
DXG_MAX_VM_BUS_PACKET_SIZE = 128 * 1024
CONTROL_RELID = 0

VM_PKT_DATA_INBAND = 0x6
VM_PKT_BULK = 0x9
VM_PKT_COMP = 0xB
_PACKET_TYPES = frozenset({VM_PKT_DATA_INBAND, VM_PKT_BULK, VM_PKT_COMP})

FLAG_COMPLETION_REQUESTED = 0x1
FLAG_HAS_BULK = 0x2
FLAG_FD_SHIFT = 8
FLAG_FD_MASK = 0xFF << FLAG_FD_SHIFT
_KNOWN_FLAGS = FLAG_COMPLETION_REQUESTED | FLAG_HAS_BULK | FLAG_FD_MASK
MAX_FRAME_FDS = 16
# The lowest flags value whose descriptor count is over MAX_FRAME_FDS (the count is the top byte).
_TOO_MANY_FDS = (MAX_FRAME_FDS + 1) << FLAG_FD_SHIFT


@dataclass(frozen=True, slots=True)
class Frame:
    relid: int
    packet_type: int
    flags: int
    trans_id: int
    payload: bytes | bytearray  # the whole message (a bytearray when it had an attachment)
    placed: int = 0  # bytes of its attachment that went where MessageReader's place said

    @property
    def wants_completion(self) -> bool:
        return bool(self.flags & FLAG_COMPLETION_REQUESTED)

    @property
    def has_bulk(self) -> bool:
        return bool(self.flags & FLAG_HAS_BULK)

    @property
    def fd_count(self) -> int:
        return (self.flags & FLAG_FD_MASK) >> FLAG_FD_SHIFT


def frame_flags(wants_completion: bool = False, has_bulk: bool = False, fds: int = 0) -> int:
    if not 0 <= fds <= MAX_FRAME_FDS:
        raise ProtocolError(f"{fds} descriptors in one frame (at most {MAX_FRAME_FDS})")
    return ((FLAG_COMPLETION_REQUESTED if wants_completion else 0)
            | (FLAG_HAS_BULK if has_bulk else 0) | (fds << FLAG_FD_SHIFT))


def encode_frame(
    relid: int, packet_type: int, payload: bytes, trans_id: int = 0, flags: int = 0
) -> bytes:
    if len(payload) > DXG_MAX_VM_BUS_PACKET_SIZE:
        raise ProtocolError(
            f"packet of {len(payload)} bytes exceeds the {DXG_MAX_VM_BUS_PACKET_SIZE}-byte cap"
        )
    if packet_type not in _PACKET_TYPES:
        raise ProtocolError(f"unknown packet type {packet_type}")
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"unknown frame flags 0x{flags:x}")
    return FRAME_HEADER.pack(MAGIC, len(payload), relid, packet_type, flags, trans_id) + payload


def bulk_announcement(length: int, owner: int = 0) -> int:
    """The trans_id of the bulk chunks of an attachment of ``length`` bytes that belongs to the
    packet with trans_id ``owner`` (see the module docstring); 0 for what 32 bits cannot say."""
    if not 0 < length <= 0xFFFFFFFF:
        return 0
    return (owner & 0xFFFFFFFF) << 32 | length


def encode_bulk(relid: int, data: bytes | memoryview, owner: int = 0) -> list[bytes]:
    """The bulk chunks that carry ``data`` (send them right before the packet they belong to,
    whose trans_id is ``owner``)."""
    view = memoryview(data)
    word = bulk_announcement(len(view), owner)
    return [
        FRAME_HEADER.pack(MAGIC, len(chunk), relid, VM_PKT_BULK, 0, word) + bytes(chunk)
        for chunk in (view[i : i + DXG_MAX_VM_BUS_PACKET_SIZE]
                      for i in range(0, len(view), DXG_MAX_VM_BUS_PACKET_SIZE))
    ]


Buffer = bytes | bytearray | memoryview


class Gather:
    """A payload held as the buffers it is made of, in order (a message header and a view of the
    memory its data is in): written with one sendmsg, never joined. ``bytes(g)`` joins them (a
    copy, for the odd caller that needs one piece)."""

    __slots__ = ("_size", "parts")

    def __init__(self, parts: Iterable[Buffer]) -> None:
        self.parts: tuple[Buffer, ...] = tuple(
            p if isinstance(p, bytes) else memoryview(p).cast("B") for p in parts if len(p))
        self._size = sum(len(p) for p in self.parts)

    def __len__(self) -> int:
        return self._size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def __repr__(self) -> str:
        return f"<Gather {self._size} bytes in {len(self.parts)} parts>"


def flat(payload: Buffer | Gather) -> Buffer:
    """``payload`` as one buffer (a Gather joined)."""
    return bytes(payload) if isinstance(payload, Gather) else payload


class _Cursor:
    """Consecutive ranges of a sequence of buffers, as views (nothing copied)."""

    __slots__ = ("_at", "_i", "_parts")

    def __init__(self, parts: Iterable[Buffer]) -> None:
        self._parts = [memoryview(p) for p in parts]
        self._i = 0
        self._at = 0

    def take(self, n: int) -> list[memoryview]:
        out = []
        while n:
            part = self._parts[self._i]
            k = min(n, len(part) - self._at)
            out.append(part[self._at : self._at + k])
            self._at += k
            n -= k
            if self._at == len(part):
                self._i += 1
                self._at = 0
        return out


def encode_message(relid: int, packet_type: int, payload: Buffer | Gather, trans_id: int = 0,
                   flags: int = 0) -> list[Buffer]:
    """The buffers that carry one message, in order: a payload longer than a packet goes as its
    bulk chunks (announcing the attachment) and then the packet with its first
    DXG_MAX_VM_BUS_PACKET_SIZE bytes and HAS_BULK set; a shorter one as one packet. The
    payload's bytes are not copied: the list holds views of its buffers."""
    if packet_type not in _PACKET_TYPES:
        raise ProtocolError(f"unknown packet type {packet_type}")
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"unknown frame flags 0x{flags:x}")
    if not isinstance(payload, Gather):
        payload = Gather((payload,))  # (a view of any format counted in bytes)
    parts = payload.parts
    size = len(payload)
    if size <= DXG_MAX_VM_BUS_PACKET_SIZE:
        return [FRAME_HEADER.pack(MAGIC, size, relid, packet_type, flags, trans_id), *parts]
    cursor = _Cursor(parts)
    inline = cursor.take(DXG_MAX_VM_BUS_PACKET_SIZE)
    left = size - DXG_MAX_VM_BUS_PACKET_SIZE
    word = bulk_announcement(left, trans_id)
    out: list[Buffer] = []
    while left:
        n = min(left, DXG_MAX_VM_BUS_PACKET_SIZE)
        out.append(FRAME_HEADER.pack(MAGIC, n, relid, VM_PKT_BULK, 0, word))
        out.extend(cursor.take(n))
        left -= n
    out.append(FRAME_HEADER.pack(MAGIC, DXG_MAX_VM_BUS_PACKET_SIZE, relid, packet_type,
                                 flags | FLAG_HAS_BULK, trans_id))
    out.extend(inline)
    return out


class FrameReader:
    """Incremental frame decoder: feed() bytes as they arrive, then iterate frames(). Every
    frame comes out as it is, bulk chunks included (MessageReader puts messages together)."""

    def __init__(self, max_payload: int = DXG_MAX_VM_BUS_PACKET_SIZE) -> None:
        self._buf = bytearray()
        self._max = max_payload

    def feed(self, data: bytes) -> None:
        self._buf += data

    def frames(self) -> list[Frame]:
        """The whole frames buffered so far (a partial one stays for the next feed)."""
        return self._parse(self._buf)

    def frames_of(self, data: bytes) -> list[Frame]:
        """feed(data) then frames(), copying nothing more than the payloads when nothing was
        left over from before (the common case: a read holds whole frames)."""
        if self._buf:
            self._buf += data
            return self._parse(self._buf)
        out: list[Frame] = []
        pos = self._scan(data, out)
        if pos < len(data):
            self._buf += memoryview(data)[pos:]
        return out

    def _parse(self, buf: bytearray) -> list[Frame]:
        out: list[Frame] = []
        pos = self._scan(buf, out)
        if pos:
            del buf[:pos]
        return out

    def _scan(self, buf: bytes | bytearray, out: list[Frame]) -> int:
        view = memoryview(buf)
        size = len(buf)
        pos = 0
        while size - pos >= FRAME_HEADER_SIZE:
            magic, length, relid, ptype, flags, trans_id = FRAME_HEADER.unpack_from(buf, pos)
            _check_header(magic, length, ptype, flags, self._max)
            end = pos + FRAME_HEADER_SIZE + length
            if size < end:
                break
            out.append(Frame(relid, ptype, flags, trans_id,
                             bytes(view[pos + FRAME_HEADER_SIZE : end])))
            pos = end
        return pos

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)


# Where an announced attachment goes: place(relid, owner, length) -> a writable view of exactly
# ``length`` bytes, or None (the reader allocates the message's buffer). ``owner`` is the low 32
# bits of the trans_id of the packet the attachment belongs to, as its chunks announce it.
Place = Callable[[int, int, int], memoryview | None]
# A message buffer is kept for the next message of its size (writing into a buffer whose pages
# are there already costs a third of a fresh one: no zeroing, no page faults) up to this size,
# until this many messages without an attachment came.
SPARE_MAX = 32 << 20
SPARE_IDLE = 64


class _Attachment:
    """A bulk attachment being received."""

    __slots__ = ("got", "msg", "old", "placed", "relid", "total", "view", "word")

    def __init__(self, relid: int, word: int, total: int) -> None:
        self.relid = relid
        self.word = word  # what its chunks say in their trans_id (all the same)
        self.total = total  # announced length (0: not announced)
        self.got = 0
        self.msg: bytearray | None = None  # the message's buffer: packet bytes, then these
        self.view: memoryview | None = None  # where its bytes go (in msg, or placed)
        self.placed = False
        self.old: bytearray | None = None  # not announced: collected as it comes


class MessageReader:
    """A connection's incoming stream, decoded into messages: every frame but the bulk chunks,
    each packet with its attachment (``Frame.payload``: the whole message).

    An announced attachment is received into one buffer allocated at its first chunk (the
    message's: its packet's bytes go in front, the payload is that bytearray), or straight into
    the memory ``place`` gives for it; the packet of a placed attachment comes with only its own
    payload and ``Frame.placed`` = the attachment's length. The bytes the caller read can be fed
    (``feed`` + ``frames``, or ``frames_of``); while a large payload comes, ``buffers()`` names
    where the next bytes go so that the caller reads them straight there (``filled(n)`` then),
    and they are copied once, by the kernel. Attachments that are not announced (older senders)
    are collected as they come. The last message buffer is used again for the next message of
    its length once nothing refers to it any more (no reference, no view: its bytes are all
    written anew), and dropped after SPARE_IDLE messages without an attachment.

    Raises ProtocolError on anything malformed: a bad frame header; a bulk chunk with
    descriptors, on the control channel, or of another channel or announcement than its
    attachment's; chunks that bring more than announced; a message longer than ``max_message``;
    a packet that claims an attachment of another channel or before all of it came; bulk
    chunks that no packet claims. Nothing it hands out is a view of a buffer it reuses."""

    def __init__(self, max_message: int, place: Place | None = None,
                 max_payload: int = DXG_MAX_VM_BUS_PACKET_SIZE) -> None:
        self.max_message = max_message
        self._place = place
        self._max = max_payload
        self._buf = bytearray()  # read, not parsed yet
        self._head = memoryview(bytearray(FRAME_HEADER_SIZE))  # a header read by buffers()
        self._att: _Attachment | None = None
        self._dest: memoryview | None = None  # where the payload of the frame at hand goes
        self._got = 0  # bytes of it there
        self._packet: tuple[int, int, int, int] | None = None  # that frame, when a packet
        self._spare: bytearray | None = None  # the last message buffer (see the docstring)
        self._idle = 0  # messages without an attachment since

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

    def reset(self) -> None:
        """Forget everything half-received (the connection is gone)."""
        self._buf = bytearray()
        self._att = None
        self._dest = None
        self._packet = None
        self._spare = None

    # ---- bytes read by the caller ----------------------------------------------------------

    def feed(self, data: Buffer) -> None:
        self._buf += data

    def frames(self) -> list[Frame]:
        """The messages complete so far (what is left waits for more bytes)."""
        out: list[Frame] = []
        if self._buf:
            pos = self._scan(self._buf, out)
            del self._buf[:pos]
        return out

    def frames_of(self, data: Buffer) -> list[Frame]:
        """feed(data) then frames(), without copying ``data`` first (it may be a view of the
        caller's reused buffer: nothing keeps it)."""
        if self._buf:
            self._buf += data
            return self.frames()
        out: list[Frame] = []
        pos = self._scan(data, out)
        if pos < len(data):
            self._buf += memoryview(data)[pos:]
        return out

    # ---- bytes read straight where they go ------------------------------------------------

    def buffers(self) -> list[memoryview] | None:
        """Where the next bytes should be read to (in order, with one recvmsg_into): the rest
        of the large payload at hand, then room for the next frame header; or only that room
        while an attachment comes. None: read into a buffer of yours and feed it."""
        if self._buf:
            return None
        if self._dest is not None:
            return [self._dest[self._got :], self._head]
        if self._att is not None and self._att.old is None:
            return [self._head]
        return None

    def filled(self, n: int) -> list[Frame]:
        """``n`` bytes were read into the buffers() named; the messages complete now."""
        out: list[Frame] = []
        dest = self._dest
        if dest is not None:
            k = min(n, len(dest) - self._got)
            self._got += k
            n -= k
            if self._got == len(dest):
                self._arrived(out)
        if n:
            self._buf += self._head[:n]
        if self._buf:
            out += self.frames()
        return out

    # ---- parsing ---------------------------------------------------------------------------

    def _scan(self, data: Buffer, out: list[Frame]) -> int:
        view = memoryview(data)  # (released on return: nothing keeps it)
        size = len(view)
        pos = 0
        while True:
            dest = self._dest
            if dest is not None:
                take = min(size - pos, len(dest) - self._got)
                if take:
                    dest[self._got : self._got + take] = view[pos : pos + take]
                    self._got += take
                    pos += take
                if self._got < len(dest):
                    return pos
                self._arrived(out)
                continue
            if size - pos < FRAME_HEADER_SIZE:
                return pos
            magic, length, relid, ptype, flags, trans_id = FRAME_HEADER.unpack_from(view, pos)
            if magic != MAGIC or length > self._max or ptype not in _PACKET_TYPES or \
                    flags & ~_KNOWN_FLAGS or flags >= _TOO_MANY_FDS:
                _check_header(magic, length, ptype, flags, self._max)  # (raises)
            start = pos + FRAME_HEADER_SIZE
            end = start + length
            if ptype == VM_PKT_BULK:
                if self._chunk(relid, flags, trans_id, length):
                    pos = start
                    continue
                if size < end:
                    return pos
                self._old_chunk(relid, trans_id, view[start:end])
                pos = end
                continue
            if (self._att is not None or flags & FLAG_HAS_BULK) and \
                    self._claim(relid, ptype, flags, trans_id, length):
                pos = start
                continue
            if size < end:
                return pos
            payload = bytes(view[start:end])
            pos = end
            if self._att is None:
                out.append(Frame(relid, ptype, flags, trans_id, payload))
                if self._spare is not None:
                    self._idle += 1
                    if self._idle >= SPARE_IDLE:
                        self._spare = None
            else:
                out.append(self._assemble(relid, ptype, flags, trans_id, payload))

    def _chunk(self, relid: int, flags: int, word: int, length: int) -> bool:
        """Check a bulk chunk's header; True when its payload goes straight to its place (set
        as the frame at hand), False for an unannounced one (taken whole, by _old_chunk)."""
        if flags & FLAG_FD_MASK or relid == CONTROL_RELID:
            raise ProtocolError("a bulk chunk with descriptors or on the control channel")
        att = self._att
        if att is not None and (relid != att.relid or word != att.word):
            raise ProtocolError("bulk chunks of one attachment disagree on its channel or size")
        total = word & 0xFFFFFFFF
        if not total:
            got = att.got if att is not None else 0
            if got + length + DXG_MAX_VM_BUS_PACKET_SIZE > self.max_message:
                raise ProtocolError(f"message longer than {self.max_message} bytes")
            return False
        if att is None:
            if total + DXG_MAX_VM_BUS_PACKET_SIZE > self.max_message:
                raise ProtocolError(f"message longer than {self.max_message} bytes")
            att = self._att = self._open(relid, word, total)
        if att.got + length > total:
            raise ProtocolError(f"bulk chunks bring more than the {total} bytes announced")
        assert att.view is not None
        self._dest = att.view[att.got : att.got + length]
        self._got = 0
        self._packet = None
        return True

    def _open(self, relid: int, word: int, total: int) -> _Attachment:
        att = _Attachment(relid, word, total)
        where = self._place(relid, word >> 32, total) if self._place is not None else None
        if where is not None and len(where) == total and not where.readonly \
                and where.format == "B" and where.contiguous:
            att.view = where
            att.placed = True
        else:
            att.msg = self._buffer(DXG_MAX_VM_BUS_PACKET_SIZE + total)
            att.view = memoryview(att.msg)[DXG_MAX_VM_BUS_PACKET_SIZE:]
        return att

    def _buffer(self, size: int) -> bytearray:
        """A message buffer of ``size`` bytes: the spare when nothing refers to it any more
        (only self._spare and getrefcount's argument do: a memoryview of it holds a reference
        too), else a new one (the next spare)."""
        self._idle = 0
        if self._spare is not None and len(self._spare) == size and \
                sys.getrefcount(self._spare) == 2:
            return self._spare
        buf = bytearray(size)
        self._spare = buf if size <= SPARE_MAX else None
        return buf

    def _old_chunk(self, relid: int, word: int, data: memoryview) -> None:
        att = self._att
        if att is None:
            att = self._att = _Attachment(relid, word, 0)
            att.old = bytearray()
        assert att.old is not None
        att.old += data
        att.got += len(data)

    def _claim(self, relid: int, ptype: int, flags: int, trans_id: int, length: int) -> bool:
        """Check a packet that comes while an attachment does (or says it has one); True when
        its payload goes straight in front of the attachment, in the message's buffer."""
        att = self._att
        if not flags & FLAG_HAS_BULK:
            raise ProtocolError("bulk chunks that no packet claims")
        if att is None:
            return False  # an empty attachment: the packet alone
        if relid != att.relid:
            raise ProtocolError("a packet claims bulk chunks of another channel")
        if att.total and att.got != att.total:
            raise ProtocolError(f"a packet claims {att.got} bulk bytes of the {att.total} "
                                "announced")
        if att.placed:
            att.msg = bytearray(length)  # the packet's own bytes (the rest is placed)
        elif att.msg is None or length != DXG_MAX_VM_BUS_PACKET_SIZE:
            return False
        self._dest = memoryview(att.msg)[:length]
        self._got = 0
        self._packet = (relid, ptype, flags, trans_id)
        return True

    def _assemble(self, relid: int, ptype: int, flags: int, trans_id: int,
                  payload: bytes) -> Frame:
        """The message of a packet that claims the attachment, its payload read whole."""
        att = self._att
        assert att is not None
        self._att = None
        if att.placed:
            return Frame(relid, ptype, flags, trans_id, payload, att.total)
        whole = bytearray(payload)
        whole += att.view if att.old is None else att.old  # type: ignore[operator]
        return Frame(relid, ptype, flags, trans_id, whole)

    def _arrived(self, out: list[Frame]) -> None:
        """The payload of the frame at hand is all in its place."""
        self._dest = None
        att = self._att
        assert att is not None
        packet = self._packet
        if packet is None:  # a bulk chunk
            att.got += self._got
            return
        self._packet = None
        self._att = None
        relid, ptype, flags, trans_id = packet
        assert att.msg is not None
        out.append(Frame(relid, ptype, flags, trans_id, att.msg, att.total if att.placed else 0))


def _check_header(magic: int, length: int, ptype: int, flags: int, cap: int) -> None:
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic 0x{magic:08x}")
    if length > cap:
        raise ProtocolError(f"frame of {length} bytes exceeds the {cap}-byte cap")
    if ptype not in _PACKET_TYPES:
        raise ProtocolError(f"unknown packet type {ptype}")
    if flags & ~_KNOWN_FLAGS or (flags & FLAG_FD_MASK) >> FLAG_FD_SHIFT > MAX_FRAME_FDS:
        raise ProtocolError(f"bad frame flags 0x{flags:x}")
