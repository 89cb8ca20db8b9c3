"""The serial protocol's host side without a board: frames, CRC, resynchronisation, timeouts.
pyserial's loop:// URL echoes what is written, so a written frame comes back to be parsed."""
from __future__ import annotations

import ctypes
import shutil
import subprocess
import time
import zlib

import pytest
from hypothesis import given, settings, strategies as st

from base.errors import TinyshieldError
from mcu.compile import FIRMWARE
from mcu.link import SYNC, Link, ModelInfo, frame


def test_frame_layout_and_crc():
    f = frame(0x03, 7, b"\x01\x02")
    assert f[:2] == SYNC and f[2:6] == bytes([0x03, 7, 2, 0]) and f[6:8] == b"\x01\x02"
    assert int.from_bytes(f[8:], "little") == zlib.crc32(f[2:8])


@settings(max_examples=60, deadline=None)
@given(noise=st.binary(max_size=200), payload=st.binary(max_size=300), seq=st.integers(0, 255))
def test_parser_finds_the_frame_after_any_noise(noise, payload, seq):
    with Link("loop://", timeout=0.2) as link:
        link.send_raw(noise + frame(0x81, seq, payload))
        got = None
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:        # noise may itself hold a valid frame (vanishingly rare)
            got = link.read_frame(deadline)
            if got is None or got == (0x81, seq, payload):
                break
        assert got == (0x81, seq, payload)


def test_corrupted_frame_is_skipped():
    good = frame(0x85, 1, b"stats")
    bad = bytearray(frame(0x85, 2, b"xxxxx"))
    bad[8] ^= 0x40
    with Link("loop://", timeout=0.2) as link:
        link.send_raw(bytes(bad) + good)
        assert link.read_frame(time.monotonic() + 1) == (0x85, 1, b"stats")


def test_request_without_an_answer_times_out_after_bounded_retries():
    with Link("loop://", timeout=0.1, retries=2) as link:   # the loop echoes the request, never a reply
        t0 = time.monotonic()
        with pytest.raises(TinyshieldError, match=r"did not answer INFO after 3 tries \(no reply within 0.1 s\)"):
            link.info()
        assert time.monotonic() - t0 < 2


def test_unreachable_board_is_a_clear_error():
    with pytest.raises(TinyshieldError, match="cannot open serial link"):
        Link("socket://127.0.0.1:1", connect_timeout=0.2)


def test_short_info_reply_is_refused():
    with pytest.raises(TinyshieldError, match="INFO reply too short"):
        ModelInfo.parse(b"\x01\x00")


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no host gcc")
def test_device_crc_equals_zlib(tmp_path):
    """The firmware's table CRC, built for the host, agrees with zlib.crc32."""
    so = tmp_path / "crc.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", f"-I{FIRMWARE}", "-o", str(so), str(FIRMWARE / "crc32.c")],
                   check=True)
    lib = ctypes.CDLL(str(so))
    lib.tsh_crc32_update.restype = ctypes.c_uint32
    lib.tsh_crc32_update.argtypes = [ctypes.c_uint32, ctypes.c_char_p, ctypes.c_uint32]
    lib.tsh_crc32_init()
    for data in [b"", b"a", b"123456789", bytes(range(256)) * 5]:
        assert lib.tsh_crc32_update(0, data, len(data)) == zlib.crc32(data)
    # fed in pieces, as the firmware does
    assert lib.tsh_crc32_update(lib.tsh_crc32_update(0, b"12345", 5), b"6789", 4) == zlib.crc32(b"123456789")


def test_device_error_for_this_request_is_raised_and_strays_are_ignored():
    """A loop:// link reads back what it writes: plant replies ahead of the request's echo."""
    import struct

    from mcu.link import DeviceError
    with Link("loop://", timeout=0.3, retries=0) as link:
        # an error about another command with the next seq (a stray), then the real one
        link.send_raw(frame(0x7F, 1, struct.pack("<BBH", 4, 0x05, 0)) + frame(0x7F, 1, struct.pack("<BBH", 4, 0x04, 8)))
        with pytest.raises(DeviceError, match="device refused DOWNLOAD: bad argument"):
            link.request("DOWNLOAD", b"")
