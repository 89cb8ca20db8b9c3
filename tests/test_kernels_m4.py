"""The C kernels compiled for Cortex-M4 (DSP path: SMLAD/SXTB16 asm) and run on the emulated board
equal the numpy reference bit for bit: one firmware whose model is a hand-made schedule calling
every kernel on random and adversarial arguments (fast and slow requantisation paths, K not a
multiple of 4, K beyond one straight-line block, extreme shifts and biases)."""
import numpy as np
import pytest

from mcu.graph import Buffer, Call, Const, Graph, Ref, Schedule, Tensor
from mcu.kernels import conv_patch_len, exp_lut, pack_fc_weights
from mcu.tiled import attention_scratch

pytestmark = pytest.mark.slow


def kernel_zoo(seed=0):
    rng = np.random.default_rng(seed)
    tensors, calls, out = {}, [], [0]
    i8 = lambda n: rng.integers(-128, 128, size=n).astype(np.int8)

    def const(name, data):
        dt = {np.int8: "int8", np.int16: "int16", np.int32: "int32", np.uint16: "uint16"}[data.dtype.type]
        tensors[name] = Tensor(name, data.shape, dt, "const", None, np.ascontiguousarray(data))
        return Const(name)

    def dest(nbytes):
        r = Ref("output", out[0])
        out[0] += (nbytes + 3) // 4 * 4
        return r

    X = 4096
    # fully connected: (M, K, N, fast requantisation?)
    # (fast: 3-row blocks of 1..4 chunks of steps, 2-row and single-row tails; "edge": the rails of
    # the short requantisation, right shifts 1 and 23, zero points -128 and 127)
    for j, (M, K, N, fast) in enumerate([(7, 128, 9, True), (5, 36, 6, True), (3, 260, 5, True), (4, 516, 4, True),
                                         (6, 64, 8, False), (2, 30, 3, False), (1, 12, 2, True),
                                         (8, 512, 6, "edge"), (2, 96, 4, "edge")]):
        W = rng.integers(-127, 128, size=(N, K)).astype(np.int8)
        if fast == "edge":
            bias = rng.choice([-(2 ** 29) + 1, 2 ** 29 - 1, 0], N)
            mult, shift = rng.choice([0, 2 ** 31 - 1, 2 ** 30], N), rng.choice([-1, -23, -2], N)
            lo, hi = -128, 127
        elif fast:
            bias, mult, shift = rng.integers(-2 ** 20, 2 ** 20, N), rng.integers(2 ** 30, 2 ** 31, N), rng.integers(-20, -6, N)
            lo, hi = -128, 127
        else:
            bias = rng.choice([-(2 ** 30), 2 ** 30, 5], N)
            mult = rng.choice([0, 1, 2 ** 31 - 1, 2 ** 30], N)
            shift = rng.choice([-31, 0, 3, 30, -25], N)
            lo, hi = -20, 90
        zp = int(rng.integers(-128, 128))
        if fast == "edge":
            zp = -128 if K == 512 else 127
        args = (Ref("input"), const(f"w{j}", pack_fc_weights(W)), const(f"b{j}", bias.astype(np.int32)),
                const(f"m{j}", mult.astype(np.int32)), const(f"s{j}", shift.astype(np.int32)), dest(M * N),
                M, K, N, K, N, zp, lo, hi)
        calls.append(Call("fc_s8", args, f"fc{j}", M * K * N))
    calls.append(Call("matmul_qk_s8", (Ref("input"), Ref("input", 100), dest(6 * 7), 6, 7, 16, 20, 24, 7,
                                       -3, 17, 1 << 30, -9, 5), "qk"))
    p = rng.integers(0, 2 ** 15, size=5 * 9).astype(np.int16)
    calls.append(Call("matmul_pv_s8", (const("p", p), Ref("input", 7), dest(5 * 12), 5, 9, 12, 9, 13, 12,
                                       -7, 1 << 30, -14, 3), "pv"))
    # a wider head, an odd number of keys
    p8 = rng.integers(0, 2 ** 15, size=4 * 13).astype(np.int16)
    calls.append(Call("matmul_pv_s8", (const("p8", p8), Ref("input", 11), dest(4 * 16), 4, 13, 16, 13, 17, 16,
                                       5, 1 << 30, -12, -3), "pv-8cols"))
    # whole groups of 16 keys (the assembly loop) with and without remaining pairs and an odd key;
    # an odd row stride (unaligned rows: the C loop)
    for name, (Lq, Lk, dh, ps, vs) in {"pv-64": (5, 64, 16, 64, 20), "pv-37": (3, 37, 8, 38, 9),
                                       "pv-odd-stride": (3, 33, 4, 33, 5)}.items():
        pg = rng.integers(-2 ** 15, 2 ** 15, size=Lq * ps).astype(np.int16)
        calls.append(Call("matmul_pv_s8", (const(name, pg), Ref("input", 3), dest(Lq * dh), Lq, Lk, dh, ps, vs, dh,
                                           int(rng.integers(-128, 128)), 3 << 29, -15, -2), name))
    calls.append(Call("conv2d_s8", (Ref("input"), const("cw", i8(4 * conv_patch_len(3, 3))), const("cb", rng.integers(-999, 999, 4).astype(np.int32)),
                                    const("cm", np.full(4, 1 << 30, np.int32)), const("cs", np.full(4, -8, np.int32)),
                                    dest(4 * 4 * 4), 7, 7, 3, 4, 4, 4, 3, 2, 1, -128, 3, 3, 127), "conv"))
    # the short requantisation at its edges: accumulators near and beyond 2^30, rails everywhere
    calls.append(Call("matmul_qk_s8", (Ref("input", 2000), Ref("input", 2000), dest(4 * 4), 4, 4, 64, 64, 64, 4,
                                       -128, -128, (1 << 31) - 1, -1, 127), "qk-rails"))
    # a last block of three queries, a head width below the straight-line maximum, zero point -128
    calls.append(Call("matmul_qk_s8", (Ref("input", 1000), Ref("input", 1500), dest(7 * 9), 7, 9, 48, 50, 52, 9,
                                       11, -6, 3 << 29, -5, -128), "qk-rows3"))
    # shifts >= 0 (the short left-shift requantisation) with accumulators at its limit and beyond
    calls.append(Call("matmul_qk_s8", (Ref("input", 2000), Ref("input", 40), dest(5 * 6), 5, 6, 32, 40, 36, 6,
                                       -128, 3, (1 << 31) - 1, 12, -7), "qk-left"))
    calls.append(Call("matmul_qk_s8", (Ref("input", 60), Ref("input", 40), dest(5 * 6), 5, 6, 32, 40, 36, 6,
                                       5, -4, 1 << 30, 0, 2), "qk-shift0"))
    pbig = np.full(3 * 200, 32767, np.int16)
    pbig[::7] = -32768
    calls.append(Call("matmul_pv_s8", (const("pbig", pbig), Ref("input", 2000), dest(3 * 8), 3, 200, 8, 200, 8, 8,
                                       -128, (1 << 31) - 1, -23, 0), "pv-big"))
    calls.append(Call("conv2d_s8", (Ref("input"), const("cw2", i8(2 * conv_patch_len(3, 2))), const("cb2", np.array([2 ** 28, -5], np.int32)),
                                    const("cm2", np.array([1 << 30, 3 << 29], np.int32)), const("cs2", np.array([-1, -23], np.int32)),
                                    dest(5 * 5 * 2), 5, 5, 2, 2, 5, 5, 3, 1, 1, 100, -3, -128, 127), "conv-fast"))
    mask = const("mask", np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1], np.int8))
    sm = dest(2 * 4 * 11)
    calls.append(Call("softmax_s16", (Ref("input"), mask, const("lut", exp_lut(0.07)), sm, 4, 11, 11, 11), "softmax"))
    d = 24
    calls.append(Call("add_layernorm_s8", (Ref("input"), Ref("input", 300), const("gm", rng.integers(-2 ** 31, 2 ** 31, d).astype(np.int32)),
                                           const("gs", rng.integers(-20, -5, d).astype(np.int32)),
                                           const("gb", rng.integers(-60, 60, d).astype(np.int32)), dest(3 * d), 3, d,
                                           7, -9, 4096, 1234, 77, -4), "ln"))
    # the short paths at model width: a padding mask (a prefix of valid keys), LayerNorm rows of 64
    sm2 = dest(2 * 3 * 13)
    calls.append(Call("softmax_s16", (Ref("input", 500), const("mask2", (np.arange(13) < 9).astype(np.int8)),
                                      const("lut2", exp_lut(0.05)), sm2, 3, 13, 17, 13), "softmax-prefix"))
    d = 64
    calls.append(Call("add_layernorm_s8", (Ref("input", 900), Ref("input", 1400), const("gm2", (rng.integers(1 << 30, 1 << 31, d) * rng.choice([-1, 1], d)).astype(np.int32)),
                                           const("gs2", rng.integers(-12, -1, d).astype(np.int32)),
                                           const("gb2", rng.integers(-60, 60, d).astype(np.int32)), dest(5 * d), 5, d,
                                           3, -2, 4096, 2901, 1000, 6), "ln-64"))
    calls.append(Call("lut_s8", (Ref("input"), const("t", i8(256)), dest(50), 50), "lut"))
    calls.append(Call("mean_pool_s8", (Ref("input"), mask, dest(8), 11, 8, 3, 1 << 30, -6, -2), "pool"))
    ids = const("ids", np.array([3, 0, 9, 2, 40, -1], np.int32))
    calls.append(Call("embedding_s8", (ids, const("emb", i8(10 * 6)), dest(36), 6, 6, 10), "emb"))
    calls.append(Call("pad_mask", (ids, dest(6), 6), "mask"))
    # clustered low-rank embedding: a rank-3 cluster (left shift, then a right shift: the short path), a
    # rank-5 cluster whose shifts leave it (right shift 30), a dense one
    V, de = 9, 12
    clusters = np.array([[0, 4, 3, 0, 0, 0, 0, -7, 2], [4, 3, 5, 0, 12, 36, 12, -30, -1],
                         [7, 2, de, 1, 27, 0, 0, -3, 0]], np.int32)
    calls.append(Call("embedding_clr_s8", (const("clr-ids", np.array([0, 3, 5, 8, 7, 4, 11, 2], np.int32)),
                                           const("clr-slot", rng.permutation(V).astype(np.uint16)),
                                           const("clr-c", clusters.reshape(-1)), const("clr-u", i8(27 + 2 * de)),
                                           const("clr-v", i8(36 + 5 * de)),
                                           const("clr-um", rng.integers(1 << 30, 1 << 31, V).astype(np.int32)),
                                           const("clr-vm", rng.integers(-(1 << 31), 1 << 31, 2 * de).astype(np.int32)),
                                           dest(8 * de), 8, de, V, 3), "emb-clr"))
    # tiled attention (one head): one key tile (scores once, the untiled softmax and P.V on the rows)
    # and three tiles of 8 keys (the streaming passes), a padding mask, scratch of its own
    scratch = {}
    for name, (Lq, Lk, dh, kt) in {"att-one-tile": (5, 20, 16, 20), "att-tiles": (3, 20, 8, 8)}.items():
        sc = attention_scratch(Lq, min(kt, Lk), dh)
        refs = [Ref(f"{name}.{b}") for b in ("s_tile", "acc", "stats")]
        scratch.update({f"{name}.{b}": n for b, n in sc.items()})
        calls.append(Call("attention_s8", (Ref("input", 300), Ref("input", 700), Ref("input", 1100),
                                           const(f"{name}-mask", (np.arange(Lk) < Lk - 3).astype(np.int8)),
                                           const(f"{name}-lut", exp_lut(0.05)), dest(Lq * dh), *refs,
                                           Lq, Lk, dh, kt, 20, 16, 24, dh, -5, 9, 1 << 30, -8, 4, -11, 3 << 29, -13, 2),
                          name, 2 * Lq * Lk * dh))
    tensors["input"] = Tensor("input", (X,), "int8", "input")
    x = i8(X)
    x[2000:2000 + 200 * 8] = 127
    tensors["output"] = Tensor("output", (out[0],), "int8", "output")
    g = Graph("kernel-zoo", tensors, [], ["input"], ["output"])
    bufs = {"input": Buffer("input", X, "input"), "output": Buffer("output", out[0], "output"),
            **{n: Buffer(n, b, "scratch") for n, b in scratch.items()}}
    return Schedule("zoo", g, bufs, calls), x


def test_every_kernel_on_the_emulated_cortex_m4_equals_numpy(tmp_path, arm_toolchain):
    from mcu.compile import build_firmware
    from mcu.codegen import generate
    from mcu.device import open_board
    from mcu.execute import run
    from mcu.planner import plan

    s, x = kernel_zoo()
    p = plan(s)
    gen = generate(s, p, tmp_path / "zoo")
    want = run(s, {"input": x}, p)["output"]
    for flags in [(), ("-DTSH_PORTABLE",)]:
        fw = build_firmware(gen.dir, "stm32f405", extra_cflags=flags)
        with open_board(fw) as dev:
            got = dev.infer(x).output
        assert np.array_equal(got, want), f"{flags or 'DSP'}: device differs at {np.flatnonzero(got != want)[:10]}"
