"""One cache of computed prompt prefixes (the key/values a prompt gives every layer), per backbone runtime.

Keyed by the prompt's content hash (kind and values) and everything that changes the numbers: the backbone's dtype
and device, the autocast dtype, the head mode, and any tokens run after the prompt. Bounded (least recently used
out first) and locked: training evaluation, generation and serving threads share it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

DEFAULT_CAPACITY = 64  # prompts whose prefixes are kept per backbone


class PromptCache:
    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = capacity
        self._store: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """The value under `key`, computed (without gradient, outside the lock) on a miss."""
        with self._lock:
            if key in self._store:
                self._store.move_to_end(key)
                self.hits += 1
                return self._store[key]
            self.misses += 1
        with torch.no_grad():
            value = compute()
        with self._lock:
            self._store[key] = value
            self._store.move_to_end(key)
            while len(self._store) > self.capacity:
                self._store.popitem(last=False)
        return value

    def forget(self, digest: str) -> int:
        """Drop every entry of the prompt with this content hash; returns how many."""
        with self._lock:
            stale = [k for k in self._store if k[0] == digest]
            for k in stale:
                del self._store[k]
        return len(stale)

    def holds(self, digest: str) -> bool:
        """Whether any entry of the prompt with this content hash is kept."""
        with self._lock:
            return any(k[0] == digest for k in self._store)

    def clear(self) -> None:
        with self._lock:
            self._store.clear()

    def __len__(self) -> int:
        return len(self._store)

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self._store)}
