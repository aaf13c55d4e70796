"""A model's weights on disk, in the Hugging Face safetensors layout, read by name and written shard by shard.

    model.safetensors                                     one file, or
    model-00001-of-0000n.safetensors ... + model.safetensors.index.json   {"weight_map": {tensor: file}, ...}

Nothing here loads a whole model: tensors are read one by one from memory-mapped files (safetensors reads only the
bytes of the tensor asked for), and shapes and dtypes come from the files' headers, so planning a layout costs no
tensor data at all.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from jobspecs.confinement import entry
from workers.storage.inputs import available, present, read_head
from workers.storage.store import Store, StoredFile

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_HEAD = 1 << 18  # holds the header of a shard of a few hundred tensors
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorInfo:
    file: str  # the file holding it, relative to the model folder
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: tuple[int, ...]
    offset: int  # where its bytes start in the file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


def weight_map(folder: Path) -> dict[str, str]:
    """tensor name → file, from the index (sharded) or the single file; a clear error for anything else."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        where = dict(json.loads((folder / INDEX).read_text())["weight_map"])
        for file in set(where.values()):  # an index may name any path: only files of this folder are read
            entry(folder, file, str(folder / INDEX))
        return where
    if available(folder / SINGLE):
        return dict.fromkeys(header(folder / SINGLE), SINGLE)
    raise ValueError(f"{folder}: no {SINGLE} or {INDEX}; only safetensors weights can be read tensor by tensor")


def header(path: Path) -> dict[str, TensorInfo]:
    """A safetensors file's tensors, from its header alone: 8 bytes of header length, the JSON header, the data."""
    first = read_head(path, 0, _HEAD)  # one read (one ranged GET from a bucket) for most headers
    size = int.from_bytes(first[:8], "little")
    raw = first[8 : 8 + size] if 8 + size <= len(first) else read_head(path, 8, size)
    entries = json.loads(raw)
    entries.pop("__metadata__", None)
    return {name: TensorInfo(path.name, e["dtype"], tuple(e["shape"]), 8 + size + e["data_offsets"][0])
            for name, e in entries.items()}


def tensor_infos(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor's file, dtype, shape and place, from the safetensors headers (no tensor data is read)."""
    folder, out = Path(folder), {}
    where = weight_map(folder)
    for file in dict.fromkeys(where.values()):
        found = header(folder / file)
        out.update({name: found[name] for name, f in where.items() if f == file})
    return out


def read_range(folder: Path, info: TensorInfo, start: int, count: int) -> torch.Tensor:
    """Elements [start, start + count) of a tensor, flattened, read with a plain positional read: no memory map,
    so only these bytes pass through the process (the page cache is the kernel's, not ours)."""
    itemsize = DTYPE_BYTES[info.dtype]
    data, path = bytearray(count * itemsize), present(Path(folder) / info.file)
    view, at = memoryview(data), info.offset + start * itemsize
    with open(path, "rb") as f:
        while view:  # one read returns at most ≈ 2 GiB
            got = os.preadv(f.fileno(), [view], at)
            if got == 0:
                raise ValueError(f"{path}: truncated (a tensor's bytes end past the end of the file)")
            view, at = view[got:], at + got
    return torch.frombuffer(data, dtype=TORCH_DTYPES[info.dtype]) if count else torch.empty(0)


def read_tensors(folder: Path, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The named tensors only (each file opened once), optionally cast to `dtype`."""
    from safetensors import safe_open

    folder, where = Path(folder), weight_map(folder)
    by_file: dict[str, list[str]] = {}
    for name in names:
        if name not in where:
            raise KeyError(f"{folder}: no tensor {name!r} in its weights")
        by_file.setdefault(where[name], []).append(name)
    out = {}
    for file, wanted in by_file.items():
        with safe_open(present(folder / file), framework="pt") as f:
            for name in wanted:
                tensor = f.get_tensor(name)
                out[name] = tensor.to(dtype) if dtype is not None else tensor
    return out


def shard_name(k: int, n: int) -> str:
    """The k-th (1-based) of n shard files, named as transformers names them."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def pack(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names in their given order, cut into consecutive groups of at most `max_bytes` (a bigger tensor
    gets a group of its own)."""
    groups: list[list[str]] = []
    total = 0
    for name, size in sizes.items():
        if not groups or (total + size > max_bytes and groups[-1]):
            groups.append([])
            total = 0
        groups[-1].append(name)
        total += size
    return [g for g in groups if g]


def write_index(folder: Path, files: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json: tensor name → shard file, and the total bytes of the tensors."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(files.items()))}
    (Path(folder) / INDEX).write_text(json.dumps(index, indent=2))


def write_streamed(path: Path, infos: dict[str, TensorInfo], tensors: Iterable[tuple[str, torch.Tensor]],
                   metadata: dict[str, str]) -> None:
    """A safetensors file written as its tensors are produced: the header first (every name's dtype and shape is
    known up front, in `infos`' order, so the offsets are), then each tensor's bytes — one tensor in memory."""
    entries: dict = {"__metadata__": metadata}
    offset = 0
    for name, info in infos.items():
        entries[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    expected = iter(infos.items())
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, tensor in tensors:
            want, info = next(expected)
            if name != want or tuple(tensor.shape) != info.shape or TORCH_DTYPES[info.dtype] != tensor.dtype:
                raise ValueError(f"{path}: got {name} {tuple(tensor.shape)} {tensor.dtype}, the header says {want} "
                                 f"{info.shape} {info.dtype}")
            f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
    if next(expected, None) is not None:
        raise ValueError(f"{path}: fewer tensors written than its header lists")


def publish_shard(store: Store, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                  ) -> StoredFile:
    """Write `tensors` as one safetensors file to the store under `key` (through a local temporary file, removed
    after the upload); returns what was written."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="peftfleet-shard-") as tmp:
        local = Path(tmp) / "shard.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(local),
                  metadata={"format": "pt", **(metadata or {})})
        return store.publish(key, local)
