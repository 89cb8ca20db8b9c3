"""The quantised expert FFN in C: what the dequantised weights give, the same sums on every instruction set,
an int4 expert exactly its unpacked int8 weights."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from base.errors import TinyshieldError
from edge.moe.kernels import expert_ffn
from edge.moe.store import quantize_int4, quantize_int8, unpack_int4


def expert(d, f, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, f, generator=g) / d ** 0.5, torch.randn(f, d, generator=g) / f ** 0.5


@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 24).map(lambda n: 2 * n), f=st.integers(1, 40).map(lambda n: 2 * n),
       rows=st.integers(1, 3), seed=st.integers(0, 10 ** 6))
def test_c_expert_ffn_is_the_dequantised_product_and_isa_independent(d, f, rows, seed):
    w1, w2 = expert(d, f, seed)
    h = torch.randn(rows, d, generator=torch.Generator().manual_seed(seed + 1))
    (q1, s1), (q2, s2) = quantize_int8(w1), quantize_int8(w2)
    (p1, t1), (p2, t2) = quantize_int4(w1), quantize_int4(w2)
    for a, sa, b, sb, deq in ((q1, s1, q2, s2, lambda q: q), (p1, t1, p2, t2, unpack_int4)):
        y = expert_ffn(h, a, sa, b, sb)
        ref = torch.nn.functional.gelu(h @ (deq(a).float() * sa)) @ (deq(b).float() * sb)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
        # baseline-only build == the build that dispatches to wider vectors: bit for bit
        assert torch.equal(y, expert_ffn(h, a, sa, b, sb, portable=True))
    # int4 multiplies a nibble at a time: exactly what its unpacked int8 weights give
    assert torch.equal(expert_ffn(h, p1, t1, p2, t2), expert_ffn(h, unpack_int4(p1), t1, unpack_int4(p2), t2))


def test_c_expert_ffn_refuses_float_or_mismatched_weights():
    w1, w2 = expert(8, 12, 0)
    (q1, s1), (q2, s2) = quantize_int8(w1), quantize_int8(w2)
    with pytest.raises(TinyshieldError, match="int8 or packed int4"):
        expert_ffn(torch.randn(1, 8), w1, s1, w2, s2)
    with pytest.raises(TinyshieldError, match="do not match"):
        expert_ffn(torch.randn(1, 8), q2, s2, q1, s1)
