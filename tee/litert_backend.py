"""The accelerator's LiteRT backend: one fp32 FULLY_CONNECTED .tflite per outsourced layer
(exported with edge.litert), run by the LiteRT interpreter with all cores.

Only the float32 modes (plain, shadownet) run here. The blinded mode needs exact field products: LiteRT
has no float64 kernels and its int8 FULLY_CONNECTED requantises its int32 accumulator to int8, so that
mode runs its exact field GEMM on the torch backend (tee.fieldgemm.FieldGemm).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from base.errors import TinyshieldError
from edge.litert import Interpreter, export_linear


def layer_file(accel_dir: Path, name: str) -> Path:
    return Path(accel_dir) / f"{name}.tflite"


def export_layers(weights_t: dict[str, np.ndarray], shapes: dict[str, list[int]], accel_dir: Path) -> None:
    """weights_t: name -> W^T (in, out) as the accelerator stores it; shapes: name -> [rows, in, out]."""
    for name, wt in weights_t.items():
        rows = shapes[name][0]
        layer_file(accel_dir, name).write_bytes(
            export_linear(np.ascontiguousarray(wt.T, dtype=np.float32), None, batch_shape=(rows,)))


class LayerRunner:
    """One interpreter per layer and row count: the layer's full rows and the row parts the enclave's
    pipelined forward sends (tee.program.parts)."""

    def __init__(self, accel_dir: Path, shapes: dict[str, list[int]], threads: int):
        from tee.dma import SLOTS
        from tee.program import parts

        missing = [n for n in shapes if not layer_file(accel_dir, n).is_file()]
        if missing:
            raise TinyshieldError(f"{accel_dir}: no .tflite for {missing[0]} — protect the model again "
                                  "or run the accelerator with --backend torch")
        self.interp = {}
        for n, (rows, k, _) in shapes.items():
            for size in {rows} | {p.stop - p.start for p in parts(rows, SLOTS)}:
                self.interp[n, size] = Interpreter(layer_file(accel_dir, n), threads=threads, input_shapes=[(size, k)])

    def __call__(self, layer: str, x: np.ndarray) -> np.ndarray:
        run = self.interp.get((layer, x.shape[0]))
        if run is None:
            raise TinyshieldError(f"{layer}: no interpreter for {x.shape[0]} rows")
        return run.run(x)
