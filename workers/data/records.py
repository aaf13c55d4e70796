"""A data source's records as a `datasets.Dataset`: a file, a `save_to_disk` folder (its state.json's files checked
first) or a folder of data files of one type, from disk or a bucket mirror."""

from __future__ import annotations

from pathlib import Path

from jobspecs.schema import DATA_SUFFIXES, DataSource, index_entries
from workers.storage.inputs import fetch_all, listed_files, present


def data_files(folder: Path) -> list[Path]:
    """A folder source's data files, in name order: a save_to_disk folder's .arrow files, or the files of the one
    data type the folder holds (a bucket mirror's not yet fetched ones included)."""
    names = listed_files(folder)
    if "state.json" in names:  # each file it names must be a file of the folder (datasets joins them unchecked)
        return index_entries(present(folder / "state.json"), f"{folder}/state.json")
    return [folder / n for n in names if n.endswith(DATA_SUFFIXES)]


def load_records(source: DataSource):
    """A `datasets.Dataset` from a jsonl/json/parquet/arrow file, a `save_to_disk` folder or a folder of data files
    of one type (a bucket mirror's files are fetched first)."""
    import datasets

    path = Path(source.path)
    if path.is_dir() and "state.json" in listed_files(path):
        data_files(path)  # checked before datasets reads them
        ds = datasets.load_from_disk(str(fetch_all(path)))
    else:
        files = [present(f) for f in data_files(path)] if path.is_dir() else [present(path)]
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}[files[0].suffix]
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    if source.limit is not None:
        ds = ds.select(range(min(source.limit, len(ds))))
    return ds
