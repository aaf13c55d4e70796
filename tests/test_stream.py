"""Streamed training data: units dealt to ranks by a seeded shuffle, disjoint, resumable, read one at a time —
and from a bucket, each rank fetches only its own units' files."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers.data.stream import InMemory, Streamed, Unit, read_unit, units
from workers.storage.inputs import local
from workers.storage.node_cache import NodeCache


def ids(records: list[dict], where: str) -> list[dict]:
    return [{"input_ids": [r["i"]], "labels": [r["i"]]} for r in records]


def write_parts(folder, parts: int, per_part: int):
    folder.mkdir(parents=True, exist_ok=True)
    for p in range(parts):
        rows = [json.dumps({"i": p * per_part + k}) for k in range(per_part)]
        (folder / f"part-{p:03d}.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def drawn(stream, batches: int, n: int) -> list[int]:
    return [ex["input_ids"][0] for _ in range(batches) for ex in stream.take(n)]


def test_units_are_a_folders_files_or_a_parquet_files_row_groups(tmp_path):
    folder = write_parts(tmp_path / "parts", 3, 4)
    assert [u.file.name for u in units(folder)] == ["part-000.jsonl", "part-001.jsonl", "part-002.jsonl"]
    table = pa.table({"i": list(range(10))})
    pq.write_table(table, tmp_path / "one.parquet", row_group_size=3)
    groups = units(tmp_path / "one.parquet")
    assert [u.row_group for u in groups] == [0, 1, 2, 3]
    assert [r["i"] for r in read_unit(groups[3])] == [9]
    assert units(folder / "part-000.jsonl") == [Unit(folder / "part-000.jsonl")]


def test_ranks_draw_disjoint_units_covering_the_epoch_and_reshuffled_the_next(tmp_path):
    source = units(write_parts(tmp_path / "parts", 6, 5))
    ranks = [Streamed(source, ids, rank, 2, seed=3) for rank in range(2)]
    epoch0 = [drawn(r, 3, 5) for r in ranks]  # 3 units of 5 records each per rank
    assert sorted(epoch0[0] + epoch0[1]) == list(range(30))
    parts = [{i // 5 for i in mine} for mine in epoch0]
    assert not parts[0] & parts[1] and len(parts[0]) == 3  # whole units, one rank each
    epoch1 = [drawn(r, 3, 5) for r in ranks]
    assert all(r.epoch == 1 for r in ranks)
    assert epoch1 != epoch0 and sorted(epoch1[0] + epoch1[1]) == list(range(30))
    again = [drawn(Streamed(source, ids, rank, 2, seed=3), 3, 5) for rank in range(2)]
    assert again == epoch0  # seeded


def test_a_stream_resumes_from_its_position_exactly(tmp_path):
    source = units(write_parts(tmp_path / "parts", 4, 7))
    whole = Streamed(source, ids, 1, 2, seed=0)
    first = drawn(whole, 3, 4)  # ends inside a unit
    position = whole.position()
    assert position["offset"] not in (0, None)
    rest = drawn(whole, 6, 4)  # crosses units and the epoch boundary
    resumed = Streamed(source, ids, 1, 2, seed=0, position=json.loads(json.dumps(position)))
    assert drawn(resumed, 6, 4) == rest and first
    memory = InMemory([{"input_ids": [i]} for i in range(28)], 1, 2, seed=0)
    head = drawn(memory, 3, 4)
    assert drawn(InMemory(memory.examples, 1, 2, 0, memory.position()), 4, 4) == drawn(memory, 4, 4) and head


def test_fewer_units_than_workers_says_how_to_fix_it(tmp_path):
    source = units(write_parts(tmp_path / "parts", 1, 5))
    with pytest.raises(ValueError, match=r"has 1 for 2 workers: split it into more files or row groups"):
        Streamed(source, ids, 0, 2, seed=0)


def test_a_rank_fetches_only_its_own_units_from_a_bucket(tmp_path, s3_endpoint, bucket, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    client = boto3.client("s3", region_name="us-east-1")
    for part in sorted(write_parts(tmp_path / "parts", 4, 3).iterdir()):
        client.upload_file(str(part), bucket, f"ds/{part.name}")
    mirror = local(f"s3://{bucket}/ds", NodeCache(tmp_path / "cache"))
    source = units(mirror)
    assert len(source) == 4 and not any(u.file.exists() for u in source)  # listed, not fetched
    stream = Streamed(source, ids, 0, 2, seed=1)
    mine = {source[i].file.name for i in stream.mine(0)}
    drawn(stream, 2, 3)  # rank 0's epoch: its two units
    fetched = {p.name for p in mirror.iterdir() if not p.name.startswith(".")}
    assert fetched == mine and len(mine) == 2
    assert not [p for p in mirror.iterdir() if p.name.endswith(".part")]
