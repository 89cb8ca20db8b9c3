"""What every example shares: real data, a short training loop, export to .pt2, and the measurement
on the emulated board.

Each example script defines its model from stock torch modules and calls `main(...)`:
  train for a minute or two (a fixed number of steps, 1 torch thread) -> torch.export.export + torch.export.save -> model.pt2,
  calib.npy (batch-first calibration inputs) and test.npz (`x` inputs, `y` labels) in the output folder
  (default build/examples/<name>) -> build for stm32f405 -> run the test inputs on the emulated board ->
  results.json (float accuracy, device accuracy, agreements, flash, arena, instructions per inference).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from base.data import agnews, data_dir, mnist, sst2  # noqa: E402

PAD, UNK = 0, 1        # small-vocabulary ids: 0 is padding (the board's key mask is `ids == 0`), 1 unknown


# ---------------------------------------------------------------- data

class Vocab:
    """The project's WordPiece tokenizer, then its ids remapped to the `size` most frequent training
    tokens (0 = [PAD], 1 = unknown), so the embedding table fits the board's flash."""

    def __init__(self, texts: list[str], size: int, seq_len: int):
        from edge.models.minilm import load_tokenizer
        self.tok, self.seq_len = load_tokenizer(), seq_len
        counts = Counter(i for e in self.tok.encode_batch(texts) for i in e.ids[1:-1])   # no [CLS]/[SEP]
        self.map = {t: k + 2 for k, (t, _) in enumerate(counts.most_common(size - 2))}
        self.size = size

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.seq_len), dtype=np.int64)
        for r, e in enumerate(self.tok.encode_batch(texts)):
            ids = [self.map.get(i, UNK) for i in e.ids[1:-1]][: self.seq_len]
            out[r, : len(ids)] = ids
        return out


def text_data(name: str, vocab: int, seq_len: int, n_test: int):
    """(x_train, y_train, x_test, y_test) of small-vocabulary ids. SST-2: train / dev; AG News: its
    10k 'dev' sample to train, its test split to test."""
    if name == "sst2":
        tr, te = sst2("train"), sst2("dev")
    else:
        tr, te = agnews("dev"), agnews("test")
    v = Vocab(tr.texts, vocab, seq_len)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(te.texts))[:n_test]
    return v(tr.texts), tr.labels, v([te.texts[i] for i in idx]), te.labels[idx]


def mnist_data(n_test: int):
    """MNIST (5k train / 10k test) as float32 in [0, 1], shape (N, 1, 28, 28)."""
    ds = mnist(allow_fallback=data_dir(required=False) is None)
    f = lambda a: a.astype(np.float32)[:, None] / np.float32(255.0)   # noqa: E731
    return f(ds.x_train), ds.y_train, f(ds.x_test[:n_test]), ds.y_test[:n_test]


# ---------------------------------------------------------------- training

def train(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, steps: int, lr: float = 2e-3,
          batch: int = 64, log=print) -> torch.nn.Module:
    """AdamW with a cosine schedule over a fixed number of steps (reproducible on a busy machine; the
    step counts are set to take one to two minutes on one free core)."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    model.train()
    t0, rng = time.monotonic(), np.random.default_rng(0)
    for step in range(1, steps + 1):
        el = time.monotonic() - t0
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * (step - 1) / steps))
        idx = torch.as_tensor(rng.integers(0, len(xt), batch))
        loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            log(f"  step {step}  {el:5.0f} s  loss {loss.item():.3f}")
    log(f"  trained {steps} steps in {time.monotonic() - t0:.0f} s")
    return model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    model.eval()
    pred = np.concatenate([model(torch.as_tensor(x[i:i + 256])).argmax(-1).numpy() for i in range(0, len(x), 256)])
    return float((pred == y).mean()), pred


# ---------------------------------------------------------------- export and measure

def export(model: torch.nn.Module, x_calib: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, out: Path) -> Path:
    """torch.export with one example (batch size 1), torch.export.save, and the calibration/test arrays."""
    out.mkdir(parents=True, exist_ok=True)
    ep = torch.export.export(model.eval(), (torch.as_tensor(x_calib[:1]),))
    torch.export.save(ep, out / "model.pt2")
    np.save(out / "calib.npy", x_calib)
    np.savez(out / "test.npz", x=x_test, y=y_test)
    return out / "model.pt2"


def measure(out: Path, float_pred: np.ndarray, float_acc: float, board: str = "stm32f405") -> dict:
    """Build the .pt2 for the board, run the test set on the emulated board, compare."""
    from mcu.build import build_model
    from mcu.device import open_board

    t = np.load(out / "test.npz")
    x, y = t["x"], t["y"]
    built = build_model(str(out / "model.pt2"), board, calib_file=out / "calib.npy",
                        calib=len(np.load(out / "calib.npy", mmap_mode="r")))
    dev_pred, same, instr, stack = [], 0, [], 0
    t0 = time.monotonic()
    with open_board(built.firmware) as dev:
        info = dev.info
        for xi in x:
            q = built.quantise_input(xi)
            r = dev.infer(q)
            same += int(np.array_equal(r.output.reshape(-1), built.reference(q).reshape(-1)))
            dev_pred.append(int(np.argmax(r.output.reshape(-1))))
            instr.append(r.instructions)
            stack = max(stack, r.stack_bytes)
    dev_pred = np.array(dev_pred)
    dacc = float((dev_pred == y).mean())
    fw = built.firmware
    return {
        "board": board, "test_inputs": int(len(x)),
        "float_accuracy": round(float_acc, 4),
        "device_accuracy": round(dacc, 4),
        "int8_float_prediction_agreement": round(float((dev_pred == float_pred[: len(x)]).mean()), 4),
        "device_host_bit_identical": round(same / len(x), 4),
        "flash_used_bytes": fw.flash_used, "flash_budget_bytes": fw.flash_bytes,
        "weights_bytes": int(built.graph.const_bytes()),
        "arena_bytes": int(info.arena_bytes), "peak_sram_bytes": int(info.arena_bytes + stack),
        "static_ram_bytes": int(info.static_ram),
        "instructions_per_inference": float(np.mean(instr)) if instr and instr[0] is not None else None,
        "macs_per_inference": int(info.macs), "device_seconds": round(time.monotonic() - t0, 1),
    }


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor()


def main(name: str, make_model, data, steps: int, lr: float = 2e-3, n_calib: int = 200, batch: int = 64):
    """The command line of every example: [OUT] [--steps N] [--no-board]."""
    ap = argparse.ArgumentParser(description=f"train, export and deploy the {name} example")
    ap.add_argument("out", nargs="?", default=str(ROOT / "build" / "examples" / name))
    ap.add_argument("--steps", type=int, default=steps, help="training steps (batch 64)")
    ap.add_argument("--no-board", action="store_true", help="stop after writing model.pt2, calib.npy, test.npz")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = Path(a.out)
    print(f"[{name}] loading data")
    xtr, ytr, xte, yte = data()
    model = make_model()
    print(f"[{name}] {sum(p.numel() for p in model.parameters()):,} parameters; training {a.steps} steps")
    t1 = time.monotonic()
    train(model, xtr, ytr, a.steps, lr=lr, batch=batch)
    train_s = time.monotonic() - t1
    facc, fpred = accuracy(model, xte, yte)
    print(f"[{name}] float accuracy {100 * facc:.2f}% on {len(xte)} test inputs")
    rng = np.random.default_rng(1)
    calib = xtr[rng.permutation(len(xtr))[:n_calib]]
    export(model, calib, xte, yte, out)
    print(f"[{name}] wrote {out}/model.pt2, calib.npy, test.npz")
    res = {"name": name, "float_accuracy": round(facc, 4), "test_inputs": int(len(xte)),
           "train_steps": a.steps, "train_seconds": round(train_s, 1), "torch_threads": 1, "cpu": cpu_model(),
           "command": " ".join(["python", f"examples/{Path(sys.argv[0]).name}", *sys.argv[1:]])}
    if not a.no_board:
        res.update(measure(out, fpred, facc))
        print(f"[{name}] device accuracy {100 * res['device_accuracy']:.2f}%, int8/float agreement "
              f"{100 * res['int8_float_prediction_agreement']:.2f}%, bit-identical "
              f"{100 * res['device_host_bit_identical']:.2f}%, flash {res['flash_used_bytes']:,} B, "
              f"arena {res['arena_bytes']:,} B, {res['instructions_per_inference']:,.0f} instructions/inference")
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    return res
