"""A fleet of emulated boards on Ray: real QEMU boards, real serial traffic, a real local Ray.

Small on purpose (2 boards, 24 images): the machines have two cores shared with other work."""
from __future__ import annotations

import os
import signal

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed: the fleet tests need the optional 'fleet' extra "
                                        "(pip install -e '.[fleet]'; `make test` installs it)")

from base.cluster import init_ray, usable_cpus  # noqa: E402
from base.data import data_dir, mnist  # noqa: E402
from edge.models.io import save_model  # noqa: E402
from edge.models.vit import ViT, ViTConfig  # noqa: E402
from mcu.build import build_model  # noqa: E402
from mcu.device import evaluate, open_board  # noqa: E402
from mcu.fleet import EMULATED_RESOURCE, Fleet, load_board_file  # noqa: E402

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
N = 24


@pytest.fixture(scope="module")
def env(module_build, arm_toolchain):
    """A private build cache, a small ViT (random weights, real MNIST calibration) and a local Ray
    sized to this machine's cores, offering two emulated-board slots; Ray is shut down after."""
    root = module_build
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, stem_channels=8)
    model_dir = save_model(ViT(cfg).eval(), root / "vit-small", {"kind": "vit", "model": cfg.to_dict()})
    ds = mnist(allow_fallback=data_dir(required=False) is None)
    built = build_model(str(model_dir), "stm32f405", calib=64)
    init_ray(resources={EMULATED_RESOURCE: 2}, num_cpus=usable_cpus())
    yield built, ds.x_test[:N], ds.y_test[:N], root
    ray.shutdown()


@pytest.fixture(scope="module")
def single(env):
    built, xs, ys, _ = env
    with open_board(built.firmware) as dev:
        return evaluate(dev, built, xs, ys)


def same_result(a, b):
    assert a.n == b.n == N
    assert a.predictions == b.predictions
    assert a.instructions == b.instructions and len(a.instructions) == N
    assert (a.accuracy, a.agreement, a.mismatches, a.mean_instructions, a.stack_max, a.peak_sram) == \
           (b.accuracy, b.agreement, b.mismatches, b.mean_instructions, b.stack_max, b.peak_sram)


def test_fleet_evaluation_equals_one_board(env, single):
    built, xs, ys, _ = env
    with Fleet.emulated(built, 2) as fleet:
        fe = fleet.evaluate(xs, ys, chunk_size=3)
    assert not fe.failures
    assert sum(fe.inputs_per_board.values()) == N and all(v > 0 for v in fe.inputs_per_board.values())
    same_result(fe.evaluation, single)
    assert single.agreement == 1.0


def test_a_board_killed_mid_run_loses_no_input(env, single):
    """SIGKILL one board's QEMU while it is running a chunk: the chunk moves, the board restarts,
    the failure is reported and the result is still the single-board one."""
    built, xs, ys, _ = env
    killed = []
    with Fleet.emulated(built, 2) as fleet:
        pids = fleet.qemu_pids()

        def pull_the_plug(res):
            if not killed:                               # the other board is mid-chunk right now
                victim = next(b for b in pids if b != res.board)
                os.kill(pids[victim], signal.SIGKILL)
                killed.append(victim)

        fe = fleet.evaluate(xs, ys, chunk_size=3, on_chunk=pull_the_plug)
        assert fleet.qemu_pids()[killed[0]] != pids[killed[0]]       # a fresh QEMU took its place
    assert killed and fe.failures
    f = fe.failures[0]
    assert f.board == killed[0] and "restarting" in f.action and f.chunk >= 0
    assert "QEMU" in f.error or "lost" in f.error
    same_result(fe.evaluation, single)


def test_plan_sweep_finishes_and_writes_its_table(env):
    from mcu.sweep import plan_sweep
    _, _, _, root = env
    # Few trials: each costs Tune ~10 s of bookkeeping on a busy 2-core host, the planning milliseconds.
    res = plan_sweep("bert-tiny", 32, "stm32f405", root / "sweep", rows=[8, 32], kts=[32],
                     strategies=("best_fit",))
    assert len(res.trials) == 2 + 1                           # rows x kt x planners + layerwise per planner
    assert res.pareto and all(t in res.trials for t in res.pareto)
    lw = [t for t in res.trials if t.schedule == "layerwise"]
    tiled = [t for t in res.trials if t.schedule == "tiled"]
    assert min(t.arena_bytes for t in tiled) < min(t.arena_bytes for t in lw)
    table = (root / "sweep" / "table.md").read_text()
    assert "| tiled" in table and "layerwise" in table and table.count("\n|") == len(res.trials) + 2
    assert (root / "sweep" / "pareto.png").stat().st_size > 10_000
    assert (root / "sweep" / "trials.json").is_file()


def test_board_file_names_its_mistakes(tmp_path):
    from base.errors import TinyshieldError
    f = tmp_path / "boards.toml"
    f.write_text('[[board]]\nname = "rack1-a"\nboard = "stm32f405"\nurl = "/dev/ttyACM0"\nprobe = "066D"\n'
                 '[[board]]\nname = "emu"\nboard = "stm32f405"\n')
    specs = load_board_file(f)
    assert [s.resource for s in specs] == ["board_rack1-a", EMULATED_RESOURCE]
    assert specs[0].probe == "066D" and specs[1].emulated
    f.write_text('[[board]]\nname = "a"\nboard = "stm32f405"\nport = "/dev/ttyACM0"\n')
    with pytest.raises(TinyshieldError, match=r"board #1: .*unknown keys port"):
        load_board_file(f)
    with pytest.raises(TinyshieldError, match="not found"):
        load_board_file(tmp_path / "none.toml")
