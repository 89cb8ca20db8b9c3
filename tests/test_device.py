"""The whole deployment path on the emulated boards, with the project's own code generator:
a small random-initialised ViT -> int8 graph -> schedule -> arena plan -> C -> firmware -> QEMU,
and the device's logits against the host int8 reference, bit for bit."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from base.data import data_dir, mnist
from edge.models.io import save_model
from edge.models.vit import ViT, ViTConfig
from mcu.build import build_model
from mcu.device import evaluate, open_board

pytestmark = [pytest.mark.qemu]


@pytest.fixture(scope="module")
def env(tmp_path_factory, arm_toolchain):
    """A session build cache and a small ViT (random weights, real MNIST calibration)."""
    root = tmp_path_factory.mktemp("device")
    old = os.environ.get("TINYSHIELD_BUILD")
    os.environ["TINYSHIELD_BUILD"] = str(root / "build")
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, stem_channels=8)
    model_dir = save_model(ViT(cfg).eval(), root / "vit-small", {"kind": "vit", "model": cfg.to_dict()})
    ds = mnist(allow_fallback=data_dir(required=False) is None)
    yield model_dir, ds
    if old is None:
        os.environ.pop("TINYSHIELD_BUILD", None)
    else:
        os.environ["TINYSHIELD_BUILD"] = old


@pytest.fixture(scope="module")
def built(env):
    model_dir, _ = env
    return build_model(str(model_dir), "stm32f405", calib=64)


@pytest.mark.slow
def test_one_inference_equals_the_reference(env, built):
    _, ds = env
    with open_board(built.firmware) as dev:
        info = dev.info
        assert info.input_shape == built.graph.tensors["input"].shape
        assert info.arena_bytes == built.plan.arena_bytes and info.macs == built.macs
        q = built.quantise_input(ds.x_test[0])
        r = dev.infer(q)
        assert np.array_equal(r.output.reshape(-1), built.reference(q).reshape(-1))
        again = dev.infer(q)
        assert again.instructions == r.instructions > built.macs // 4       # exact and repeatable
        assert r.peak_sram == built.plan.arena_bytes + r.stack_bytes and 0 < r.stack_bytes < 8192


@pytest.mark.slow
def test_evaluation_on_another_board(env):
    model_dir, ds = env
    b = build_model(str(model_dir), "mps3-an547", calib=64)
    with open_board(b.firmware) as dev:
        ev = evaluate(dev, b, ds.x_test[:8], ds.y_test[:8])
    assert ev.agreement == 1.0 and not ev.mismatches
    assert ev.mean_instructions > 0 and ev.instructions_per_mac > 0
    assert ev.peak_sram == b.plan.arena_bytes + ev.stack_max


@pytest.mark.slow
def test_uncompressed_bert_tiny_is_refused_naming_the_overflow(env, tmp_path):
    """BERT-tiny's 30522 x 128 word embedding alone (3.9 MB int8) cannot fit 1 MB of flash; with a
    small vocabulary but L = 512, its attention scores cannot fit 192 KB of RAM."""
    from base.errors import TinyshieldError
    from edge.models.bert import BertClassifier, BertConfig
    from mcu.build import deploy_graph
    from mcu.from_aten import lower_module

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    bert = BertClassifier(BertConfig(), 2).eval()
    ids = rng.integers(1, 30522, (4, 32))
    g = lower_module(bert, ids)
    with pytest.raises(TinyshieldError, match=r"does not fit board stm32f405: FLASH overflowed by at least [\d,]+ bytes"):
        deploy_graph(g, "stm32f405", tmp_path / "flash")

    small = BertClassifier(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, intermediate_size=64), 2)
    g = lower_module(small.eval(), rng.integers(1, 100, (4, 512)))
    with pytest.raises(TinyshieldError, match=r"stm32f405: RAM overflowed by at least [\d,]+ bytes .* tiled schedule"):
        deploy_graph(g, "stm32f405", tmp_path / "ram")


def _garbage(rng: np.random.Generator, k: int) -> bytes:
    """One malformed frame of a few kinds: noise, bit flips, truncation, bad lengths, unknown commands."""
    from mcu.link import MAX_PAYLOAD, SYNC, frame
    kind = k % 7
    good = frame(int(rng.choice([1, 2, 4, 5, 7])), int(rng.integers(256)), rng.bytes(int(rng.integers(0, 40))))
    if kind == 0:
        return rng.bytes(int(rng.integers(1, 64)))
    if kind == 1:                                    # flip a bit somewhere after the sync bytes
        b = bytearray(good)
        i = int(rng.integers(2, len(b)))
        b[i] ^= 1 << int(rng.integers(8))
        return bytes(b)
    if kind == 2:                                    # cut short, then the next frame arrives
        return good[:int(rng.integers(1, len(good)))]
    if kind == 3:                                    # a length beyond the limit
        return SYNC + bytes([1, 0]) + int(rng.integers(MAX_PAYLOAD + 1, 65536)).to_bytes(2, "little")
    if kind == 4:                                    # valid frame, unknown command
        return frame(int(rng.integers(0x08, 0x7F)), int(rng.integers(256)), rng.bytes(4))
    if kind == 5:                                    # valid frame, bad arguments
        return frame(int(rng.choice([2, 3, 4, 6])), int(rng.integers(256)), rng.bytes(int(rng.integers(1, 3))))
    return SYNC * int(rng.integers(1, 4)) + rng.bytes(int(rng.integers(0, 8)))


@pytest.mark.slow
def test_firmware_survives_fuzzing_and_still_answers_correctly(env, built):
    _, ds = env
    rng = np.random.default_rng(0)
    q = built.quantise_input(ds.x_test[1])
    with open_board(built.firmware) as dev:
        before = dev.infer(q)
        sent = 0
        for _ in range(100):
            dev.link.send_raw(b"".join(_garbage(rng, k) for k in range(sent, sent + 20)))
            sent += 20
            dev.link.drain(quiet=0.01)               # read the error replies so the UART never blocks
        assert sent >= 2000
        dev.link.send_raw(bytes(1100))               # complete whatever partial frame the noise left open
        dev.link.drain(quiet=0.3)
        st = dev.link.stats()
        assert st.frames_crc + st.frames_malformed > 500
        assert dev.link.info().name == dev.info.name
        after = dev.infer(q)
        assert np.array_equal(after.output, before.output)
        assert np.array_equal(after.output.reshape(-1), built.reference(q).reshape(-1))
        assert after.instructions == before.instructions


@pytest.mark.slow
def test_two_boards_at_once(env, built):
    import threading

    model_dir, ds = env
    other = build_model(str(model_dir), "mps2-an386", calib=64)
    results, errors = {}, []

    def work(b):
        try:
            with open_board(b.firmware) as dev:
                same = []
                for x in ds.x_test[:4]:
                    q = b.quantise_input(x)
                    same.append(np.array_equal(dev.infer(q).output.reshape(-1), b.reference(q).reshape(-1)))
                results[b.board] = (dev.emulator.port, same)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(b,)) for b in (built, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results["stm32f405"][0] != results["mps2-an386"][0]
    assert all(results["stm32f405"][1]) and all(results["mps2-an386"][1])


@pytest.mark.slow
def test_cli_flash_run_eval_stop(env, built, capsys):
    """`tinyshield flash` leaves the board running, `run`/`eval --board` use it, `flash --stop` ends it."""
    from mcu import flash
    from tools.cli import main

    model_dir, _ = env
    common = ["--board", "stm32f405", "--calib", "64"]
    assert main(["flash", str(built.firmware.elf)]) == 0
    rb = flash.running("stm32f405")
    assert rb is not None and rb.alive()
    try:
        assert main(["run", str(model_dir), "mnist:0", "--board", "stm32f405"]) == 0
        out = capsys.readouterr().out
        assert "host int8 reference identical" in out and "instructions" in out
        assert main(["eval", str(model_dir), *common, "--limit", "3"]) == 0
        out = capsys.readouterr().out
        assert "100.00% (3/3 bit-identical)" in out and "instructions / MAC" in out
        assert flash.running("stm32f405").pid == rb.pid          # the flashed board served both
    finally:
        assert main(["flash", "--board", "stm32f405", "--stop"]) == 0
    assert flash.running("stm32f405") is None and not os.path.exists(f"/proc/{rb.pid}")


def test_cli_errors_are_one_line(env, built, capsys, tmp_path):
    import importlib.util

    from tools.cli import main
    if importlib.util.find_spec("pyocd") is None:
        assert main(["flash", str(built.firmware.elf), "--probe"]) == 2
        assert "needs pyocd, the optional 'flash' extra" in capsys.readouterr().err
    assert main(["flash", str(tmp_path / "nope.elf")]) == 2
    assert "not a firmware built by `tinyshield build`" in capsys.readouterr().err
    assert main(["eval", "no-such-model", "--board", "stm32f405"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


@pytest.mark.slow
def test_bert_with_clr_embedding_on_device(env, shared_data, tmp_path):
    """A BERT classifier whose 30522-token word table is clustered low-rank (the `tinyshield
    compress` format), calibrated on SST-2: the device's logits equal the host reference."""
    from edge.compress.clr import QuantCLR, factorize, layout_from_clusters
    from edge.compress.io import save_compressed
    from edge.compress.model import set_word_embeddings
    from base.data import sst2
    from edge.models.bert import BertClassifier, BertConfig
    from edge.models.minilm import load_tokenizer, tokenize

    torch.manual_seed(0)
    model = BertClassifier(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64), 2).eval()
    table = model.bert.embeddings.word_embeddings.weight.detach()
    cluster_of = (np.arange(table.shape[0]) >= 1000).astype(np.int64)     # frequent ids dense, the rest rank 8
    clr = factorize(table, layout_from_clusters(cluster_of, ranks=(32, 8), dense=(True, False), dim=32))
    set_word_embeddings(model, clr)
    d = save_compressed(model, QuantCLR.from_float(clr), tmp_path / "bert-clr")

    b = build_model(str(d), "stm32f405", calib=32, seq_len=32)
    assert b.graph.const_bytes() < 30522 * 32                             # less than the dense int8 table alone
    texts = sst2("dev").texts[:3]
    ids = tokenize(load_tokenizer(), texts, pad_to=32).input_ids.numpy().astype(np.int32)
    with open_board(b.firmware) as dev:
        assert dev.info.input_dtype == "int32" and dev.info.input_shape == (32,)
        for x in ids:
            q = b.quantise_input(x)
            assert np.array_equal(dev.infer(q).output.reshape(-1), b.reference(q).reshape(-1))
