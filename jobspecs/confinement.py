"""Every file a job reads from a folder its user named, kept inside the spec's `data_root`.

A folder checked at its top is not a checked folder: a tokenizer whose `chat_template.jinja` links to
`/proc/self/environ` would be written into an artifact by `save_pretrained`, and an index can name any path. So:

- `inside`: a path the spec names, resolved (links followed), must lie under the root;
- `check_tree`: every entry under a folder — links must resolve inside the root, and nothing but regular files
  and folders (a FIFO would hang its reader);
- `entry`: a file an index names (`model.safetensors.index.json`, `groups.json`) is a relative path that stays
  in its folder, data root or not;
- `open_checked`: opens, then asks the kernel what was opened (`/proc/self/fd`), so swapping a checked file for a
  link between the check and the read gets nothing.

Each check runs where the spec is validated (the gateway, `peftfleet validate`) and again where the job reads:
the driver re-checks every input before its first stage, and the processes that read re-check before they read.
Without a data root (the CLI, on an operator's own files) links may go anywhere; index entries are still checked.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path, PurePosixPath
from typing import BinaryIO

# what a tokenizer folder's loader may need: everything in it but the weights
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")


class Outside(ValueError):
    """A file the job would read lies outside its data root, or is not a plain file; the message names it."""


def inside(root: Path | None, path: Path, what: str) -> Path:
    """`path` resolved; refused unless under `root`. The message is the same whether or not the path exists, so
    the answer says nothing about the host's files."""
    resolved = Path(path).resolve()
    if root is not None and not resolved.is_relative_to(root):
        raise Outside(f"{what}: {path} is outside the data root {root}")
    return resolved


def check_tree(root: Path | None, folder: Path, what: str) -> None:
    """Every entry under `folder` stays inside `root` and is a regular file or a folder."""
    if root is None:
        return
    seen: set[Path] = set()
    pending = [inside(root, folder, what)]
    while pending:
        top = pending.pop()
        if top in seen:
            continue
        seen.add(top)
        if not top.is_dir():
            _regular(top, what)
            continue
        for dirpath, dirnames, filenames in os.walk(top):  # links are not followed: each is checked as a link
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                if path.is_symlink():
                    if not path.resolve().is_relative_to(root):
                        raise Outside(f"{what}: {path} is a link that leads outside the data root {root}")
                    pending.append(path.resolve())
                elif name in filenames:
                    _regular(path, what)


def _regular(path: Path, what: str) -> None:
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise Outside(f"{what}: {path} is not a regular file")


def entry(folder: Path, name: str, what: str) -> Path:
    """The file `name` (from an index inside `folder`) names: a relative path that stays in `folder`."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
        raise Outside(f"{what}: names {name!r}, which is not a file inside {folder}")
    return Path(folder, *parts)


def open_checked(root: Path | None, path: Path, what: str) -> BinaryIO:
    """`path` opened for reading; refused if what the kernel opened is outside `root` or not a regular file."""
    f = open(path, "rb")  # noqa: SIM115 - returned to the caller
    try:
        opened = Path(os.readlink(f"/proc/self/fd/{f.fileno()}"))
        if root is not None and not opened.is_relative_to(root):
            raise Outside(f"{what}: {path} leads outside the data root {root}")
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise Outside(f"{what}: {path} is not a regular file")
    except BaseException:
        f.close()
        raise
    return f


def copy_small_files(root: Path | None, folder: Path, dest: Path, what: str) -> Path:
    """Copy `folder`'s files but the weights (a tokenizer's, say) into `dest` through `open_checked`: a library
    then reads the checked copy, which no one can swap."""
    check_tree(root, folder, what)
    for path in sorted(Path(folder).rglob("*")):
        if path.is_dir() or path.suffix in _WEIGHTS:
            continue
        target = dest / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open_checked(root, path, what) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
    return dest
