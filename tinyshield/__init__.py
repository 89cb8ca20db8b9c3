"""tinyshield's Python entry point: your `nn.Module` on a board in one call.

    import tinyshield
    with tinyshield.deploy(model, example, calib=calib_inputs, board="stm32f405") as d:
        y = d.run(x)            # float output, computed on the (emulated) board
        print(d.last.instructions, d.built.plan.arena_bytes)

The model is captured once with torch.export (batch size 1), calibrated on `calib` (batch-first
inputs), quantised to int8, scheduled, compiled and flashed; every output is checked bit for bit
against the host int8 reference.
"""
from mcu.deploy import Deployed, deploy

__all__ = ["deploy", "Deployed"]
