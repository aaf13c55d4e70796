"""The spec's tokenizer (read from a checked copy when the job is confined to a data root) and the id padding gets."""

from __future__ import annotations

import tempfile
from pathlib import Path

from jobspecs.confinement import copy_small_files
from jobspecs.schema import JobSpec, config_pad_id, tokenizer_problem
from workers.storage.inputs import confinement_root


def load_tokenizer(spec: JobSpec):
    """The spec's tokenizer; None when the job needs none (pre-tokenized data) and its folder has none."""
    from transformers import AutoTokenizer

    folder = spec.model.tokenizer_path
    if not spec.needs_tokenizer and tokenizer_problem(folder):
        return None
    root = confinement_root(spec.data_root, folder)
    if root is None:
        return AutoTokenizer.from_pretrained(folder)
    # Read from a checked copy: what save_pretrained later writes into an artifact is what was checked.
    with tempfile.TemporaryDirectory(prefix="peftfleet-tokenizer-") as copy:
        return AutoTokenizer.from_pretrained(copy_small_files(root, folder, Path(copy), "model.tokenizer"))


def pad_id(spec: JobSpec, tokenizer) -> int:
    """The id padding positions get: data.pad_token_id, the tokenizer's pad (else eos) token, else config.json's."""
    if spec.data.pad_token_id is not None:
        return spec.data.pad_token_id
    if tokenizer is not None:
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return config_pad_id(spec.model.path)
