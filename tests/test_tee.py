"""Protected inference, in-process parts: wire format, sealing, attestation, field arithmetic, transforms, attacks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from base.errors import TinyshieldError
from tee import attestation, audit, blinded, dma, fieldgemm, fieldkernels, fieldmath, messages, sealing, shadownet
from tee.fieldmath import HALF, P


@pytest.fixture
def root_key(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYSHIELD_ROOT_KEY", str(tmp_path / "root.key"))
    return sealing.device_root_key()


# ---- messages ----------------------------------------------------------------------------------------
def test_message_roundtrip_and_refusals():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    buf = messages.encode(messages.Message("matmul", {"layer": "l0", "seq": 7}, [x]))
    m = messages.decode(bytearray(buf), "matmul")
    assert m.fields == {"layer": "l0", "seq": 7} and np.array_equal(m.arrays[0], x)
    with pytest.raises(TinyshieldError, match="trailing"):
        messages.decode(buf + b"\0")
    with pytest.raises(TinyshieldError, match="truncated"):
        messages.decode(buf[:-1])
    with pytest.raises(TinyshieldError, match="magic"):
        messages.decode(b"XXXX" + buf[4:])
    with pytest.raises(TinyshieldError, match="expected result"):
        messages.decode(buf, "result")
    with pytest.raises(TinyshieldError, match="seq must be int"):
        messages.encode(messages.Message("matmul", {"layer": "l0", "seq": "7"}, [x]))
    with pytest.raises(TinyshieldError, match="dtype"):
        messages.encode(messages.Message("matmul", {"layer": "l0", "seq": 1}, [x.astype(np.float64)]))
    with pytest.raises(TinyshieldError, match="not part of the protocol"):
        messages.encode(messages.Message("exec", {}, []))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 200), st.integers(0, 255))
def test_corrupted_messages_never_crash(pos, byte):
    buf = bytearray(messages.encode(messages.Message("result", {"seq": 1, "seconds": 0.5, "cpu": 0.1, "t_recv": 1.0, "t_send": 2.0},
                                                     [np.ones((2, 3), np.uint32)])))
    buf[pos % len(buf)] = byte
    try:
        messages.decode(buf)
    except TinyshieldError:
        pass   # refused with a clear error; anything else (KeyError, ValueError...) fails the test


def test_shared_buffer_headers_are_checked_before_use():
    """A request or answer header naming a slot or shape the buffer cannot hold is refused; good views are reused."""
    shm = dma.create(4096)
    try:
        slots = dma.Slots(shm)
        a = slots(1, "u4", 32, 32)
        assert a.shape == (32, 32) and slots(1, "u4", 32, 32) is a
        for bad in ((dma.SLOTS, "u4", 1, 1), (-1, "u4", 1, 1), (0, "u4", 33, 32), (0, "zz", 1, 1), (0, "u4", -1, 2)):
            with pytest.raises(TinyshieldError):
                slots(*bad)
        del a
    finally:
        slots.cache.clear()
        shm.close()
        shm.unlink()


# ---- sealing and attestation -------------------------------------------------------------------------
def test_sealing_refuses_tampering_other_measurement_and_changed_code(root_key, tmp_path):
    cfg = {"mode": "blinded", "model": {"hidden_size": 64}}
    meas = sealing.measurement(cfg)
    key = sealing.seal_key(root_key, meas)
    blob = sealing.seal(key, b"secret weights", b"bundle\0" + meas)
    assert b"secret" not in blob
    assert sealing.unseal(key, blob, b"bundle\0" + meas) == b"secret weights"
    bad = bytearray(blob)
    bad[-20] ^= 1
    with pytest.raises(TinyshieldError, match="cannot unseal"):
        sealing.unseal(key, bytes(bad), b"bundle\0" + meas)
    other = sealing.measurement({**cfg, "mode": "plain"})
    with pytest.raises(TinyshieldError, match="cannot unseal"):
        sealing.unseal(sealing.seal_key(root_key, other), blob, b"bundle\0" + other)
    with pytest.raises(TinyshieldError, match="cannot unseal"):      # blob moved to another purpose
        sealing.unseal(key, blob, b"pad\0" + meas)
    # A changed enclave (one byte of its code) measures differently, so it derives another key.
    code = tmp_path / "code"
    code.mkdir()
    for name in sealing.ENCLAVE_CODE:
        (code / name).parent.mkdir(parents=True, exist_ok=True)
        (code / name).write_bytes((sealing.TEE_DIR / name).read_bytes())
    assert sealing.code_digest(root=code) == sealing.code_digest()
    (code / "enclave.py").write_bytes((code / "enclave.py").read_bytes() + b"\n# patched\n")
    changed = sealing.measurement(cfg, sealing.code_digest(root=code))
    assert changed != meas
    with pytest.raises(TinyshieldError, match="cannot unseal"):
        sealing.unseal(sealing.seal_key(root_key, changed), blob, b"bundle\0" + meas)


def test_attestation_and_channel_refuse_replays(root_key):
    meas = sealing.measurement({"mode": "plain"})
    dev = attestation.device_public_key(root_key)
    ck, cpub = attestation.new_keypair()
    ek, epub = attestation.new_keypair()
    nonce = attestation.fresh_nonce()
    q = attestation.make_quote(root_key, meas, nonce, cpub, epub)
    attestation.verify_quote(q, dev, meas, nonce, cpub)
    with pytest.raises(TinyshieldError, match="stale or replayed"):
        attestation.verify_quote(q, dev, meas, attestation.fresh_nonce(), cpub)
    with pytest.raises(TinyshieldError, match="measurement"):
        attestation.verify_quote(q, dev, sealing.measurement({"mode": "blinded"}), nonce, cpub)
    with pytest.raises(TinyshieldError, match="signature"):
        attestation.verify_quote(q, attestation.device_public_key(b"\1" * 32), meas, nonce, cpub)
    forged = attestation.Quote(q.measurement, q.nonce, q.client_key, attestation.new_keypair()[1], q.signature)
    with pytest.raises(TinyshieldError, match="signature"):    # a swapped-in key breaks the signature
        attestation.verify_quote(forged, dev, meas, nonce, cpub)
    client = attestation.Channel(ck, epub, q.body(), initiator=True)
    enclave = attestation.Channel(ek, cpub, q.body(), initiator=False)
    blob, n = client.encrypt(b"input")
    assert enclave.decrypt(blob, n) == b"input"
    with pytest.raises(TinyshieldError, match="replay"):
        enclave.decrypt(blob, n)


# ---- field arithmetic -----------------------------------------------------------------------------
EDGES = [0, 1, HALF - 1, HALF, HALF + 1, P - 1]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.integers(1, 300), st.integers(1, 24), st.integers(0, 2 ** 32 - 1))
def test_int8_digit_matmul_is_exact_mod_p(rows, k, m, seed):
    """The numpy reference and the accelerator's C digit split + recombination both equal exact integer math."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, P, (rows, k)).astype(np.uint32)
    x.flat[: min(len(EDGES), x.size)] = EDGES[: min(len(EDGES), x.size)]
    w = rng.integers(-127, 128, (k, m)).astype(np.int8)
    xc = np.where(x.astype(np.int64) > HALF, x.astype(np.int64) - P, x.astype(np.int64)).astype(object)
    want = np.mod(xc @ w.astype(object), P).astype(np.int64)
    assert np.array_equal(fieldmath.from_digits(fieldkernels.digits(x, unsigned=True)), x)
    assert np.array_equal(fieldmath.int8_matmul_mod(x, w).astype(np.int64), want)
    got = fieldgemm.FieldGemm(torch.from_numpy(w))(x)
    assert got.dtype == np.uint32 and np.array_equal(got.astype(np.int64), want)
    assert np.array_equal(fieldkernels.digits(x), fieldmath.digits(x))
    d = fieldmath.digits(x).astype(np.int64).reshape(3, rows, k)
    assert np.array_equal(d[0] + 256 * d[1] + 65536 * d[2], xc.astype(np.int64))


def test_field_gemm_is_exact_at_the_largest_sums():
    """Digits at -128 with weights at +-127 over MiniLM's widest input (k = 1536): the sums pass 2^24, so a
    float32-sum kernel is split along k -- and the result of this process's kernel must still be exact."""
    k = 1536
    worst = (-128 - 128 * 256 - 79 * 65536) % P             # digits (-128, -128, -79)
    x = np.full((4, k), worst, np.uint32)
    x[1], x[2, ::2] = P - 1, HALF
    w = np.stack([np.full(k, 127), np.full(k, -127), np.where(np.arange(k) % 2, 127, -127)], 1).astype(np.int8)
    xc = np.where(x.astype(np.int64) > HALF, x.astype(np.int64) - P, x.astype(np.int64)).astype(object)
    want = np.mod(xc @ w.astype(object), P).astype(np.int64)
    gemm = fieldgemm.FieldGemm(torch.from_numpy(w))
    assert [c.stop - c.start for c in fieldgemm.exact_parts(w.T)] == [1032, 504]
    assert [c.stop - c.start for c, _ in gemm.parts] == ([518, 518, 500] if gemm.kernel.digit_bound == 255 else
                                                         [1032, 504] if gemm.kernel.f32_sums else [k])
    assert np.array_equal(gemm(x).astype(np.int64), want)
    assert np.array_equal(fieldkernels.digits(x, unsigned=True).view(np.int8) ^ np.int8(-128), fieldkernels.digits(x))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 40), st.integers(1, 127), st.integers(0, 2 ** 32 - 1))
def test_exact_parts_keep_every_float32_sum_exact(k, m, amp, seed):
    """Consecutive ranges covering every input, each within the float32 bound, none ended early."""
    w = np.random.default_rng(seed).integers(-amp, amp + 1, (m, k)).astype(np.int8)
    l1 = lambda c: int(np.abs(w[:, c].astype(np.int64)).sum(1).max())
    for digit in (fieldgemm.MAX_DIGIT, fieldgemm.MAX_BYTE):     # centred digits; raw bytes (onednn-u8)
        parts = fieldgemm.exact_parts(w, digit)
        assert parts[0].start == 0 and parts[-1].stop == k and all(a.stop == b.start for a, b in zip(parts, parts[1:]))
        assert all(digit * l1(c) <= fieldgemm.F32_EXACT for c in parts)
        assert all(digit * l1(slice(c.start, c.stop + 1)) > fieldgemm.F32_EXACT for c in parts[:-1])


def test_recombination_is_exact_at_the_extremes():
    """Digit products at the int32 extremes of MiniLM's widest layer (k = 1536) and around multiples of p."""
    lim = 1536 * 128 * 127
    vals = np.array([-lim, -lim + 1, -P, -P + 1, -1, 0, 1, P - 1, P, P + 1, lim - 1, lim], np.int64)
    y = np.array(np.meshgrid(vals, vals, vals)).reshape(3, -1)
    y = np.concatenate([y, np.random.default_rng(0).integers(-lim, lim + 1, (3, 20_000))], 1).astype(np.int32)
    got = fieldkernels.recombine(y.reshape(-1, 1))[:, 0]    # planes stacked by rows: (3 n, 1)
    want = np.mod(y[0].astype(np.int64) + 256 * y[1].astype(np.int64) + 65536 * y[2].astype(np.int64), P)
    assert np.array_equal(got.astype(np.int64), want)


def test_float32_recombination_is_exact_at_the_extremes():
    """The float32 planes a digit GEMM returns (|y| <= 2^24), alone and added to a previous part near p."""
    lim = 2 ** 24
    vals = np.array([-lim, -lim + 1, -P, -P + 1, -1, 0, 1, P - 1, P, P + 1, lim - 1, lim], np.int64)
    y = np.array(np.meshgrid(vals, vals, vals)).reshape(3, -1)
    y = np.concatenate([y, np.random.default_rng(1).integers(-lim, lim + 1, (3, 20_000))], 1)
    exact = y[0] + 256 * y[1] + 65536 * y[2]
    planes = y.astype(np.float32).reshape(-1, 1)
    assert np.array_equal(fieldkernels.recombine(planes)[:, 0].astype(np.int64), np.mod(exact, P))
    prev = np.random.default_rng(2).integers(0, P, (y.shape[1], 1)).astype(np.uint32)
    prev[:3] = [[0], [1], [P - 1]]
    got = fieldkernels.recombine(planes, prev.copy(), accumulate=True)[:, 0]
    assert np.array_equal(got.astype(np.int64), np.mod(exact + prev[:, 0], P))


def test_uniform_masks_cover_the_field():
    u = fieldmath.uniform((200_000,))
    assert u.min() >= 0 and u.max() < P and abs(u.mean() / (P / 2) - 1) < 0.01


# ---- blinded -----------------------------------------------------------------------------------------
def _layer(rows=49, k=64, m=48, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((m, k)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    return w, b, x, blinded.make_layer(w, b, x)


def test_blind_kernel_matches_its_definition_at_the_edges():
    """round half to even, the mask added mod p, and the Freivalds sum x~ v mod p -- exact for any k."""
    rng = np.random.default_rng(0)
    for rows, k in ((3, 70_000), (17, 384)):       # long rows: the uint64 sums stay exact
        x = (rng.standard_normal((rows, k)) * 1000).astype(np.float32)
        x[0, :6] = [0.5, 1.5, -0.5, -2.5, (HALF - 1) / 2 ** 4, -(HALF - 1) / 2 ** 4]   # ties; the range's ends
        r = rng.integers(0, P, (rows, k)).astype(np.uint32)
        r[0, :4] = [0, P - 1, HALF, P - 1]
        v = rng.integers(0, P, k).astype(np.uint32)
        v[:2] = P - 1
        xt, rhs = blinded.blind(torch.from_numpy(x), blinded.BlindLayer(np.zeros((1, k), np.int32),
                                np.ones(1, np.float32), 4, np.zeros(1, np.float32)), r, v)
        want = np.mod(np.round(x.astype(np.float64) * 16).astype(np.int64) + r, P)
        assert np.array_equal(fieldmath.from_digits(xt).astype(np.int64), want)
        assert np.array_equal(xt, fieldkernels.digits(want.astype(np.uint32), unsigned=True))   # the wire format
        assert np.array_equal(rhs.astype(np.int64), np.mod(want.astype(object) @ v.astype(object), P).astype(np.int64))


def test_unblind_kernel_matches_its_definition_and_refuses_non_field_entries():
    rng = np.random.default_rng(1)
    rows, m = 9, 70_000
    y = rng.integers(0, P, (rows, m)).astype(np.uint32)
    u = rng.integers(0, P, (rows, m)).astype(np.uint32)
    y[0, :4], u[0, :4] = [0, P - 1, HALF, HALF + 1], [P - 1, 0, 0, 0]
    s = rng.integers(0, P, m).astype(np.uint32)
    layer = blinded.BlindLayer(np.zeros((m, 1), np.int32), rng.random(m).astype(np.float32), 3,
                               rng.standard_normal(m).astype(np.float32))
    lhs = np.mod(y.astype(object) @ s.astype(object), P).astype(np.uint64)
    got = blinded.unblind(y, u, s, lhs, layer)
    centred = fieldmath.center(np.mod(y.astype(np.int64) - u, P))
    assert got is not None and torch.equal(got, blinded.dequantize(centred, layer))   # bit for bit
    assert blinded.unblind(y, u, s, lhs + np.uint64(1), layer) is None                # a failed check
    bad = y.copy()
    bad[2, 5] += np.uint32(P)         # the same residue, but no field element: refused, not wrapped
    assert blinded.unblind(bad, u, s, lhs, layer) is None


def test_blinded_linear_equals_fixed_point_reference_with_fresh_masks():
    w, b, x, layer = _layer()
    wt = torch.from_numpy(layer.w_q.T.astype(np.int8).copy())
    pads = [blinded.make_pad({"l": layer}, {"l": x.shape[0]}) for _ in range(2)]
    sent = []
    for pad in pads:
        xt, rhs = blinded.blind(torch.from_numpy(x), layer, pad["l.r"], pad["l.v"])
        yt = fieldgemm.FieldGemm(wt).planes(xt)
        y = blinded.unblind(yt, pad["l.u"], pad["l.s"], rhs, layer)
        assert y is not None and torch.equal(y, blinded.reference_lin({"l": layer})("l", torch.from_numpy(x)))
        sent.append(xt)
    assert not np.array_equal(sent[0], sent[1]) and not np.array_equal(pads[0]["l.r"], pads[1]["l.r"])
    # the masked input is unrelated to the plaintext: best |cos| stays at chance level
    best, _ = audit.best_abs_cos(x, audit.as_float(sent[0]))
    assert best.max() < 0.7
    ref = x @ w.T + b
    assert np.abs(y.numpy() - ref).max() < 0.05 * np.abs(ref).max()   # int8 weights: close to fp32


def test_blinded_overflow_is_refused_not_wrapped():
    _, _, x, layer = _layer()
    pad = blinded.make_pad({"l": layer}, {"l": x.shape[0]})
    with pytest.raises(TinyshieldError, match="fixed-point range"):
        blinded.blind(torch.from_numpy(x * 1e6), layer, pad["l.r"], pad["l.v"])


def test_lying_accelerator_is_detected_in_every_trial():
    w, b, x, _ = _layer(rows=16, k=32, m=24)
    results = audit.detection_trials(w, b, rows=16, trials=300)
    assert {r.attack for r in results} == {"flip", "perturb", "swap", "replay"}
    for r in results:
        assert r.trials >= 299 and r.detected == r.trials, r
        assert r.theoretical_miss == pytest.approx(1 / P)


# ---- shadownet ---------------------------------------------------------------------------------------
def test_shadownet_restores_exactly_but_exposes_weights():
    from edge.models.minilm import load_minilm
    from tee import bundle, program
    spec = {"input_ids": [1, 8], "attention_mask": [1, 8]}
    params = program.linears(bundle.captured(bundle.served(load_minilm()), spec))
    w, b = params["bert.encoder.layer.0.attention.output.dense"]
    rng = np.random.default_rng(0)
    layer = shadownet.transform(w, rng, fake_ratio=0.25)
    assert layer.obf.shape == (480, 384) and layer.fake.sum() == 96
    x = rng.standard_normal((8, 384)).astype(np.float32)
    masks = shadownet.mask_pool(8, 384, 1.0, 2, rng)
    mask_out = masks[1] @ layer.obf.T
    y = shadownet.restore((x + masks[1]) @ layer.obf.T, mask_out, layer, b)
    ref = x @ w.T + b
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()
    # attacks: normalising rows finds every real channel; a related public model recovers order, scales, fakes
    public = w + 0.5 * rng.standard_normal(w.shape).astype(np.float32) * np.linalg.norm(w, axis=1, keepdims=True) / np.sqrt(384)
    r = audit.shadow_attacks("attn_out", layer.obf, layer.fake, layer.perm, w, public)
    assert r.normalise_match_cos > 0.9999
    assert r.public_match_share == 1.0 and r.public_fake_accuracy == 1.0
    assert r.public_recovered_cos > 0.999 > r.public_only_cos + 0.05
    assert r.fake_auc > 0.9   # even without a public model, row statistics give the fakes away
