"""Training examples as each worker draws them: from memory (the dataset tokenized whole) or streamed.

Both keep the same contract: seeded, disjoint across ranks, a new shuffle each epoch, and a position (epoch, where
in it) that a checkpoint records per rank, so a resumed run draws exactly what the uninterrupted one would have.

    InMemory   every record tokenized up front; each epoch a seeded permutation of all of them, rank r taking
               positions r, r + world, ... (the default: small data, the exact global shuffle)
    Streamed   data.streaming: the source is cut into units — the files of a folder source (a save_to_disk
               folder's .arrow files, or its data files), else a parquet file's row groups — and each epoch a
               seeded shuffle of the units deals them to the ranks round-robin; a rank reads, tokenizes and
               shuffles one unit at a time. A worker holds one unit, never the dataset, and from a bucket fetches
               only its units' files (workers/storage/inputs.py).

Why our own and not `datasets` streaming or Ray Data: `split_dataset_by_node` gives whole files to ranks only when
their number divides evenly by the world size (otherwise every rank reads every file and skips what is not
its own), and Ray Data's `streaming_split` has no position a restarted worker group can resume from (it starts
the dataset over) and runs its own actors beside the training workers. The unit shuffle here is the in-memory
path's idea at file / row-group granularity, and its position is three integers in state.json.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.storage.inputs import present

Tokenize = Callable[[list[dict[str, Any]], str], list[dict[str, list[int]]]]  # (records, where) → examples


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


class InMemory:
    """This rank's share of a seeded permutation of every example, epoch after epoch."""

    def __init__(self, examples: Sequence[dict], rank: int, world: int, seed: int, position: dict | None = None):
        self.examples, self.rank, self.world, self.seed = examples, rank, world, seed
        position = position or {}
        self.epoch, self.cursor = position.get("epoch", 0), position.get("cursor", 0)
        self.order = self._order()

    def _order(self) -> list[int]:
        return epoch_order(len(self.examples), self.seed, self.epoch)[self.rank :: self.world]

    def take(self, n: int) -> list[dict]:
        """The next `n` examples; an epoch's tail shorter than `n` is skipped and the next epoch begins."""
        if self.cursor + n > len(self.order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self.order = self._order()
        batch = [self.examples[i] for i in self.order[self.cursor : self.cursor + n]]
        self.cursor += len(batch)
        return batch

    def position(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}


@dataclass(frozen=True)
class Unit:
    """A piece of a source read whole: a file (`row_group` -1) or one row group of a parquet file."""

    file: Path
    row_group: int = -1

    def __str__(self) -> str:
        return f"{self.file}" + (f" row group {self.row_group}" if self.row_group >= 0 else "")


def units(path: Path) -> list[Unit]:
    """The units of a source, in a fixed order: a folder's data files, else a parquet file's row groups, else the
    file itself."""
    from workers.data.records import data_files

    path = Path(path)
    if path.is_dir():
        return [Unit(f) for f in data_files(path)]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [Unit(path, g) for g in range(pq.ParquetFile(present(path)).num_row_groups)]
    return [Unit(path)]


def read_unit(unit: Unit) -> list[dict[str, Any]]:
    """A unit's records (fetched first if it is a bucket mirror's file)."""
    path = present(unit.file)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path).read_row_group(unit.row_group) if unit.row_group >= 0 else pq.read_table(path)
        return table.to_pylist()
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    import datasets

    if path.suffix == ".arrow":
        return datasets.Dataset.from_file(str(path)).to_list()
    return datasets.load_dataset("json", data_files=str(path), split="train").to_list()


class Streamed:
    """This rank's units of each epoch's seeded unit shuffle, read one at a time, records shuffled within a unit."""

    def __init__(self, source_units: list[Unit], tokenize: Tokenize, rank: int, world: int, seed: int,
                 position: dict | None = None):
        if len(source_units) < world:
            raise ValueError(f"data.streaming deals whole units (a folder's files, a parquet file's row groups) to "
                             f"the training workers, and {source_units[0].file if source_units else 'the source'} "
                             f"has {len(source_units)} for {world} workers: split it into more files or row groups, "
                             "lower train.num_workers, or turn data.streaming off")
        self.units, self.tokenize = source_units, tokenize
        self.rank, self.world, self.seed = rank, world, seed
        at = position or {}
        self.epoch, self.unit, self.offset = at.get("epoch", 0), at.get("unit", 0), at.get("offset", 0)
        self.records: list[dict] = []
        self.loaded: tuple[int, int] | None = None  # (epoch, unit) whose examples `records` holds

    def mine(self, epoch: int) -> list[int]:
        """Indices of this rank's units in `epoch`, in reading order."""
        return epoch_order(len(self.units), self.seed, epoch)[self.rank :: self.world]

    def _load(self) -> None:
        index = self.mine(self.epoch)[self.unit]
        unit = self.units[index]
        examples = self.tokenize(read_unit(unit), str(unit))
        order = epoch_order(len(examples), self.seed + index, self.epoch)
        self.records = [examples[i] for i in order]
        self.loaded = (self.epoch, self.unit)

    def take(self, n: int) -> list[dict]:
        """The next `n` examples, across unit boundaries; an epoch's tail shorter than `n` is skipped."""
        batch: list[dict] = []
        fresh = self.unit == 0 and self.offset == 0  # this batch starts an epoch
        while len(batch) < n:
            if self.unit >= len(self.mine(self.epoch)):
                self.epoch, self.unit, self.offset = self.epoch + 1, 0, 0
                if fresh and batch:  # a whole epoch of this rank is shorter than n: what there is
                    return batch
                if fresh:
                    raise ValueError(f"data.streaming: rank {self.rank}'s units hold no records")
                batch, fresh = [], True
                continue
            if self.loaded != (self.epoch, self.unit):
                self._load()
            got = self.records[self.offset : self.offset + n - len(batch)]
            batch += got
            self.offset += len(got)
            if self.offset >= len(self.records):
                self.unit, self.offset = self.unit + 1, 0
        return batch

    def position(self) -> dict:
        return {"epoch": self.epoch, "unit": self.unit, "offset": self.offset}
