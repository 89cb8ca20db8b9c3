"""Serial protocol, host side (the device side is mcu/firmware/main.c + tsh_protocol.h).

Frame: 0xA5 0x5A | cmd u8 | seq u8 | len u16 LE | payload | crc32 u32 LE (zlib CRC-32 over cmd..payload).
A reply has cmd | 0x80 and the request's seq; a malformed request gets an ERROR frame.

`Link(url)` opens any pyserial URL (`socket://127.0.0.1:PORT` for the emulator, `/dev/ttyACM0`
for a board). Each request waits for the reply with a timeout; lost or garbled exchanges are
retried a bounded number of times with a fresh sequence number after draining the line, and
frames whose sequence number does not match (late replies, noise that happens to parse) are
ignored — that is all the resynchronisation the protocol needs.
"""
from __future__ import annotations

import struct
import time
import zlib
from dataclasses import dataclass

import serial

from base.errors import TinyshieldError
from mcu.graph import IO_DTYPE_NAMES

# The device side's constants are in mcu/firmware/tsh_protocol.h; tests/test_contracts.py checks that
# these match them.
PROTOCOL_VERSION = 1
SYNC = b"\xA5\x5A"
MAX_PAYLOAD = 1040
CHUNK = 1024
REPLY = 0x80
CMD = {"INFO": 0x01, "UPLOAD": 0x02, "RUN": 0x03, "DOWNLOAD": 0x04, "STATS": 0x05, "RESET": 0x06,
       "ECHO": 0x07, "STEP": 0x08, "PEEK": 0x09, "ERROR": 0x7F}
CMD_NAME = {v: k for k, v in CMD.items()}
ERR = {"CRC": 1, "LENGTH": 2, "COMMAND": 3, "ARGUMENT": 4, "TIMEOUT": 5}
ERRORS = {ERR["CRC"]: "bad checksum", ERR["LENGTH"]: "length over limit", ERR["COMMAND"]: "unknown command",
          ERR["ARGUMENT"]: "bad argument", ERR["TIMEOUT"]: "frame timed out"}


def frame(cmd: int, seq: int, payload: bytes = b"") -> bytes:
    head = struct.pack("<BBH", cmd, seq & 0xFF, len(payload))
    return SYNC + head + payload + struct.pack("<I", zlib.crc32(head + payload))


@dataclass
class ModelInfo:
    name: str
    board: str
    protocol: int
    input_dtype: str
    output_dtype: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    input_scale: float
    input_zero_point: int
    output_scale: float
    output_zero_point: int
    input_bytes: int
    output_bytes: int
    arena_bytes: int
    macs: int
    static_ram: int          # .data + .bss on the device (arena and I/O buffers included)
    stack_bytes: int         # the stack region the device has
    buffer_in: int           # the firmware's input/output buffer sizes
    buffer_out: int
    max_payload: int

    @classmethod
    def parse(cls, p: bytes) -> "ModelInfo":
        fmt = "<5B3x4H4Hfifi9I"
        n = struct.calcsize(fmt)
        if len(p) < n + 2:
            raise TinyshieldError(f"INFO reply too short ({len(p)} bytes): firmware and host disagree on the protocol")
        v = struct.unpack_from(fmt, p)
        name_len = p[n]
        name = p[n + 1:n + 1 + name_len].decode(errors="replace")
        k = n + 1 + name_len
        board = p[k + 1:k + 1 + p[k]].decode(errors="replace")
        version, idt, odt, ir, orank = v[:5]
        return cls(name=name, board=board, protocol=version, input_dtype=IO_DTYPE_NAMES.get(idt, str(idt)),
                   output_dtype=IO_DTYPE_NAMES.get(odt, str(odt)), input_shape=tuple(v[5:5 + ir]),
                   output_shape=tuple(v[9:9 + orank]), input_scale=v[13], input_zero_point=v[14],
                   output_scale=v[15], output_zero_point=v[16], input_bytes=v[17], output_bytes=v[18],
                   arena_bytes=v[19], macs=v[20], static_ram=v[21], stack_bytes=v[22], buffer_in=v[23],
                   buffer_out=v[24], max_payload=v[25])


@dataclass
class RunReply:
    run: int
    cycles: int              # DWT CYCCNT (0 in QEMU, which does not model it)
    stack_bytes: int         # stack high-water of this inference (stack painting)


@dataclass
class Stats:
    runs: int
    last_cycles: int
    stack_last: int
    stack_max: int
    stack_bytes: int
    arena_bytes: int
    io_bytes: int
    static_ram: int
    frames_ok: int
    frames_crc: int
    frames_malformed: int


class DeviceError(TinyshieldError):
    """The device answered with an error frame."""

    def __init__(self, code: int, cmd: int, detail: int):
        self.code, self.cmd, self.detail = code, cmd, detail
        super().__init__(f"device refused {CMD_NAME.get(cmd, hex(cmd))}: {ERRORS.get(code, f'error {code}')} "
                         f"(detail {detail})")


class Link:
    def __init__(self, url: str, timeout: float = 5.0, retries: int = 3, connect_timeout: float = 10.0):
        self.url, self.timeout, self.retries = url, timeout, retries
        self.seq = 0
        self.buf = bytearray()
        self.tx_bytes = self.rx_bytes = 0       # bytes on the wire, both ways (serial bandwidth figures)
        self.ser = self._open(url, connect_timeout)

    @staticmethod
    def _open(url: str, connect_timeout: float):
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                return serial.serial_for_url(url, baudrate=115200, timeout=0.05)
            except (serial.SerialException, OSError, ValueError) as e:
                if time.monotonic() > deadline or "socket://" not in url:
                    raise TinyshieldError(f"cannot open serial link {url}: {e} — is the board running "
                                          "(tinyshield flash ...) and the URL right?") from None
                time.sleep(0.05)

    def close(self):
        if self.ser is not None:
            self.ser.close()
            self.ser = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- frames ---------------------------------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (tests use it to send garbage)."""
        try:
            self.ser.write(data)
            self.ser.flush()
            self.tx_bytes += len(data)
        except (serial.SerialException, OSError) as e:
            raise TinyshieldError(f"connection to the board at {self.url} lost: {e}") from None

    def _read_some(self) -> None:
        try:
            chunk = self.ser.read(max(1, self.ser.in_waiting))
        except (serial.SerialException, OSError) as e:
            raise TinyshieldError(f"connection to the board at {self.url} lost ({e}): "
                                  "the board was reset, killed or unplugged") from None
        self.rx_bytes += len(chunk)
        self.buf += chunk

    def _scan(self) -> tuple[int, int, bytes] | None:
        """Find a complete, valid frame at any sync position. A false sync in noise can announce a
        long payload that never comes, so a later sync is tried too instead of waiting on the
        first. Bytes that can no longer start a frame are dropped."""
        buf, start, keep = self.buf, 0, None
        while (i := buf.find(SYNC, start)) >= 0:
            start = i + 1
            if len(buf) < i + 6:
                keep = i if keep is None else keep
                continue
            cmd, seq, n = struct.unpack_from("<BBH", buf, i + 2)
            if n > MAX_PAYLOAD:
                continue
            if len(buf) < i + 10 + n:
                keep = i if keep is None else keep
                continue
            body = bytes(buf[i + 2:i + 6 + n])
            if struct.unpack_from("<I", buf, i + 6 + n)[0] == zlib.crc32(body):
                del buf[:i + 10 + n]
                return cmd, seq, body[4:]
        if keep is None:                                   # nothing pending: keep only a trailing 0xA5
            keep = len(buf) - 1 if buf.endswith(SYNC[:1]) else len(buf)
        del buf[:keep]
        return None

    def read_frame(self, deadline: float) -> tuple[int, int, bytes] | None:
        """Next well-formed frame (cmd, seq, payload), or None at the deadline. Garbage is skipped."""
        while True:
            got = self._scan()
            if got is not None:
                return got
            if time.monotonic() > deadline:
                return None
            self._read_some()

    def drain(self, quiet: float = 0.05) -> None:
        """Throw away whatever is in flight until the line has been quiet for `quiet` seconds."""
        self.buf.clear()
        last = time.monotonic()
        while time.monotonic() - last < quiet:
            n = len(self.buf)
            self._read_some()
            if len(self.buf) != n:
                last = time.monotonic()
        self.buf.clear()

    def request(self, name: str, payload: bytes = b"", timeout: float | None = None) -> bytes:
        """Send one request and return the reply's payload; retry on loss, garbling or timeout."""
        cmd = CMD[name]
        timeout = self.timeout if timeout is None else timeout
        last = "no reply"
        for attempt in range(self.retries + 1):
            if attempt:
                self.drain()
            self.seq = (self.seq + 1) & 0xFF
            self.send_raw(frame(cmd, self.seq, payload))
            deadline = time.monotonic() + timeout
            while True:
                got = self.read_frame(deadline)
                if got is None:
                    last = f"no reply within {timeout:g} s"
                    break
                rcmd, rseq, body = got
                if rseq != self.seq:
                    continue                                 # a late or stray frame
                if rcmd == cmd | REPLY:
                    return body
                if rcmd == CMD["ERROR"] and len(body) >= 4:
                    code, ecmd, detail = struct.unpack_from("<BBH", body)
                    if code in (ERR["CRC"], ERR["TIMEOUT"]):  # garbled or cut in transit: send again
                        last = ERRORS[code]
                        break
                    if ecmd != cmd:
                        continue                             # a stray answer to some other frame
                    raise DeviceError(code, ecmd, detail)
        raise TinyshieldError(f"board at {self.url} did not answer {name} after {self.retries + 1} tries "
                              f"({last}): it may be hung, killed or running different firmware — "
                              "restart it (tinyshield flash ...)")

    # -- commands -------------------------------------------------------------------------------
    def info(self) -> ModelInfo:
        return ModelInfo.parse(self.request("INFO"))

    def echo(self, data: bytes) -> bytes:
        return self.request("ECHO", data)

    def upload(self, data: bytes) -> None:
        for off in range(0, max(1, len(data)), CHUNK):
            part = data[off:off + CHUNK]
            (end,) = struct.unpack("<I", self.request("UPLOAD", struct.pack("<I", off) + part))
            if end != off + len(part):
                raise TinyshieldError(f"upload acknowledged up to {end}, expected {off + len(part)}")

    def run(self, timeout: float = 120.0) -> RunReply:
        return RunReply(*struct.unpack("<3I", self.request("RUN", timeout=timeout)))

    def download(self, nbytes: int) -> bytes:
        out = bytearray()
        for off in range(0, nbytes, CHUNK):
            n = min(CHUNK, nbytes - off)
            part = self.request("DOWNLOAD", struct.pack("<II", off, n))
            if len(part) != n:
                raise TinyshieldError(f"download returned {len(part)} bytes, expected {n}")
            out += part
        return bytes(out)

    # -- tap builds (mcu/codegen.py generate(taps=True)): step the inference, read the arena ---------
    def _taps_only(self, name: str, payload: bytes, timeout: float | None = None) -> bytes:
        try:
            return self.request(name, payload, timeout=timeout)
        except DeviceError as e:
            if e.code == ERR["COMMAND"]:
                raise TinyshieldError(f"the firmware on {self.url} has no {name} command: it is not a tap build — "
                                      "build it with taps (tinyshield validate does)") from None
            raise

    def step(self, k: int, timeout: float = 120.0) -> int:
        """Run segment k of the inference (segment 0 takes the uploaded input); -> the stack high-water."""
        kk, stack = struct.unpack("<2I", self._taps_only("STEP", struct.pack("<I", k), timeout))
        if kk != k:
            raise TinyshieldError(f"the board ran segment {kk}, the host asked for {k}")
        return stack

    def peek(self, offset: int, nbytes: int) -> bytes:
        """`nbytes` of the device's arena from `offset`, in CHUNK-sized requests."""
        out = bytearray()
        for off in range(offset, offset + nbytes, CHUNK):
            n = min(CHUNK, offset + nbytes - off)
            part = self._taps_only("PEEK", struct.pack("<II", off, n))
            if len(part) != n:
                raise TinyshieldError(f"peek returned {len(part)} bytes, expected {n}")
            out += part
        return bytes(out)

    def stats(self) -> Stats:
        return Stats(*struct.unpack("<11I", self.request("STATS")))

    def reset(self) -> None:
        self.request("RESET")
