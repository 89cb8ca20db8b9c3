"""Ray, the optional `fleet` extra, as the fleet and the sweeps use it: import it, start or join a
cluster, run configurations as Ray Tune trials, keep the Pareto front of the results.

    results, seconds = run_trials(one_trial, space, out_dir, graph=graph)   # [(config, metrics), ...]

`one_trial(config, **shared)` is a plain function returning a dict of metrics; the shared objects
go through Ray's object store once (`tune.with_parameters`), not once per trial. Nothing here
imports Ray at module level: the core never needs it.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from base.errors import TinyshieldError

INSTALL = "pip install -e '.[fleet]'"


def require_ray(hint: str = ""):
    """The `ray` module, or an error naming the extra to install (and `hint`: how to do without)."""
    try:
        import ray
    except ImportError:
        raise TinyshieldError(f"this needs Ray, the optional 'fleet' extra: {INSTALL}"
                              + (f" ({hint})" if hint else "")) from None
    return ray


def usable_cpus() -> int:
    """The cores this process may run on (a container or taskset may allow fewer than os.cpu_count())."""
    return len(os.sched_getaffinity(0))


def init_ray(address: str | None = None, resources: dict[str, float] | None = None, num_cpus: int | None = None,
             hint: str = ""):
    """Join the cluster at `address`, or start a local one sized to the cores this process may
    use, offering `resources` (e.g. the local boards). Quiet: no dashboard, worker logs to files."""
    ray = require_ray(hint)
    if ray.is_initialized():
        return ray
    if address:
        try:
            ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        except (ConnectionError, RuntimeError) as e:
            raise TinyshieldError(f"cannot join the Ray cluster at {address}: {e}; start it with `ray start --head` "
                                  "or drop --address to start a local one") from None
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Ray starts its workers at niceness +15 (RAY_worker_niceness) and an actor's QEMU inherits
        # it: on a busy host a board then ran ~10x slower than the same board started by the
        # driver (measured: 0.64 s vs 0.07 s an inference). Boards and trials are the work.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=num_cpus or usable_cpus(), resources=resources or {}, include_dashboard=False,
                 log_to_driver=False, logging_level="WARNING", object_store_memory=200 * 2**20,
                 configure_logging=True)
    return ray


def _entry(config: dict, trial=None, **shared):
    """Tune's function trainable: report the one result of a configuration."""
    from ray import tune
    tune.report(trial(config["cfg"], **shared))


def run_trials(trial, space: list[dict], out_dir: str | Path, *, metric: str, mode: str = "min",
               address: str | None = None, cpus_per_trial: float = 1.0, max_concurrent: int | None = None,
               hint: str = "", **shared) -> tuple[list[tuple[dict, dict]], float]:
    """Run `trial(config, **shared)` for every config of `space` as a Ray Tune trial on the local
    cores (or the cluster at `address`); Tune's own records go to out_dir/tune. Returns the
    (config, metrics) pairs in the order of `space` and the wall time of the Tune run. A failed
    trial fails the sweep, naming its config and where its log is."""
    ray = require_ray(hint)
    from ray import tune

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")      # the legacy reporter honours verbose=0
    started = not ray.is_initialized()
    init_ray(address, hint=hint)
    try:
        t0 = time.monotonic()
        tuner = tune.Tuner(tune.with_resources(tune.with_parameters(_entry, trial=trial, **shared),
                                               {"cpu": cpus_per_trial}),
                           param_space={"cfg": tune.grid_search(space)},
                           # Reused actors: a fresh worker per trial costs an interpreter start and the
                           # imports (seconds each on a busy 2-core host), a plan trial milliseconds.
                           tune_config=tune.TuneConfig(metric=metric, mode=mode, reuse_actors=True,
                                                       max_concurrent_trials=max_concurrent),
                           run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=0))
        grid = tuner.fit()
        seconds = time.monotonic() - t0
    finally:
        if started and not address:
            ray.shutdown()
    done, errors = {}, []
    for r in grid:
        if r.error is not None:
            errors.append(f"{r.config['cfg']}: {r.error}")
        else:
            done[_key(r.config["cfg"])] = (r.config["cfg"], dict(r.metrics))
    if errors:
        raise TinyshieldError(f"{len(errors)} of {len(space)} sweep trials failed (logs under {out}/tune): "
                              + "; ".join(errors[:3]))
    return [done[_key(c)] for c in space], seconds


def pareto_front(items: list, key) -> list:
    """Items no other item beats on every component of `key(item)` (a tuple, smaller is better) at
    once; of equal keys the first is kept. Sorted by key."""
    front: list = []
    for t in sorted(items, key=key):
        if not any(all(a <= b for a, b in zip(key(f), key(t))) for f in front):
            front.append(t)
    return front


def _key(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def plot_front(ax, front: list, x, y) -> None:
    """The Pareto front of a sweep as a black line over its trials' scatter (x, y: trial -> value)."""
    ax.plot([x(t) for t in front], [y(t) for t in front], "k.-", label="Pareto front")


def save_figure(fig, path, title: str) -> None:
    """Title, tight layout, write (120 dpi) and free a sweep's figure."""
    import matplotlib.pyplot as plt
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
