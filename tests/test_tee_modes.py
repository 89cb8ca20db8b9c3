"""Protected inference end to end: real enclave and accelerator processes, real LiteRT, real MiniLM weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from base.errors import TinyshieldError
from edge.models.vit import ViT, ViTConfig
from tee import audit, blinded, bundle, dma, fieldgemm, fieldkernels, program
from tee.fieldmath import from_digits
from tee.client import ProtectedSession
from tee.enclave import Enclave

pytestmark = pytest.mark.slow

SMALL = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, stem_channels=8)


@pytest.fixture(scope="module")
def tee_env(tmp_path_factory):
    """Isolated build dir and device key for the whole module (bundles are reused across tests)."""
    mp = pytest.MonkeyPatch()
    d = tmp_path_factory.mktemp("tee")
    mp.setenv("TINYSHIELD_BUILD", str(d / "build"))
    mp.setenv("TINYSHIELD_ROOT_KEY", str(d / "root.key"))
    yield d
    mp.undo()


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return ViT(SMALL).eval()


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": rng.random((1, 1, 28, 28), dtype=np.float32)} for _ in range(n)]


def fixed_point_reference(bundle_dir, inputs):
    """The blinded result computed in the clear, with the enclave's own (unsealed) scales, on one thread."""
    owner = Enclave(bundle_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return program.forward(owner.model, inputs, blinded.reference_lin(owner.blind))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", [m for m in bundle.MODES if m != "sliced"])   # sliced: a partitioned model, test_tee_sliced.py
def test_mode_output_and_transcript(tee_env, vit, mode):
    # ShadowNet keeps a small pool of precomputed masks; a pool of one makes its reuse leak deterministic
    b = bundle.protect(vit, tee_env / mode, mode, pads=2, mask_pool=1)
    assert b.header["accelerator"]["backend"] == ("litert" if mode in ("plain", "shadownet") else "torch")
    x1, x2 = images(2)
    plain = program.forward(vit, x1, program.plain_lin(program.linears(program.of(vit, x1))))
    with ProtectedSession(b.path, record=True) as s:
        if mode == "enclave-only":   # bad inputs are refused by the enclave, which keeps serving
            with pytest.raises(TinyshieldError, match="NaN"):
                s.infer({"image": np.full((1, 1, 28, 28), np.nan, np.float32)})
            with pytest.raises(TinyshieldError, match="shape"):
                s.infer({"image": np.zeros((1, 1, 14, 14), np.float32)})
        outs = [s.infer(x)[0] for x in (x1, x2, x1)]
        transcript = s.transcript()
        stats = s.accelerator_stats()
    y = outs[0]
    # the accelerator says which exact GEMM it uses: the one this CPU passes the self-test with, as here
    assert stats["kernel"] == (fieldgemm.chosen().name if mode == "blinded" else "none")
    if mode == "blinded":
        assert np.array_equal(y, fixed_point_reference(b.path, x1))           # exact, bit for bit
        assert np.array_equal(outs[2], y)                                       # fresh masks, same answer
        assert np.abs(y - plain).max() < 0.05 * np.abs(plain).max()
        assert len(list((b.path / "pads").glob("*.sealed"))) == 0               # pads are one-time
    else:
        assert np.abs(y - plain).max() <= 1e-4 * np.abs(plain).max()
    calls = len(program.linears(program.of(vit, x1)))
    if mode == "enclave-only":
        assert transcript == [] and stats["calls"] == 0
        return
    acts = [bundle.record_inputs(vit, [x]) for x in (x1, x2, x1)]
    whole = audit.whole_calls(transcript, {name: len(a) for name, a in acts[0].items()})
    assert len(whole) == 3 * calls and stats["calls"] == len(transcript)
    r = audit.transcript_report(mode, transcript, acts)
    if mode == "plain":
        assert r.rows_matched > 0 and r.repeated_input_identical == calls    # the baseline leaks everything
    elif mode == "shadownet":
        # a reused mask sends a repeated input identically, and x1 - x2 in the clear for different inputs
        assert r.repeated_input_identical == calls and r.mask_reuse_pairs == r.pairs_checked
    else:
        assert r.rows_matched == 0 and r.repeated_input_identical == 0        # no plaintext row, masks differ
        assert r.mask_reuse_pairs == 0 and r.max_row_cos < r.chance_cos + 0.1
        # digit planes of field elements, nothing else
        assert all(t.dtype == np.uint8 and np.array_equal(fieldkernels.digits(from_digits(t), unsigned=True), t)
                   for _, t in transcript)


@pytest.mark.parametrize("attack", ["replay"])   # all four attacks: test_tee.py, with the same kernel and check
def test_lying_accelerator_aborts_blinded_inference(tee_env, vit, attack):
    b = bundle.protect(vit, tee_env / f"lie-{attack}", "blinded", pads=0)
    prog = program.of(vit, images(1)[0])
    # with overlap, encoder layers go out in row parts (tee.program.pipelined), the stem's convolutions and the
    # classifier (one row) whole
    calls = sum(1 if prog.layers[name].conv else len(program.parts(n, dma.SLOTS))
                for name, n in program.rows_per_call(prog).items())
    with ProtectedSession(b.path, attack=attack, attack_after=calls, seed=1, overlap=True) as s:
        assert s.infer(images(1)[0])[1].calls == calls   # the first inference is honest
        for seed in (5, 6):      # the aborted inference's answers still in flight are drained, not misread
            with pytest.raises(TinyshieldError, match="integrity check failed"):
                s.infer(images(1, seed=seed)[0])


def test_blinded_is_exact_on_an_avx2_accelerator(tee_env, vit, monkeypatch):
    """The accelerator process with oneDNN limited to AVX2 (no VNNI: its u8 x s8 GEMM saturates) picks an exact
    kernel and gives the fixed-point reference's bits; forced onto the inexact kernel it refuses to serve, and the
    client hears why. The test process itself keeps its own oneDNN (the environment is read when torch loads)."""
    b = bundle.protect(vit, tee_env / "avx2", "blinded", pads=2)
    x = images(1)[0]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    with ProtectedSession(b.path) as s:
        y, _ = s.infer(x)
        stats = s.accelerator_stats()
    assert np.array_equal(y, fixed_point_reference(b.path, x))
    assert stats["kernel"] in ("onednn-u8-halves", "float32")
    assert "onednn-u8 failed the self-test" in stats["kernel_note"]
    monkeypatch.setenv(fieldgemm.ENV, "onednn-u8")
    with ProtectedSession(b.path) as s:
        with pytest.raises(TinyshieldError, match="FIELD_GEMM=onednn-u8: the kernel is not exact on this CPU"):
            s.infer(x)


def test_sealing_and_attestation_refusals(tee_env, vit):
    b = bundle.protect(vit, tee_env / "seal", "shadownet")
    checks = {c.check: c for c in audit.sealing_checks(b.path)}
    assert set(checks) == {"tampered ciphertext", "wrong measurement", "replayed attestation"}
    assert all(c.refused for c in checks.values()), checks
    assert "cannot unseal" in checks["tampered ciphertext"].message
    assert "replayed" in checks["replayed attestation"].message


def test_pipe_transport_and_overlap_give_the_same_exact_answer(tee_env, vit):
    b = bundle.protect(vit, tee_env / "pipe", "blinded", pads=4)
    x = images(1)[0]
    for kw in ({"transport": "pipe", "overlap": False}, {"overlap": False}, {"overlap": True},
               {"overlap": True, "transport": "pipe"}):
        with ProtectedSession(b.path, **kw) as s:
            y, t = s.infer(x)
        assert np.array_equal(y, fixed_point_reference(b.path, x)) and t.calls > 0, kw


def test_two_enclaves_on_one_bundle_never_share_a_pad(tee_env, vit):
    b = bundle.protect(vit, tee_env / "pads", "blinded", pads=3)
    first, second = Enclave(b.path), Enclave(b.path)
    taken = [e._take_pad(allow_make=False) for e in (first, second, first)]
    masks = [p["encoder.layer.0.attention.self.query+key+value.r"] for p in taken]
    assert all(not np.array_equal(masks[i], masks[j]) for i in range(3) for j in range(i))
    assert second._take_pad(allow_make=False) is None and not list((b.path / "pads").iterdir())


def test_protect_refuses_bad_arguments(tee_env, vit, tmp_path):
    with pytest.raises(TinyshieldError, match="unknown protection mode"):
        bundle.protect(vit, tmp_path / "x", "homomorphic")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(TinyshieldError, match="not a protected bundle"):
        bundle.protect(vit, tmp_path / "taken", "plain")
    with pytest.raises(TinyshieldError, match="no bundle.json"):
        ProtectedSession(tmp_path / "taken")


def test_minilm_blinded_is_exact_and_close_to_fp32(tee_env):
    from edge.models.minilm import load_minilm, load_tokenizer, tokenize
    model = load_minilm()
    b = bundle.protect(model, tee_env / "minilm", "blinded", seq_len=32, pads=1)
    t = tokenize(load_tokenizer(), ["Protected inference keeps the weights in the enclave."], pad_to=32)
    x = {"input_ids": t.input_ids.numpy().astype(np.int32), "attention_mask": t.attention_mask.numpy().astype(np.int32)}
    with ProtectedSession(b.path, backend="torch", overlap=True) as s:
        y, timing = s.infer(x)
    assert timing.calls == 2 * 24 and timing.accelerator_s > 0     # overlap: each layer in two row parts
    assert np.array_equal(y, fixed_point_reference(b.path, x))
    with pytest.raises(TinyshieldError, match="token ids"):
        Enclave(b.path).check_inputs({**x, "input_ids": x["input_ids"] + 40000})
    served = bundle.served(model)
    ref = program.forward(served, x, program.plain_lin(program.linears(program.of(served, x))))
    assert float(y[0] @ ref[0]) > 0.999     # sentence-embedding cosine to the fp32 model


def test_cli_protect_infer_audit(tee_env, vit, capsys):
    from edge.models.io import save_model
    from tools.cli import main
    mdir = save_model(vit, tee_env / "vit-model", {"kind": "vit", "model": SMALL.to_dict()})
    npy = tee_env / "digit.npy"
    np.save(npy, (np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8))
    out = tee_env / "cli-bundle"
    assert main(["protect", str(mdir), "--mode", "blinded", "--out", str(out), "--pads", "1"]) == 0
    assert main(["infer", "--protected", str(out), str(npy), str(npy)]) == 0
    text = capsys.readouterr().out
    assert "enclave attested" in text and text.count("class ") == 2
    assert f"accelerator's exact field GEMM: {fieldgemm.chosen().name}" in text
    assert main(["audit", str(out), str(npy), str(npy), "--trials", "100", "--no-sealing"]) == 0
    assert f"accelerator's exact field GEMM: {fieldgemm.chosen().name}" in capsys.readouterr().out
    report = json.loads((out / "audit.json").read_text())
    assert report["kernel"] == report["detection_kernel"] == fieldgemm.chosen().name
    assert all(d["rate"] == 1.0 and d["trials"] >= 99 for d in report["detection"])
    assert report["weights"]["exposed"] is True      # blinded (Slalom) protects inputs and integrity, not weights
    assert main(["infer", "--protected", str(tee_env / "nothing"), "x"]) == 2
    assert "no bundle.json" in capsys.readouterr().err


def test_protect_a_pt2(tee_env, vit, capsys):
    """A user's exported program is protected as it is: the .pt2 bytes are sealed, the enclave loads them from
    memory and finds the linear layers in that graph -- no model class involved."""
    from tools.cli import main
    x = images(1)[0]["image"]
    path = tee_env / "vit.pt2"
    torch.export.save(torch.export.export(vit, (torch.from_numpy(x),)), path)
    prog = program.of(vit, {"image": x})
    ref = program.forward(prog, {"image": x}, program.plain_lin(program.linears(prog)))
    for mode in ("plain", "enclave-only", "blinded"):
        b = bundle.protect(path, tee_env / f"pt2-{mode}", mode, pads=1)
        assert b.header["enclave_config"]["input"] == {"x": [1, 1, 28, 28]}
        with ProtectedSession(b.path, overlap=True) as s:
            y, t = s.infer({"x": x})
        if mode == "blinded":
            owner = Enclave(b.path)
            assert np.array_equal(y, program.forward(owner.prog, {"x": x}, blinded.reference_lin(owner.blind)))
            assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max()
        else:
            assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()
    npy = tee_env / "digit-pt2.npy"
    np.save(npy, x[0])
    out = tee_env / "pt2-cli"
    assert main(["protect", str(path), "--mode", "blinded", "--out", str(out), "--pads", "1"]) == 0
    assert main(["infer", "--protected", str(out), str(npy)]) == 0
    assert f"class {int(ref[0].argmax())}" in capsys.readouterr().out
