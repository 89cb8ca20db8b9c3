"""A fleet of boards on Ray: one data set split over many boards, with one result.

    with Fleet.emulated(built, 4) as fleet:                 # 4 QEMU boards (or Fleet.from_file(...))
        ev = fleet.evaluate(xs, ys, progress_bar=bar)      # == evaluate() on one board, input for input

Each board is a Ray actor (`BoardActor`) that owns exactly one board — an emulated board process
or a real board on a serial port — and asks for one unit of a custom Ray resource, so an actor
can only be placed where a board is free:
  - emulated boards ask for `qemu_board`: a node offers as many as it may run QEMUs
    (`ray start --resources '{"qemu_board": 8}'`; a local cluster offers exactly --boards N);
  - a real board named NAME asks for `board_NAME`, offered only by the host it is plugged into
    (`ray start --resources '{"board_NAME": 1}'`), so its actor lands next to its USB cable.

The driver cuts the data set into small chunks and hands the next chunk to whichever board is
free (boards of different speed stay busy). A chunk whose board fails (QEMU killed, link lost,
actor process gone) goes back to the front of the queue for the next free board; the failed board
is restarted and rejoins, or is retired after `max_restarts`. A chunk is only counted when a board
returns all of it, and instruction counts are exact per input, so the Evaluation equals a
single-board run's whatever fails along the way.

Ray is the optional `fleet` extra: this module imports it only when a fleet is started.
"""
from __future__ import annotations

import os
import time
import tomllib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from base.cluster import init_ray, require_ray
from base.errors import TinyshieldError
from mcu.device import Evaluation, InputRecord, chunk_ranges, merge

EMULATED_RESOURCE = "qemu_board"
HINT = "or drop --boards/--fleet/--address to use one board"


# ---------------------------------------------------------------- which boards

@dataclass(frozen=True)
class BoardSpec:
    """One board of the fleet. Emulated: `url` is None and a QEMU is booted for it. Real: `url` is
    its serial port (`/dev/ttyACM0`, `socket://host:port`, `rfc2217://...`), `probe` the debug
    probe's unique id used to (re)flash it, or None when the board already runs the firmware."""
    name: str
    board: str                    # board id (mcu.boards), must match the firmware's
    url: str | None = None
    probe: str | None = None

    @property
    def emulated(self) -> bool:
        return self.url is None

    @property
    def resource(self) -> str:
        return EMULATED_RESOURCE if self.emulated else f"board_{self.name}"


def emulated_boards(n: int, board: str) -> list[BoardSpec]:
    if n < 1:
        raise TinyshieldError(f"--boards must be >= 1, got {n}")
    return [BoardSpec(f"emu{i}", board) for i in range(n)]


def load_board_file(path: str | Path) -> list[BoardSpec]:
    """A board file (TOML), one table per board:

        [[board]]
        name = "rack1-a"              # letters, digits, - and _ (also names its Ray resource)
        board = "stm32f405"
        url = "/dev/ttyACM0"          # omit for an emulated board
        probe = "066DFF505457"        # optional: ST-Link/CMSIS-DAP unique id to flash it
    """
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise TinyshieldError(f"board file {p} not found: give a TOML file with one [[board]] table per board") from None
    except tomllib.TOMLDecodeError as e:
        raise TinyshieldError(f"board file {p} is not valid TOML: {e}") from None
    rows = doc.get("board")
    if not isinstance(rows, list) or not rows:
        raise TinyshieldError(f"board file {p} has no [[board]] tables: add one per board "
                              "(name, board, and url for a real board)")
    specs, seen = [], set()
    for i, row in enumerate(rows):
        unknown = set(row) - {"name", "board", "url", "probe"}
        if unknown or "name" not in row or "board" not in row:
            raise TinyshieldError(f"board file {p}, board #{i + 1}: needs name and board (and url, probe for a "
                                  f"real board); {'unknown keys ' + ', '.join(sorted(unknown)) if unknown else 'missing keys'}")
        name = str(row["name"])
        if not name.replace("-", "").replace("_", "").isalnum() or name in seen:
            raise TinyshieldError(f"board file {p}, board #{i + 1}: name {name!r} must be unique and use only "
                                  "letters, digits, - and _")
        seen.add(name)
        specs.append(BoardSpec(name, str(row["board"]), row.get("url"), row.get("probe")))
    return specs


# ---------------------------------------------------------------- the actor

@dataclass
class ChunkResult:
    board: str
    chunk: int
    records: list[InputRecord]
    seconds: float                # wall time on the actor, inference and reference check
    qemu_cpu_seconds: float | None  # CPU the board's QEMU used for this chunk (None on real boards)
    wire_bytes: int               # serial bytes both ways for this chunk


def _proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process from /proc (Linux), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BoardActor:
    """Owns one board for the life of the actor. Ray runs its methods one at a time on one thread,
    the thread that booted QEMU (the emulator's parent-death signal is tied to that thread)."""

    def __init__(self, spec: BoardSpec, built, elf_bytes: bytes):
        self.spec, self.built = spec, built
        self.emu = self.dev = None
        self.boots = 0
        self._fw = self._local_firmware(elf_bytes)
        self._open()

    def _local_firmware(self, elf_bytes: bytes):
        """The firmware on this node: the driver's ELF path when it exists here (same host), else
        the shipped bytes written to a private file (another node of the cluster)."""
        from dataclasses import replace
        fw = self.built.firmware
        if Path(fw.elf).is_file():
            return fw
        import tempfile
        d = Path(tempfile.mkdtemp(prefix=f"fleet-{self.spec.name}-"))
        (d / "fw.elf").write_bytes(elf_bytes)
        return replace(fw, elf=d / "fw.elf")

    def _open(self):
        from mcu.device import Device, connect
        from mcu.emulator import Emulator
        from mcu.link import Link
        if self.spec.emulated:
            self.emu = Emulator(self._fw).start()
            self.dev = Device(Link(self.emu.url), self.emu.count_file, self.emu)
        else:
            if self.spec.probe:
                from mcu.flash import flash_probe
                flash_probe(Path(self._fw.elf), self.spec.board, probe=self.spec.probe)
            self.dev = connect(self.spec.url)
        self.boots += 1
        info = self.dev.info
        if (info.macs, info.arena_bytes) != (self.built.macs, self.built.plan.arena_bytes):
            raise TinyshieldError(f"board {self.spec.name} ({self.spec.url or 'emulated'}) runs another model "
                                  f"({info.name}, {info.macs:,} MACs) than {self.built.name}: flash it "
                                  "(give its probe id in the board file)")

    def _close(self):
        if self.dev is not None:
            try:
                self.dev.close()
            except Exception:
                pass
        if self.emu is not None:
            self.emu.stop()
        self.emu = self.dev = None

    def restart(self) -> int:
        """Power-cycle: a fresh QEMU (emulated) or a reconnect (and re-flash with a probe)."""
        self._close()
        self._open()
        return self.boots

    def qemu_pid(self) -> int | None:
        return self.emu.pid if self.emu is not None else None

    def ping(self) -> float:
        """A no-op round trip (the benchmark's per-task overhead)."""
        return time.monotonic()

    def info(self):
        return self.dev.info

    def echo(self, x):
        """Ships an argument in and a small answer out (per-task cost with a chunk's payload)."""
        return len(x)

    def run(self, chunk: int, start: int, xs: np.ndarray, check_reference: bool = True) -> ChunkResult:
        from mcu.device import run_inputs
        if self.dev is None:
            raise TinyshieldError(f"board {self.spec.name} is not connected (an earlier restart failed)")
        pid = self.qemu_pid()
        cpu0 = _proc_cpu_seconds(pid) if pid else None
        wire0 = self.dev.link.tx_bytes + self.dev.link.rx_bytes
        t0 = time.monotonic()
        try:
            records = list(run_inputs(self.dev, self.built, xs, start, check_reference))
        except Exception as e:
            dead = self.emu is not None and not self.emu.alive()
            why = f"its QEMU (pid {pid}) exited" if dead else "the link failed"
            raise TinyshieldError(f"board {self.spec.name}: chunk {chunk} (inputs {start}..{start + len(xs) - 1}) "
                                  f"failed, {why}: {e}") from None
        cpu1 = _proc_cpu_seconds(pid) if pid else None
        return ChunkResult(self.spec.name, chunk, records, time.monotonic() - t0,
                           cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None,
                           self.dev.link.tx_bytes + self.dev.link.rx_bytes - wire0)

    def close(self) -> None:
        self._close()


# ---------------------------------------------------------------- the driver

@dataclass
class Failure:
    board: str
    chunk: int                    # -1: the board failed outside a chunk (start or restart)
    error: str
    action: str                   # "chunk requeued", "restarted", "retired"


@dataclass
class FleetEvaluation:
    evaluation: Evaluation        # identical to a single-board evaluate() of the same inputs
    boards: list[str]             # boards that took part
    inputs_per_board: dict[str, int]
    failures: list[Failure]
    chunks: int
    chunk_size: int
    seconds: float                # wall time of the evaluation (boards already booted)
    start_seconds: float          # Ray start + boards booted
    qemu_cpu_seconds: float       # total CPU the emulators used
    wire_bytes: int               # serial bytes both ways, all boards

    @property
    def throughput(self) -> float:
        return self.evaluation.n / max(self.seconds, 1e-9)

    def rows(self) -> list[tuple[str, str]]:
        per = ", ".join(f"{b} {n}" for b, n in self.inputs_per_board.items())
        fails = "; ".join(f"{f.board}: {f.action}" for f in self.failures) or "none"
        return [("boards", f"{len(self.boards)} ({per} inputs)"),
                ("chunks", f"{self.chunks} of up to {self.chunk_size} inputs"),
                ("fleet wall time", f"{self.seconds:.1f} s ({self.throughput:.2f} inputs/s); "
                                    f"start {self.start_seconds:.1f} s"),
                ("board failures", fails)]


class Fleet:
    """Boards as Ray actors. A context manager: leaving it kills the actors (and so their QEMUs)
    and shuts down the Ray it started (not a cluster it joined)."""

    def __init__(self, built, specs: list[BoardSpec], address: str | None = None, max_restarts: int = 2):
        if not specs:
            raise TinyshieldError("a fleet needs at least one board")
        wrong = [s.name for s in specs if s.board != built.board]
        if wrong:
            raise TinyshieldError(f"boards {', '.join(wrong)} are not {built.board} boards, the firmware's: "
                                  f"give --board matching the board file, or split the file by board")
        self.built, self.specs, self.address, self.max_restarts = built, specs, address, max_restarts
        self.actors: dict[str, object] = {}
        self.failures: list[Failure] = []
        self.start_seconds = 0.0
        self._started_ray = False
        self.info = None                # ModelInfo as the boards report it

    @classmethod
    def emulated(cls, built, n: int, address: str | None = None, **kw) -> "Fleet":
        return cls(built, emulated_boards(n, built.board), address, **kw)

    @classmethod
    def from_file(cls, built, path, address: str | None = None, **kw) -> "Fleet":
        return cls(built, load_board_file(path), address, **kw)

    def _needed_resources(self) -> dict[str, float]:
        need: dict[str, float] = {}
        for s in self.specs:
            need[s.resource] = need.get(s.resource, 0) + 1
        return need

    def start(self) -> "Fleet":
        t0 = time.monotonic()
        ray = require_ray(HINT)
        self._started_ray = not ray.is_initialized() and not self.address
        ray = init_ray(self.address, resources=self._needed_resources(), hint=HINT)
        have = ray.cluster_resources()
        short = {r: n for r, n in self._needed_resources().items() if have.get(r, 0) < n}
        if short:
            raise TinyshieldError(
                "the Ray cluster offers too few boards: " + ", ".join(f"{r} needs {n:g}, has {have.get(r, 0):g}"
                                                                      for r, n in short.items())
                + "; on the host with the boards run `ray start --address ... --resources '{\"NAME\": COUNT}'`")
        if any(s.emulated for s in self.specs):
            from mcu.compile import build_plugin
            build_plugin()              # once here, not raced by every board booting at the same time
        built_ref = ray.put(self.built)
        elf = Path(self.built.firmware.elf).read_bytes()
        # num_cpus=0: a board's load is its own QEMU (or a real chip), not a Ray worker slot; the
        # custom resource is what limits how many boards a node runs.
        Actor = ray.remote(num_cpus=0, max_restarts=0)(BoardActor)
        pending = {}
        for s in self.specs:
            a = Actor.options(resources={s.resource: 1}, name=None).remote(s, built_ref, elf)
            pending[s.name] = (a, a.info.remote())   # the model as the board reports it over its link
        for name, (a, ready) in pending.items():
            try:
                self.info = ray.get(ready)
                self.actors[name] = a
            except Exception as e:
                self.failures.append(Failure(name, -1, _short(e), "retired"))
                ray.kill(a)
        if not self.actors:
            self.close()
            raise TinyshieldError("no board of the fleet started: " + "; ".join(f.error for f in self.failures))
        self.start_seconds = time.monotonic() - t0
        return self

    def __enter__(self) -> "Fleet":
        return self.start() if not self.actors else self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        ray = require_ray(HINT)
        if ray.is_initialized():
            for a in self.actors.values():
                try:
                    ray.get(a.close.remote(), timeout=10)
                except Exception:
                    pass                        # a dead actor has nothing to close
                ray.kill(a)
        self.actors.clear()
        if self._started_ray and ray.is_initialized():
            ray.shutdown()

    def qemu_pids(self) -> dict[str, int | None]:
        ray = require_ray(HINT)
        return {n: ray.get(a.qemu_pid.remote()) for n, a in self.actors.items()}

    def evaluate(self, inputs, labels, progress_bar=None, chunk_size: int | None = None,
                 check_reference: bool = True, on_chunk=None) -> FleetEvaluation:
        """Every input on some board, each exactly once in the result. `on_chunk(ChunkResult)` is
        called as chunks come back (progress, or a test pulling a board's plug mid-run)."""
        ray = require_ray(HINT)
        n = len(inputs)
        if not self.actors:
            self.start()
        # Small chunks balance the load and lose little when a board dies; ~4 per board keeps the
        # per-task cost of Ray (~1 ms) far below a chunk's inference time (~0.1 s per input).
        queue = deque(chunk_ranges(n, len(self.actors), chunk_size))
        size = queue[0][2] - queue[0][1] if queue else 0
        chunks = len(queue)
        records: dict[int, InputRecord] = {}
        per_board = {b: 0 for b in self.actors}
        restarts = {b: 0 for b in self.actors}
        free = deque(self.actors)
        inflight: dict = {}                     # future -> (board, chunk tuple or None for a restart)
        qemu_cpu, wire = 0.0, 0
        task = progress_bar.add_task(f"eval on {len(self.actors)} {self.built.board} boards", total=n,
                                     info="") if progress_bar else None
        t0 = time.monotonic()
        while queue or inflight:
            while queue and free:
                b = free.popleft()
                c = queue.popleft()
                xs = np.asarray(inputs[c[1]:c[2]])
                inflight[self.actors[b].run.remote(c[0], c[1], xs, check_reference)] = (b, c)
            if not inflight:
                raise TinyshieldError(f"every board of the fleet failed; {len(records)}/{n} inputs done. Failures: "
                                      + "; ".join(f"{f.board}: {f.error}" for f in self.failures[-4:]))
            done, _ = ray.wait(list(inflight), num_returns=1)
            b, c = inflight.pop(done[0])
            try:
                res = ray.get(done[0])
            except Exception as e:
                if c is None:                   # the restart itself failed: the board is out
                    self.failures.append(Failure(b, -1, _short(e), "retired (restart failed)"))
                    self._retire(b)
                    continue
                queue.appendleft(c)             # the chunk goes to the next free board, whole
                if restarts[b] < self.max_restarts:
                    restarts[b] += 1
                    inflight[self.actors[b].restart.remote()] = (b, None)
                    action = "chunk requeued, board restarting"
                else:
                    self._retire(b)
                    action = f"chunk requeued, board retired after {self.max_restarts} restarts"
                self.failures.append(Failure(b, c[0], _short(e), action))
                continue
            if c is None:                       # a restart finished: the board takes work again
                free.append(b)
                continue
            for r in res.records:
                records[r.index] = r
            per_board[b] += len(res.records)
            qemu_cpu += res.qemu_cpu_seconds or 0.0
            wire += res.wire_bytes
            free.append(b)
            if progress_bar:
                k = len(records)
                bad = sum(1 for r in records.values() if r.matches_reference is False)
                progress_bar.update(task, completed=k,
                                    info=f"boards {len(self.actors)} agree {1 - bad / k:.3f} failures "
                                         f"{sum(f.action == 'chunk requeued' for f in self.failures)}")
            if on_chunk:
                on_chunk(res)
        seconds = time.monotonic() - t0
        ev = merge(self.info, records.values(), n, labels, seconds)      # every input exactly once
        return FleetEvaluation(ev, list(per_board), per_board, list(self.failures), chunks, size, seconds,
                               self.start_seconds, qemu_cpu, wire)

    def _retire(self, b: str) -> None:
        ray = require_ray(HINT)
        a = self.actors.pop(b, None)
        if a is not None:
            ray.kill(a)


@dataclass
class TaskOverheads:
    """What Ray adds per task to an actor on this host, in milliseconds."""
    roundtrip_ms: float           # one no-op call, waited for (sequential): latency
    roundtrip_p90_ms: float
    pipelined_ms: float           # per call when many are in flight: the driver's scheduling cost
    payload_ms: float             # a call carrying a chunk of inputs (serialisation both ways)
    payload_bytes: int
    calls: int


def task_overheads(actor, payload: np.ndarray, calls: int = 200) -> TaskOverheads:
    ray = require_ray(HINT)
    ray.get(actor.ping.remote())                # warm
    lat = []
    for _ in range(calls):
        t = time.perf_counter()
        ray.get(actor.ping.remote())
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    ray.get([actor.ping.remote() for _ in range(calls)])
    piped = (time.perf_counter() - t) / calls
    pay = []
    for _ in range(calls // 4):
        t = time.perf_counter()
        ray.get(actor.echo.remote(payload))
        pay.append(time.perf_counter() - t)
    ms = 1e3
    return TaskOverheads(float(np.mean(lat)) * ms, float(np.percentile(lat, 90)) * ms, piped * ms,
                         float(np.mean(pay)) * ms, int(payload.nbytes), calls)


def _short(e: Exception, limit: int = 400) -> str:
    """The cause of a remote failure without Ray's traceback wrapper."""
    text = str(getattr(e, "cause", None) or e).strip().splitlines()
    msg = next((ln for ln in reversed(text) if ln.strip()), repr(e))
    return msg[:limit]
