"""Engines that hold an accelerator: one loaded per device at a time, released before an engine
for another model loads there, and at the end of the flow that used it.

An in-process vLLM engine takes a share of the GPU's memory (0.9 by default) for its weights and
KV cache until it is deleted. Evaluating a base, an SFT and an RL model in one process, or
asking two evolvers for siblings, would otherwise open one such engine per model on the same
GPU. So an accelerator engine (duck-typed: a `device` name, `load()` and `release()`, both
idempotent) is loaded lazily, when it is first asked to generate, through `ACCELERATORS.using`:

- the device's current engine, when it is another one, is released first (its `LLM` shut down
  and deleted, memory returned; see `VLLMEngine.release`), once no call is generating with it:
  a thread asking for another model waits for the calls in flight to finish;
- an engine released this way is not broken: asked again, it loads again (a stage that alternates
  between two models pays one load per switch, which is why callers batch per model: the
  siblings stage asks each evolver for all its siblings at once, evaluation shards by model);
- `release_accelerators()` (or leaving an `engine_scope()`, which every flow that opens engines
  runs in) releases what is still loaded, so the GPU is free for the next flow in the process
  (training, after the data and reward flows of a factory run).

The engine objects themselves stay in `build_engine`'s memo (a released one holds only its
configuration), so a stage that kept one can still use it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Accelerators:
    """Which accelerator engine is loaded on each device, and how many calls are using it."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._loaded: dict[str, Any] = {}
        self._busy: dict[str, int] = {}

    @contextmanager
    def using(self, engine: Any) -> Iterator[None]:
        """Hold `engine` loaded on its device for the duration of one call (loading it, after
        releasing the device's other engine once nothing generates with that one)."""
        device = engine.device
        with self._changed:
            while True:
                current = self._loaded.get(device)
                if current is engine:
                    break
                if not self._busy.get(device):
                    if current is not None:
                        del self._loaded[device]
                        current.release()
                    engine.load()
                    self._loaded[device] = engine
                    break
                self._changed.wait()
            self._busy[device] = self._busy.get(device, 0) + 1
        try:
            yield
        finally:
            with self._changed:
                self._busy[device] -= 1
                self._changed.notify_all()

    def loaded(self, device: str) -> Any | None:
        with self._changed:
            return self._loaded.get(device)

    def release_all(self) -> None:
        """Release every loaded engine, once the calls in flight are done."""
        with self._changed:
            while any(self._busy.values()):
                self._changed.wait()
            while self._loaded:
                _, engine = self._loaded.popitem()
                engine.release()
            self._changed.notify_all()


ACCELERATORS = Accelerators()


def release_accelerators() -> None:
    """Release the accelerator engines this process has loaded (the GPU's memory goes back)."""
    ACCELERATORS.release_all()


@contextmanager
def engine_scope() -> Iterator[None]:
    """Run a flow's body; the accelerator engines it loaded are released when it ends, however
    it ends."""
    try:
        yield
    finally:
        release_accelerators()
