"""Which rows this run processes: its shard's rows, each id once, minus those already done.

Used twice per run (a counting pass for the progress total, then the real pass) and by
`--dry-run`; it holds two 64-bit hashes per row of the shard, never the rows.
"""

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from mdlserve.server.batch.ids import IdSet, Shard, id_hash
from mdlserve.server.batch.inputs import Row

logger = logging.getLogger("mdlserve.batch")


@dataclass
class Counts:
    rows: int = 0  # rows read, every shard
    other_shards: int = 0
    duplicates: int = 0  # a second row with an id already seen (not run, not written)
    done_before: int = 0  # in the output already
    todo: int = 0
    duplicate_ids: list[str] = field(default_factory=list)  # the first few, for the summary


def select(rows: Iterable[Row], shard: Shard, done: IdSet, counts: Counts) -> Iterator[Row]:
    seen = IdSet()
    for row in rows:
        counts.rows += 1
        hashed = id_hash(row.id)
        if not shard.owns(hashed):
            counts.other_shards += 1
        elif not seen.add(hashed):
            counts.duplicates += 1
            if len(counts.duplicate_ids) < 20:
                counts.duplicate_ids.append(row.id)
        elif hashed in done:
            counts.done_before += 1
        else:
            counts.todo += 1
            yield row
