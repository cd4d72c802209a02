"""Row ids as 64-bit hashes: resume, duplicate detection and sharding without holding ids.

A million ids as Python strings in a set cost ~100 MB; as 64-bit hashes in an open-addressing
table they cost 16 MB. Two different ids share a hash with probability ~n²/2⁶⁵ (3·10⁻⁸ for
a million rows), which would make the second one count as already done.
"""

import hashlib
import os
import re
from dataclasses import dataclass

import numpy as np


def id_hash(row_id: str) -> int:
    """blake2b of the id, 8 bytes, never 0 (0 marks an empty slot). Stable across runs and
    machines, unlike hash(), so shards and resumes agree everywhere. surrogatepass: an id may
    hold lone surrogates (a file name that is not UTF-8, a \\ud800 escape in a JSON row)."""
    value = int.from_bytes(hashlib.blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return value or 1


class IdSet:
    """A set of id hashes in a numpy table (linear probing, grown at half load)."""

    def __init__(self, capacity: int = 1024):
        self._table = np.zeros(1 << max(capacity - 1, 1).bit_length(), dtype=np.uint64)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def _slot(self, table: np.ndarray, value: int) -> int:
        mask = table.size - 1
        slot = (value * 0x9E3779B97F4A7C15 >> 20) & mask
        while True:
            current = int(table[slot])
            if current == 0 or current == value:
                return slot
            slot = (slot + 1) & mask

    def __contains__(self, value: int) -> bool:
        return int(self._table[self._slot(self._table, value)]) == value

    def add(self, value: int) -> bool:
        """Adds `value`; False when it was already there."""
        slot = self._slot(self._table, value)
        if int(self._table[slot]) == value:
            return False
        self._table[slot] = value
        self._size += 1
        if 2 * self._size > self._table.size:
            self._grow()
        return True

    def _grow(self) -> None:
        old = self._table[self._table != 0]
        self._table = np.zeros(self._table.size * 2, dtype=np.uint64)
        for value in old.tolist():
            self._table[self._slot(self._table, value)] = value


SHARD_PATTERN = re.compile(r"^(?P<index>\d+|auto)/(?P<count>\d+)$")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: the rows whose id hash is `index` modulo `count`.

    By hash rather than by position, so a shard's rows do not depend on the input's order
    and every process can decide alone, without reading the rows before its own."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None, environ: dict[str, str] | None = None) -> "Shard":
        """'I/N', or 'auto/N' for I from JOB_COMPLETION_INDEX (Kubernetes Indexed Jobs)."""
        if text is None:
            return cls()
        match = SHARD_PATTERN.match(text.strip())
        if not match:
            raise ValueError(f"--shard must look like I/N or auto/N, got {text!r}")
        count = int(match["count"])
        index_text = match["index"]
        if index_text == "auto":
            index_text = (os.environ if environ is None else environ).get("JOB_COMPLETION_INDEX", "")
            if not index_text.isdigit():
                raise ValueError("--shard auto/N needs JOB_COMPLETION_INDEX (a number) in the environment")
        index = int(index_text)
        if count < 1 or index >= count:
            raise ValueError(f"--shard {index}/{count}: the index must be below the count, and the count ≥ 1")
        return cls(index, count)

    def owns(self, hashed_id: int) -> bool:
        return hashed_id % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
