"""Facts kept on both sides of the C boundary: the C declarations are the one source, and the Python
side is either derived from them (ctypes bindings) or checked against them here."""
from __future__ import annotations

import ctypes
from pathlib import Path

from base import cbuild
from mcu import codegen, hostlib, link
from tee import fieldkernels

FIRMWARE = Path(codegen.__file__).resolve().parent / "firmware"


def test_c_prototypes_reads_declarations_and_definitions():
    text = """
    /* a comment with tsh_fake(int x); inside */
    static inline int helper(int a) { return a; }
    int tsh_blind(const float *restrict x, int rows,
                  int64_t n, float *out) {
        return 0;
    }
    void tsh_none(void);
    """
    p = cbuild.c_prototypes(text)
    assert set(p) == {"blind", "none"}
    assert p["blind"] == cbuild.Prototype("blind", "int", (("const float *", "x"), ("int", "rows"),
                                                            ("int64_t", "n"), ("float *", "out")))
    assert p["none"].params == ()
    assert cbuild.c_argtypes(p["blind"]) == ([ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p],
                                             ctypes.c_int)


def test_kernel_header_matches_the_kernel_registry():
    """tsh_kernels.h and the @kernel types: same kernels, parameter names, counts and C types."""
    assert codegen.signature_mismatches() == []


def test_kernel_header_mismatches_are_found():
    protos = dict(hostlib.kernel_prototypes())
    lut = protos["lut_s8"]
    protos["lut_s8"] = cbuild.Prototype("lut_s8", "void", lut.params[:-1] + (("int16_t", "n"),))
    fc = protos["fc_s8"]
    protos["fc_s8"] = cbuild.Prototype("fc_s8", "void", fc.params[:-1])
    del protos["pad_mask"]
    problems = codegen.signature_mismatches(protos)
    assert any("lut_s8 parameter 3" in p and "int16_t n" in p for p in problems)
    assert any("tsh_fc_s8 takes 13 parameters in C, 14" in p for p in problems)
    assert any(p.startswith("pad_mask: registered in mcu.kernels, not declared") for p in problems)


def test_host_kernels_bind_the_declared_types():
    """The host library's ctypes argtypes come from the header, which the test above ties to @kernel."""
    hk = hostlib.HostKernels("portable")
    hk.function("fc_s8")
    assert hk.lib.tsh_fc_s8.argtypes == [ctypes.c_void_p] * 6 + [ctypes.c_int32] * 8
    assert hk.lib.tsh_fc_s8.restype is None


def test_field_kernels_bind_what_field_c_declares():
    protos = cbuild.c_prototypes(fieldkernels.SOURCE.read_text())
    assert {"blind", "unblind", "digits", "recombine", "recombine_f32", "prefetch"} <= set(protos)
    dll = fieldkernels.lib()
    for name, p in protos.items():
        fn = getattr(dll, f"tsh_{name}")
        assert (fn.argtypes, fn.restype) == cbuild.c_argtypes(p), name
    assert protos["digits"].params[1] == ("int64_t", "n")      # a 64-bit count: c_int would truncate it


def test_protocol_header_matches_link():
    c = cbuild.c_constants((FIRMWARE / "tsh_protocol.h").read_text())
    assert c["TSH_PROTOCOL_VERSION"] == link.PROTOCOL_VERSION
    assert bytes([c["TSH_SYNC0"], c["TSH_SYNC1"]]) == link.SYNC
    assert c["TSH_MAX_PAYLOAD"] == link.MAX_PAYLOAD
    assert c["TSH_REPLY"] == link.REPLY
    assert {k[len("TSH_CMD_"):]: v for k, v in c.items() if k.startswith("TSH_CMD_")} == link.CMD
    assert {k[len("TSH_ERR_"):]: v for k, v in c.items() if k.startswith("TSH_ERR_")} == link.ERR
    assert set(link.ERRORS) == set(link.ERR.values())
    assert link.CHUNK + 8 <= link.MAX_PAYLOAD      # a chunk plus its offset (and length) header fits a frame


def test_c_constants_reads_defines_and_enums():
    c = cbuild.c_constants("#define A 0x10u  /* x */\n#define B (A + 1)\nenum { X = 3, /* c */ Y = 0x7F, };\n")
    assert c == {"A": 16, "X": 3, "Y": 127}


def test_conv_patch_limit_is_one_number():
    from mcu.kernels import CONV_PATCH_MAX

    header = (hostlib.KERNEL_DIR / "tsh_kernels.h").read_text()
    assert cbuild.c_constants(header)["TSH_CONV_PATCH_MAX"] == CONV_PATCH_MAX
    assert "TSH_CONV_PATCH_MAX" not in cbuild.c_constants((hostlib.KERNEL_DIR / "tsh_linear.c").read_text())
