"""Background expert reads: one I/O thread fills the cache while the decoder computes.

`request(key)` queues a read unless the expert is cached or already on its way; `pending(key)` gives
the decoder the Future of an in-flight read so it waits for it instead of reading twice. `close()`
stops the thread (queued reads are cancelled) and joins it; the object is a context manager.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable

from edge.moe.cache import ExpertCache
from edge.moe.policies import Key


class Prefetcher:
    def __init__(self, read: Callable[[Key], object], cache: ExpertCache, nbytes: Callable[[object], int],
                 on_rejected: Callable[[Key], None] = lambda key: None):
        self.read, self.cache, self.nbytes, self.on_rejected = read, cache, nbytes, on_rejected
        self.queue: queue.Queue = queue.Queue()
        self.inflight: dict[Key, Future] = {}
        self.lock = threading.Lock()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="expert-prefetch", daemon=True)
        self.thread.start()

    def request(self, key: Key) -> bool:
        """Queues a background read of `key`; False when closed, cached or already in flight."""
        with self.lock:
            if self.closed or key in self.inflight or key in self.cache:
                return False
            fut: Future = Future()
            self.inflight[key] = fut
        self.queue.put((key, fut))
        return True

    def pending(self, key: Key) -> Future | None:
        with self.lock:
            return self.inflight.get(key)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            key, fut = item
            if not fut.set_running_or_notify_cancel():
                self._done(key)
                continue
            try:
                value = self.read(key)
                if not self.cache.put(key, value, self.nbytes(value)):
                    self.on_rejected(key)
                fut.set_result(value)
            except BaseException as e:  # handed to whoever waits on the future
                fut.set_exception(e)
            finally:
                self._done(key)

    def _done(self, key: Key) -> None:
        with self.lock:
            self.inflight.pop(key, None)

    def close(self, timeout: float = 10.0) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            waiting = list(self.inflight.values())
        for fut in waiting:
            fut.cancel()  # only queued reads cancel; a running one finishes
        self.queue.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError("expert prefetch thread did not stop")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
