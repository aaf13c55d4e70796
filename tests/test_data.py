"""Tokenization and masking: only the response (assistant turns) is learned."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from jobspecs.schema import DataSource, DataSpec
from workers.data.examples import IGNORE, chat_example, collate, instruction_example, tokenize
from workers.data.stream import InMemory


@pytest.fixture(scope="module")
def tokenizer(assets):
    return AutoTokenizer.from_pretrained(assets / "tiny-llama")


def test_instruction_labels_mask_everything_before_the_response(tokenizer):
    ex = instruction_example(tokenizer, "reverse: apple\n", "elppa", max_len=64)
    prompt_len = 1 + len(tokenizer("reverse: apple\n", add_special_tokens=False)["input_ids"])
    assert ex["labels"][:prompt_len] == [IGNORE] * prompt_len
    response = ex["labels"][prompt_len:]
    assert IGNORE not in response
    assert response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response[:-1]) == "elppa"
    assert ex["input_ids"][prompt_len:] == response


def test_truncation_keeps_ids_and_labels_aligned(tokenizer):
    ex = instruction_example(tokenizer, "repeat: " + "apple " * 40, "x", max_len=16)
    assert len(ex["input_ids"]) == len(ex["labels"]) == 16
    assert set(ex["labels"]) == {IGNORE}


def test_chat_learns_only_assistant_turns(tokenizer):
    messages = [{"role": "user", "content": "upper: cat"}, {"role": "assistant", "content": "CAT"},
                {"role": "user", "content": "upper: dog"}, {"role": "assistant", "content": "DOG"}]
    ex = chat_example(tokenizer, messages, max_len=256)
    learned = tokenizer.decode([t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE])
    assert learned.replace("\n", "").replace("</s>", "|") == "CAT|DOG|"
    assert tokenizer.decode(ex["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_collate_pads_with_ignored_labels(tokenizer):
    a = instruction_example(tokenizer, "add: 1 + 2\n", "3", 64)
    b = instruction_example(tokenizer, "reverse: maple\n", "elpam", 64)
    batch = collate([a, b], tokenizer.pad_token_id)
    n = len(a["input_ids"])
    assert batch["input_ids"].shape[0] == 2
    assert (batch["labels"][0, n:] == IGNORE).all() and (batch["attention_mask"][0, n:] == 0).all()
    assert batch["attention_mask"][1].all()


def test_shards_are_disjoint_and_deterministic():
    items = [{"i": i} for i in range(10)]

    def shard(rank, seed):
        return InMemory(items, rank, 2, seed).take(5)

    a, b = shard(0, seed=7), shard(1, seed=7)
    assert sorted(x["i"] for x in a + b) == list(range(10))
    assert a == shard(0, seed=7) and a != shard(0, seed=8)


def test_missing_field_names_field_and_record(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    spec = DataSpec(train=DataSource(path=path))
    with pytest.raises(ValueError, match=r"record 1 has no field 'response'"):
        tokenize(spec.train, tokenizer, spec)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "arrow", "save_to_disk"])
def test_every_source_type_loads(tmp_path, tokenizer, kind):
    import datasets

    records = [{"prompt": f"upper: {w}\n", "response": w.upper()} for w in ("cat", "dog", "owl")]
    ds = datasets.Dataset.from_list(records)
    path = {"jsonl": tmp_path / "d.jsonl", "json": tmp_path / "d.json", "parquet": tmp_path / "d.parquet",
            "arrow": tmp_path / "d.arrow", "save_to_disk": tmp_path / "saved"}[kind]
    if kind == "jsonl":
        ds.to_json(path, lines=True)
    elif kind == "json":
        path.write_text(json.dumps(records))
    elif kind == "parquet":
        ds.to_parquet(path)
    elif kind == "arrow":
        ds.save_to_disk(tmp_path / "tmp")
        next((tmp_path / "tmp").glob("*.arrow")).rename(path)
    else:
        ds.save_to_disk(path)
    spec = DataSpec(train=DataSource(path=path, limit=2))
    examples = tokenize(spec.train, tokenizer, spec)
    assert len(examples) == 2
    assert tokenizer.decode([t for t in examples[1]["labels"] if t != IGNORE]) == "DOG</s>"


@pytest.mark.parametrize("row, says", [
    ({"input_ids": "1 2 3"}, "field 'input_ids' must be a non-empty list of token ids, got str"),
    ({"input_ids": []}, "must be a non-empty list"),
    ({"input_ids": [1, -3]}, "position 1 is -3, not a token id"),
    ({"input_ids": [1, 2.5]}, "position 1 is 2.5"),
    ({"input_ids": [1, 2], "labels": [1, "x"]}, "field 'labels': position 1 is 'x'"),
    ({"input_ids": [1, 2], "labels": [1]}, "has 2 input_ids but 1 labels"),
])
def test_bad_token_rows_say_what_is_wrong_with_the_row(tmp_path, row, says):
    from jobspecs.schema import DataSource, DataSpec
    from workers.data.examples import tokenize

    path = tmp_path / "tokens.jsonl"
    path.write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n" + json.dumps(row) + "\n")
    data = DataSpec.model_validate({"format": "tokens", "train": str(path), "pad_token_id": 0})
    with pytest.raises(ValueError) as err:
        tokenize(DataSource(path=path), None, data)
    assert str(err.value).startswith(f"{path}: record 1 ") and says in str(err.value), err.value


def test_a_dataset_smaller_than_the_workers_or_past_the_vocabulary_is_refused_naming_it(tmp_path):
    from jobspecs.schema import DataSource
    from workers.data.examples import check_count, tokenize_records

    source = DataSource.model_validate({"path": tmp_path}, context={"check_files": False})
    with pytest.raises(ValueError, match="1 record\\(s\\) for 2 training workers"):
        check_count([{"input_ids": [1]}], source, workers=2)
    check_count([{"input_ids": [9]}], source, workers=1)
    data = DataSpec.model_validate({"format": "tokens", "train": source}, context={"check_files": False})
    with pytest.raises(ValueError, match=r"part-3\.parquet: record 1 has token id 10, past the model.s vocabulary"):
        tokenize_records([{"input_ids": [1]}, {"input_ids": [10]}], "part-3.parquet", None, data, vocab_size=10)
    assert tokenize_records([{"input_ids": [9]}], "x", None, data, vocab_size=10)[0]["input_ids"] == [9]
