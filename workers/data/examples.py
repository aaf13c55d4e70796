"""Records in, token ids and labels out. Decoder-only instruction and chat data are masked so that only the
response (assistant turns) is learned: every label before it is -100. Examples become padded batches here too."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from jobspecs.schema import DataFields, DataSource, DataSpec
from workers.data.records import load_records

IGNORE = -100


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def instruction_example(tokenizer, prompt: str, response: str, max_len: int) -> dict[str, list[int]]:
    prompt_ids = _bos(tokenizer) + _ids(tokenizer, prompt)
    response_ids = _ids(tokenizer, response) + _eos(tokenizer)
    ids = (prompt_ids + response_ids)[:max_len]
    labels = ([IGNORE] * len(prompt_ids) + response_ids)[:max_len]
    return {"input_ids": ids, "labels": labels}


def chat_example(tokenizer, messages: list[dict[str, str]], max_len: int) -> dict[str, list[int]]:
    """Render turn by turn with the chat template; tokens a turn adds are learned only if it is the assistant's."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.format 'chat' needs a tokenizer with a chat_template")
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        text = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        # The assistant's role header is prompt, not response: the model is given it at inference time.
        header = (tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
                  if message["role"] == "assistant" and i > 0 else rendered)
        if not (text.startswith(header) and header.startswith(rendered)):
            raise ValueError("the tokenizer's chat template does not render a conversation as a prefix of its "
                             "continuation; response-only masking cannot be computed")
        prompt_part = _ids(tokenizer, header[len(rendered):])
        ids += prompt_part
        labels += [IGNORE] * len(prompt_part)
        delta = _ids(tokenizer, text[len(header):])
        ids += delta
        labels += delta if message["role"] == "assistant" else [IGNORE] * len(delta)
        rendered = text
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}


def text_example(tokenizer, text: str, max_len: int) -> dict[str, list[int]]:
    ids = (_bos(tokenizer) + _ids(tokenizer, text) + _eos(tokenizer))[:max_len]
    return {"input_ids": ids, "labels": list(ids)}


def _field(record: dict[str, Any], name: str) -> Any:
    # Columnar loaders fill a field some records lack with None: that is a missing field too.
    if record.get(name) is None:
        raise KeyError(name)
    return record[name]


def to_example(record: dict[str, Any], tokenizer, fmt: str, fields: DataFields, max_len: int) -> dict[str, list[int]]:
    if fmt == "instruction":
        return instruction_example(tokenizer, _field(record, fields.prompt), _field(record, fields.response), max_len)
    if fmt == "chat":
        return chat_example(tokenizer, _field(record, fields.messages), max_len)
    if fmt == "text":
        return text_example(tokenizer, _field(record, fields.text), max_len)
    ids = _id_list(_field(record, fields.input_ids), fields.input_ids)[:max_len]
    labels = _id_list(record["labels"], "labels", IGNORE)[:max_len] if record.get("labels") is not None else ids
    if len(labels) != len(ids):
        raise ValueError(f"has {len(ids)} {fields.input_ids} but {len(labels)} labels (after max_seq_len)")
    return {"input_ids": ids, "labels": list(labels)}


def _id_list(value: Any, name: str, allowed: int | None = None) -> list[int]:
    """A row's token ids as a list of non-negative ints (`allowed`: one negative value that may appear too)."""
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"field {name!r} must be a non-empty list of token ids, got {type(value).__name__}")
    ids = []
    for i, v in enumerate(value):
        if isinstance(v, float) and v.is_integer():  # columnar loaders make a column float if one row has a float
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or (v < 0 and v != allowed):
            raise ValueError(f"field {name!r}: position {i} is {v!r}, not a token id (an int ≥ 0"
                             + (f" or {allowed})" if allowed is not None else ")"))
        ids.append(v)
    return ids


def check_count(examples: Sequence[dict], source: DataSource, workers: int) -> None:
    """Every worker needs a record of its own, said before any tensor is built from the dataset."""
    if len(examples) < workers:
        raise ValueError(f"{source.path}: {len(examples)} record(s) for {workers} training workers; each worker "
                         f"needs at least one: add records or lower train.num_workers")


def tokenize(source: DataSource, tokenizer, data: DataSpec, max_len: int | None = None,
             vocab_size: int | None = None) -> list[dict[str, list[int]]]:
    """Every record of `source` as {input_ids, labels}; a bad record names the field or token and the row."""
    return tokenize_records(load_records(source), str(source.path), tokenizer, data, max_len, vocab_size)


def tokenize_records(records: Iterable[dict[str, Any]], where: str, tokenizer, data: DataSpec,
                     max_len: int | None = None, vocab_size: int | None = None) -> list[dict[str, list[int]]]:
    """Records as {input_ids, labels}; errors name `where` (the file or unit), the row and what is wrong with it
    (a missing field; with `vocab_size`, a token id past the vocabulary)."""
    max_len = max_len or data.max_seq_len
    examples = []
    for row, record in enumerate(records):
        try:
            example = to_example(record, tokenizer, data.format, data.fields, max_len)
        except KeyError as err:
            raise ValueError(f"{where}: record {row} has no field {err} needed by data.format "
                             f"{data.format!r} (see data.fields)") from None
        except ValueError as err:
            raise ValueError(f"{where}: record {row} {err}") from None
        if vocab_size is not None and (top := max(example["input_ids"], default=0)) >= vocab_size:
            raise ValueError(f"{where}: record {row} has token id {top}, past the model's vocabulary "
                             f"(vocab_size {vocab_size})")
        examples.append(example)
    return examples


def collate(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; padding has attention 0 and label -100."""
    width = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        ids[i, :n] = torch.tensor(ex["input_ids"])
        labels[i, :n] = torch.tensor(ex["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(samples: Sequence[Sequence[int]], batch_size: int, pad_id: int) -> Iterator[tuple[str, dict]]:
    """(sample range, padded batch) in order; right padding: with causal attention the real tokens' activations
    do not depend on it."""
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        yield f"{start}..{start + len(batch) - 1}", collate([{"input_ids": ids, "labels": ids} for ids in batch],
                                                            pad_id)
