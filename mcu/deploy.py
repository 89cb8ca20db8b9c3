"""One call from an `nn.Module` to a running board (`tinyshield.deploy`)."""
from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field

import numpy as np

from base.errors import TinyshieldError


@dataclass
class Deployed:
    """A model running on a board. `run(x)` returns the float output computed on the device."""
    built: object                 # mcu.build.BuiltModel
    device: object                # mcu.device.Device
    last: object = None           # the last inference's device result (instructions, stack, ...)
    _ctx: object = field(default=None, repr=False)

    def run(self, x) -> np.ndarray:
        q = self.built.quantise_input(x)
        self.last = self.device.infer(q)
        if not np.array_equal(self.last.output.reshape(-1), self.built.reference(q).reshape(-1)):
            raise TinyshieldError("the device's output differs from the host int8 reference: "
                                  "run `tinyshield validate` to find the first divergent operator")
        return self.device.dequantise(self.last.output).reshape(self.built.graph.meta["output_shape"])

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def deploy(model, example, calib=None, board: str = "stm32f405", schedule: str = "layerwise") -> Deployed:
    """Capture `model` on `example` (one input, batch size 1), calibrate on `calib` (batch-first inputs;
    default: the example alone), build firmware for `board`, boot it (the emulator for emulated boards)."""
    import torch

    from base.paths import artefact_dir
    from mcu.build import BuiltModel, deploy_graph
    from mcu.compile import build_plugin
    from mcu.device import open_board
    from mcu.from_aten import lower_module

    ex = example[0] if isinstance(example, (tuple, list)) else example
    ex = torch.as_tensor(ex)
    xs = np.asarray(calib) if calib is not None else ex.numpy()
    if xs.shape[1:] != tuple(ex.shape[1:]):
        raise TinyshieldError(f"calibration inputs of shape {xs.shape} do not match the example {tuple(ex.shape)} "
                              "(batch-first, same shape after the batch dimension)")
    graph = lower_module(model, xs, type(model).__name__ + "-int8")
    key = hashlib.sha256(pickle.dumps((graph, board, schedule))).hexdigest()[:16]
    d = artefact_dir("deploy", {"graph": key, "board": board, "schedule": schedule})
    sched, plan, fw = deploy_graph(graph, board, d, schedule)
    build_plugin()
    built = BuiltModel(type(model).__name__, "module", board, graph, sched, plan, d / "src", fw)
    ctx = open_board(fw)
    return Deployed(built, ctx.__enter__(), _ctx=ctx)
