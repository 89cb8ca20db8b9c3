"""The sliced mode (TEESlice): only the published MiniLM's weights leave the enclave, blinded and checked; the private
slices never do. Real enclave and accelerator processes, real MiniLM weights; private slices drawn at random (the
mode does not depend on how they were trained)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from base import data
from base.errors import TinyshieldError
from tee import audit, blinded, bundle, program, stealing
from tee.client import ProtectedSession
from tee.enclave import Enclave
from tee.modes import get

pytestmark = pytest.mark.slow
SEQ = 16


@pytest.fixture(scope="module")
def tee_env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    d = tmp_path_factory.mktemp("tee-sliced")
    mp.setenv("TINYSHIELD_BUILD", str(d / "build"))
    mp.setenv("TINYSHIELD_ROOT_KEY", str(d / "root.key"))
    yield d
    mp.undo()


@pytest.fixture(scope="module")
def public():
    from edge.models.minilm import load_minilm
    return load_minilm()


def perturbed(model, seed: int, skip=frozenset()):
    """Every parameter not in `skip` moved at random (a stand-in for training), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n not in skip:
                p.add_(torch.randn(p.shape, generator=g) * 0.05 * (p.std() if p.numel() > 1 and p.std() > 0 else 1))
    return model.eval()


@pytest.fixture(scope="module")
def sliced(public):
    from edge.models.sliced import from_public
    torch.manual_seed(0)     # the head's initial weights: the same model (and fp32 logits) in every run
    model = from_public(public, 2, rank=4)
    return perturbed(model, 0, skip=model.public_state_names())


def sentence(text):
    from edge.models.minilm import load_tokenizer, tokenize
    t = tokenize(load_tokenizer(), [text], pad_to=SEQ)
    return {"input_ids": t.input_ids.numpy().astype(np.int32), "attention_mask": t.attention_mask.numpy().astype(np.int32)}


def test_sliced_is_exact_and_the_accelerator_holds_only_public_weights(tee_env, sliced, public):
    b = bundle.protect(sliced, tee_env / "sliced", "sliced", seq_len=SEQ, pads=3)
    x1, x2 = sentence("A quiet, moving film."), sentence("The plot never holds together.")
    with ProtectedSession(b.path, record=True, overlap=True) as s:
        outs = [s.infer(x)[0] for x in (x1, x2, x1)]
        transcript = s.transcript()
    owner = Enclave(b.path)
    # bit for bit the fixed-point reference of the same model (public layers in fixed point, the rest fp32)
    for y, x in zip(outs, (x1, x2, x1)):
        ref = program.forward(owner.prog, x, blinded.reference_lin(owner.blind))
        assert np.array_equal(y, ref), (y, ref)
    with torch.no_grad():
        fp32 = sliced(torch.from_numpy(x1["input_ids"]).long(), torch.from_numpy(x1["attention_mask"]).long()).numpy()
    assert np.abs(outs[0] - fp32).max() < 0.05 * np.abs(fp32).max()
    # the 6 x 4 outsourced calls are the public backbone's linears; adapters and head stay in the enclave
    assert len(owner.params) == 24 and not any("down" in n or "up" in n or "classifier" in n for n in owner.params)
    # the accelerator's model file is exactly the published weights, int8: nothing else
    accel = load_file(str(b.path / "accelerator" / "weights.safetensors"))
    pub = public.state_dict()
    for name, layer in owner.prog.layers.items():
        w = torch.cat([pub[stealing.module_path(n).removeprefix("bert.") + ".weight"] for n in layer.nodes]).numpy()
        assert np.array_equal(accel[name], blinded.quantize_weights(w)[0].T.astype(np.int8)), name
    # no private vector (adapters, head, trained biases and LayerNorms) in the model file or the transcript
    from tee.modes.sliced import private_exposure
    p = private_exposure(owner.model, accel, transcript, audit.MIN_DIM)
    assert p.tensors > 0 and p.vectors > 100 and p.matched == 0, p
    assert p.max_cos_weights < 0.9 and p.max_cos_transcript < p.chance_cos + 0.1, p
    acts = [bundle.record_inputs(owner.prog, [x]) for x in (x1, x2, x1)]
    r = audit.transcript_report("sliced", transcript, acts)
    assert r.rows_matched == 0 and r.repeated_input_identical == 0 and r.max_row_cos < r.chance_cos + 0.1, r


def test_the_enclave_runs_no_step_for_weights_or_reshapes_that_change_nothing(sliced):
    """The plan binds every weight (and W^T of an adapter, made contiguous) at build time and skips reshapes and
    expands to the shape their input has: about half the captured graph's nodes, the same result."""
    x = sentence("A quiet, moving film.")
    prog = bundle.captured(sliced, {k: list(v.shape) for k, v in x.items()}, get("sliced").outsourced(sliced))
    steps = [s.node for s in prog.plan]
    assert not any(n.op == "placeholder" and n.name not in prog.cap.user_inputs for n in steps)
    assert not any(n.target in (torch.ops.aten.permute.default, torch.ops.aten.t.default) and
                   all(a.op == "placeholder" for a in n.all_input_nodes) for n in steps)
    shape = lambda n: tuple(n.meta["val"].shape)
    assert not any(n.target in (torch.ops.aten.view.default, torch.ops.aten.expand.default) and
                   shape(n) == shape(n.args[0]) for n in steps if n.name not in prog.member)
    assert len(steps) < 0.6 * len(prog.cap.graph.nodes)
    with torch.no_grad():
        eager = sliced(*(torch.from_numpy(v).long() for v in x.values())).numpy()
    y = program.forward(prog, x, program.plain_lin(program.linears(prog)))
    np.testing.assert_allclose(y, eager, rtol=1e-5, atol=1e-5)


def test_sliced_lying_accelerator_is_caught(tee_env, sliced):
    b = bundle.protect(sliced, tee_env / "sliced-lie", "sliced", seq_len=SEQ, pads=0)
    calls = 24
    with ProtectedSession(b.path, attack="swap", attack_after=calls, seed=1, overlap=False) as s:
        assert s.infer(sentence("fine"))[1].calls == calls
        with pytest.raises(TinyshieldError, match="integrity check failed"):
            s.infer(sentence("a lie in every answer"))
    report = audit.run_audit(b.path, [sentence("one"), sentence("two")], trials=20, sealing=False)
    assert report.mode == "sliced" and report.private.matched == 0
    assert all(d.rate == 1.0 and d.trials >= 19 for d in report.detection)


def test_sliced_refuses_private_weights_on_the_accelerator(tee_env, sliced, public):
    from edge.models.bert import BertClassifier
    with pytest.raises(TinyshieldError, match="partitioned before training"):
        bundle.protect(BertClassifier(public.config, 2), tee_env / "x", "sliced", seq_len=SEQ)
    import copy
    changed = copy.deepcopy(sliced)
    with torch.no_grad():
        changed.bert.encoder.layer[3].intermediate.dense.base.weight[5, 7] += 0.01
    with pytest.raises(TinyshieldError, match="not the published all-MiniLM-L6-v2"):
        bundle.protect(changed, tee_env / "y", "sliced", seq_len=SEQ)
    assert not (tee_env / "y").exists()


def test_stealing_and_membership_small(tee_env, sliced, public):
    """The attacks in a small configuration: what the accelerator held gives the thief the victim's own weights in
    plain mode and nothing beyond the public ones in sliced mode."""
    from edge.models.bert import BertClassifier
    texts = data.sentences("test")
    thief = BertClassifier(public.config, 2)
    thief.bert.load_state_dict(public.state_dict())
    full = BertClassifier(public.config, 2)
    full.bert.load_state_dict(public.state_dict())
    full = perturbed(full, 2)        # a stand-in for a fully fine-tuned copy
    results = {}
    for mode, victim in (("plain", full), ("sliced", sliced)):
        b = bundle.protect(victim, tee_env / f"steal-{mode}", mode, seq_len=SEQ, pads=0, litert=False)
        owner = Enclave(b.path)
        accel = load_file(str(b.path / "accelerator" / "weights.safetensors"))
        recovered = get(mode).recover(accel, stealing.public_layers(owner.prog, thief.state_dict()))
        true = {n: w for n, (w, _) in program.linears(owner.prog).items()}
        if mode == "plain":    # every linear, the head too, exactly
            assert set(recovered) == set(true) and all(np.array_equal(recovered[n], true[n]) for n in true)
        else:                  # int8 public rows: the public weights again, nothing of the victim's slices
            pub = stealing.public_layers(owner.prog, thief.state_dict())
            assert set(recovered) == set(pub)
            for n, w in recovered.items():
                cos, _ = audit.best_abs_cos(w, pub[n])
                assert cos.min() > 0.99
        results[mode] = stealing.steal(mode, victim, owner.prog, accel, thief, texts.texts[:40], texts.texts[40:],
                                       texts.labels[40:], ns=(10, 40), max_len=SEQ)
        assert [t.n for t in results[mode]] == [10, 40]
        for t in results[mode]:
            assert 0 <= t.stolen_accuracy <= 1 and 0 <= t.blackbox_agreement <= 1 and t.layers_recovered > 0
    # the fine-tuning thief (a tiny budget here): against sliced it starts from the public backbone -- the black-box
    # thief's own starting point, so the two are the same model
    for mode, victim in (("plain", full), ("sliced", sliced)):
        b = bundle.load_header(tee_env / f"steal-{mode}")
        accel = load_file(str(b.path / "accelerator" / "weights.safetensors"))
        (t,) = stealing.steal_finetune(mode, victim, Enclave(b.path).prog, accel, thief, texts.texts[:8],
                                       texts.texts[40:60], texts.labels[40:60], ns=(8,), max_len=SEQ, passes=16)
        assert t.attack == "finetune" and t.n == 8 and 0 <= t.stolen_agreement <= 1
        if mode == "sliced":
            assert t.layers_recovered == 0 and t.stolen_accuracy == t.blackbox_accuracy
        else:
            assert t.layers_recovered > 0 and t.head_recovered
    m = stealing.membership("sliced", sliced, texts.texts[:20], texts.labels[:20], texts.texts[20:40],
                            texts.labels[20:40], max_len=SEQ)
    assert m.members == m.nonmembers == 20 and 0 <= m.balanced_accuracy <= 1 and 0 <= m.auc <= 1
