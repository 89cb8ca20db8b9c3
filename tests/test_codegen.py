"""Generated C (model.c + kernels, host gcc via ctypes) equals the numpy reference for whole models,
compiles warning-free for the host and for Cortex-M4, and refuses what the runtime lacks."""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from base.errors import InternalError, TinyshieldError
from edge.models.bert import BertClassifier, BertConfig
from edge.models.vit import ViT, ViTConfig
from mcu.codegen import generate
from mcu.execute import run
from mcu.schedules import layerwise
from mcu.graph import Call, Const, Ref, Schedule, Tensor
from mcu.hostlib import KERNEL_DIR, HostModel, kernel_sources
from base.data import image_batch
from mcu.from_aten import lower_module
from mcu.planner import check, plan

WARN = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror"]
ARM = ["arm-none-eabi-gcc", "-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"]


def bert_tiny_graph(L=32, vocab=500, clr=False):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=512, max_position_embeddings=64)
    m = BertClassifier(cfg).eval()
    quant = None
    if clr:
        from edge.compress.clr import QuantCLR, factorize, layout_from_clusters
        lay = layout_from_clusters(np.arange(vocab) % 4, ranks=(8, 16, 16, 128), dense=(False, False, False, True), dim=128)
        quant = QuantCLR.from_float(factorize(m.bert.embeddings.word_embeddings.weight.detach(), lay))
        m.bert.embeddings.word_embeddings = quant.to_float()
    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocab, size=(24, L)).astype(np.int32)
    for r in ids:
        r[rng.integers(4, L):] = 0
    return lower_module(m, ids[:16], clr={"bert.embeddings.word_embeddings": quant} if quant else None), ids[16:]


def vit_graph():
    torch.manual_seed(0)
    m = ViT(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)).eval()
    rng = np.random.default_rng(0)
    imgs = (rng.random((24, 28, 28)) ** 3 * 255).astype(np.uint8)
    inputs = [(im.astype(np.int16) - 128).astype(np.int8).reshape(28, 28, 1) for im in imgs[16:]]
    return lower_module(m, image_batch(imgs[:16])), inputs


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    g, inputs = vit_graph()
    s = layerwise(g)
    p = plan(s)
    check(p, s)
    return s, p, generate(s, p, tmp_path_factory.mktemp("vit")), inputs


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    g, ids = bert_tiny_graph()
    s = layerwise(g)
    p = plan(s)
    return s, p, generate(s, p, tmp_path_factory.mktemp("bert")), list(ids)


@pytest.fixture(scope="module")
def bert_clr(tmp_path_factory):
    g, ids = bert_tiny_graph(clr=True)
    s = layerwise(g)
    p = plan(s)
    return s, p, generate(s, p, tmp_path_factory.mktemp("bert_clr")), list(ids)


@pytest.mark.parametrize("variant", ["portable", "dsp"])
@pytest.mark.parametrize("model", ["vit", "bert", "bert_clr"])
def test_generated_model_equals_reference(model, variant, request):
    s, p, gen, inputs = request.getfixturevalue(model)
    hm = HostModel(gen.dir, variant)
    assert hm.info.arena_bytes == p.arena_bytes and hm.info.macs == s.macs()
    for x in inputs:
        ref = run(s, {s.graph.inputs[0]: x}, p)[s.graph.outputs[0]]
        assert np.array_equal(hm.run(x), ref)


def test_model_info_describes_io(vit, bert):
    s, p, gen, _ = bert
    hm = HostModel(gen.dir)
    i = hm.info
    assert i.name == b"BertClassifier-int8" and i.input_dtype == 3 and i.output_dtype == 0
    assert list(i.input_shape) == [32, 0, 0, 0] and list(i.output_shape) == [1, 2, 0, 0]
    assert i.input_bytes == 128 and i.output_bytes == 2
    t = s.graph.tensors["output"].q
    assert i.output_zero_point == t.zero_point and abs(i.output_scale - t.scale[0]) < 1e-6 * t.scale[0]
    vi = HostModel(vit[2].dir).info
    assert vi.input_dtype == 0 and vi.input_zero_point == -128 and list(vi.input_shape) == [28, 28, 1, 0]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vit", "bert", "bert_clr"])
def test_generated_c_compiles_warning_free_host_and_cortex_m4(model, request, tmp_path, arm_toolchain):
    gen = request.getfixturevalue(model)[2]
    srcs = [str(gen.model_c)] + [str(p) for p in kernel_sources()]
    for cc in (["gcc"], ARM):
        for src in srcs:
            r = subprocess.run([*cc, *WARN, f"-I{KERNEL_DIR}", f"-I{gen.dir}", "-c", src, "-o", str(tmp_path / "x.o")],
                               capture_output=True, text=True)
            assert r.returncode == 0, f"{cc[0]} {src}:\n{r.stderr}"


def test_missing_kernel_and_dtype_are_refused(vit, tmp_path):
    s, p, _, _ = vit
    bad = Schedule(s.name, s.graph, s.buffers, list(s.calls) + [Call("fft_s8", (Ref("input"),), "stem.fft")])
    with pytest.raises(InternalError, match=r"op stem\.fft: kernel 'fft_s8' does not exist"):
        generate(bad, p, tmp_path)
    g = s.graph
    g.tensors["float_bias"] = Tensor("float_bias", (4,), "float32", "const", None, np.zeros(4, np.float32))
    g.ops[0].inputs.append("float_bias")
    try:
        with pytest.raises(TinyshieldError, match=r"float32.*float_bias.*op stem\.conv1"):
            generate(s, p, tmp_path)
    finally:
        g.ops[0].inputs.pop()
        del g.tensors["float_bias"]
    wrong = Schedule(s.name, g, s.buffers, [Call("lut_s8", (Const("stem.conv1.bias"), Const("stem.conv1.bias"),
                                                            Ref("input"), 4), "x")])
    with pytest.raises(InternalError, match="is int32"):
        generate(wrong, p, tmp_path)


@pytest.mark.parametrize("model", ["vit", "bert_clr"])
def test_generated_tiled_schedule_equals_layerwise_reference(model, request, tmp_path):
    from mcu.schedules import tiled

    s_lw, _, _, inputs = request.getfixturevalue(model)
    g = s_lw.graph
    s = tiled(g)
    p = plan(s)
    check(p, s)
    hm = HostModel(generate(s, p, tmp_path).dir, "dsp")
    for x in inputs[:3]:
        assert np.array_equal(hm.run(x), run(s_lw, {g.inputs[0]: x})[g.outputs[0]])


def test_conv_patch_over_the_kernel_limit_is_refused_naming_the_layer(vit, tmp_path):
    from mcu.kernels import CONV_PATCH_MAX, KERNELS

    s, p, _, _ = vit
    names = [n for n, _ in KERNELS["conv2d_s8"].params]
    i = next(j for j, c in enumerate(s.calls) if c.kernel == "conv2d_s8")
    c = s.calls[i]
    args = list(c.args)
    args[names.index("ksize")], args[names.index("Cin")] = 3, 29          # 3 * 3 * 29 = 261 -> 264 > 256
    calls = list(s.calls)
    calls[i] = Call(c.kernel, tuple(args), c.op, c.macs)
    with pytest.raises(TinyshieldError, match=rf"layer {re.escape(c.op)}: a 3x3x29 conv2d patch is 264 bytes, "
                                              rf"over the C kernel's limit of {CONV_PATCH_MAX}"):
        generate(Schedule(s.name, s.graph, s.buffers, calls), p, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_conv_kernel_traps_instead_of_returning_on_a_long_patch(tmp_path):
    """The C kernel's own guard: a patch over TSH_CONV_PATCH_MAX stops the program (the board's fault
    handler; SIGILL here) rather than leaving the output unwritten."""
    script = (
        "import numpy as np\n"
        "from mcu.hostlib import HostKernels\n"
        "f = HostKernels('portable')['conv2d_s8']\n"
        "x = np.zeros(4 * 4 * 64, np.int8); w = np.zeros(2 * 1024, np.int8)\n"
        "b = np.zeros(2, np.int32); y = np.zeros(2 * 2 * 2, np.int8)\n"
        "f(x, w, b, b, b, y, 4, 4, 64, 2, 2, 2, 3, 1, 0, 0, 0, -128, 127)\n"
        "print('returned')\n")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, env=env)
    assert r.returncode == -signal.SIGILL and "returned" not in r.stdout, (r.returncode, r.stdout, r.stderr[-500:])
