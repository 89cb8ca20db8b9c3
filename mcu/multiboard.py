"""One data set on several emulated boards at once, in this process: a thread per board, no Ray.

    ev = evaluate_on_boards(built, xs, ys, boards=2, progress_bar=bar)   # == evaluate() on one board

Each thread boots its own QEMU with the same firmware (and the instruction counter: counts depend
on the input, so every input is counted), takes the next chunk of inputs in order when its board is
free and runs it with `mcu.device.run_inputs`; the records are merged by `mcu.device.merge`, so the
Evaluation is the single-board one input for input. A board is used only by the thread that booted
it (its QEMU dies with that thread). For boards on other hosts, restarts after failures and real
boards, see mcu/fleet.py.
"""
from __future__ import annotations

import queue
import threading
import time

from base.errors import TinyshieldError
from mcu.device import Evaluation, chunk_ranges, evaluate, merge, open_board, run_inputs


def evaluate_on_boards(built, inputs, labels, boards: int = 1, progress_bar=None, check_reference: bool = True,
                       chunk_size: int | None = None) -> Evaluation:
    """Every input on one of `boards` emulated boards; the same Evaluation as one board's, except the wall time
    (which here includes booting the boards, ~0.4 s)."""
    n = len(inputs)
    boards = max(1, min(int(boards), n))
    if boards == 1:
        with open_board(built.firmware) as dev:
            return evaluate(dev, built, inputs, labels, progress_bar, check_reference)
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for c in chunk_ranges(n, boards, chunk_size):
        todo.put(c)
    done: queue.SimpleQueue = queue.SimpleQueue()     # ("info" | "record" | "error" | "end", value)
    stop = threading.Event()

    def board(k: int):
        try:
            with open_board(built.firmware) as dev:
                done.put(("info", dev.info))
                while not stop.is_set():
                    try:
                        _, start, end = todo.get_nowait()
                    except queue.Empty:
                        break
                    for rec in run_inputs(dev, built, inputs[start:end], start, check_reference):
                        done.put(("record", rec))
                        if stop.is_set():
                            break
        except Exception as e:                        # reported by the caller's thread
            done.put(("error", f"board {k + 1} of {boards}: {e}"))
        finally:
            done.put(("end", k))

    from mcu.compile import build_plugin
    build_plugin()                                    # once here, not raced by the boards booting together
    t0 = time.monotonic()
    task = progress_bar.add_task(f"eval on {boards} {built.board} boards", total=n, info="") if progress_bar else None
    threads = [threading.Thread(target=board, args=(k,), name=f"board-{k}", daemon=True) for k in range(boards)]
    for t in threads:
        t.start()
    records, info, errors, ended, hits, bad = [], None, [], 0, 0, 0
    try:
        while ended < boards:
            kind, v = done.get()
            if kind == "record":
                records.append(v)
                hits += int(v.output.reshape(-1).argmax() == int(labels[v.index]))
                bad += int(v.matches_reference is False)
                if progress_bar:
                    k = len(records)
                    progress_bar.update(task, advance=1, info=f"acc {hits / k:.3f} agree {1 - bad / k:.3f}")
            elif kind == "info":
                info = info or v
            elif kind == "error":
                errors.append(v)
                stop.set()
            else:
                ended += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    if errors:
        raise TinyshieldError(f"evaluation on {boards} emulated boards failed: {errors[0]}")
    return merge(info, records, n, labels, time.monotonic() - t0)
