"""Rows (data.py): row formats, file and hub sources, normalising to (prompt, chosen, rejected), the demo split."""

import gzip
import json
import os

import pytest
import torch
from conftest import HH_PAIRS

from data import BadRow, DataError, load_rows, make_demo_pairs, normalize_row, read_file

ROWS = [dict(prompt="What is 2+2?", chosen="4", rejected="5"),
        dict(prompt="Name a colour.", chosen="Blue.", rejected="A car."),
        dict(prompt="Say hi.", chosen="Hi!", rejected="No.")]


# --- formats ----------------------------------------------------------------------------------


def test_spec_and_common_field_names_agree():
    spec = dict(prompt="Q?", chosen_response="good", rejected_response="bad")
    common = dict(prompt="Q?", chosen="good", rejected="bad")
    assert normalize_row(spec) == normalize_row(common) == ("Q?", "good", "bad")


def test_hh_implicit_prompt_becomes_messages():
    row = dict(chosen="\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: Fine, thanks.",
               rejected="\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: Go away.")
    prompt, c, r = normalize_row(row)
    assert prompt == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "how are you?"}]
    assert (c, r) == ("Fine, thanks.", "Go away.")


def test_real_hh_rows_normalise():
    if not os.path.exists(HH_PAIRS):
        pytest.skip(f"needs {HH_PAIRS} (../shared beside the repo)")
    rows = read_file(HH_PAIRS)
    assert len(rows) == 2000
    ok = 0
    for row in rows[:200]:
        try:
            prompt, c, r = normalize_row(row)
        except BadRow:
            continue
        ok += 1
        assert prompt[-1]["role"] == "user" and c != r
        assert row["chosen"].endswith(c)
    assert ok >= 190


def test_generic_implicit_prompt_splits_at_a_word():
    prompt, c, r = normalize_row(dict(chosen="The sky is blue today", rejected="The sky is bright today"))
    assert (prompt, c, r) == ("The sky is ", "blue today", "bright today")


def test_conversational_message_lists():
    p = [{"role": "user", "content": "Hi"}]
    explicit = dict(prompt=p, chosen=[{"role": "assistant", "content": "Hello!"}],
                    rejected=[{"role": "assistant", "content": "What."}])
    implicit = dict(chosen=p + [{"role": "assistant", "content": "Hello!"}],
                    rejected=p + [{"role": "assistant", "content": "What."}])
    assert normalize_row(explicit) == normalize_row(implicit) == (p, "Hello!", "What.")


# --- sources ----------------------------------------------------------------------------------


def _write(path, rows):
    if path.endswith(".csv"):
        import csv
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.endswith(".jsonl.gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif path.endswith(".jsonl"):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        with open(path, "w") as f:
            json.dump(rows, f)


@pytest.mark.parametrize("name", ["d.json", "d.jsonl", "d.jsonl.gz", "d.csv", "d.parquet"])
def test_file_sources(tmp_path, name):
    path = str(tmp_path / name)
    _write(path, ROWS)
    assert load_rows(path) == ROWS


def test_save_to_disk_source(tmp_path):
    import datasets
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(tmp_path / "ds"))
    assert load_rows(str(tmp_path / "ds"), "test") == ROWS[:1]
    with pytest.raises(DataError, match="splits"):
        load_rows(str(tmp_path / "ds"), "validation")


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": "x", "chosen": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        load_rows(str(path))


def test_non_utf8_and_missing_path(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match="UTF-8"):
        load_rows(str(path))
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))


# --- bad rows -----------------------------------------------------------------------------------


# --- tokenisation ---------------------------------------------------------------------------------


# --- every template: what the model sees at inference ---------------------------------------------


# --- messages the template would drop -----------------------------------------------------------------


# --- batching ------------------------------------------------------------------------------------


def test_demo_split_is_by_activity():
    train, test = make_demo_pairs("train"), make_demo_pairs("test")
    assert len(train) == 480 and len(test) == 60
    topics = lambda rows: {r["rejected"] for r in rows}  # noqa: E731
    assert not topics(train) & topics(test)
    assert make_demo_pairs("train") == train  # deterministic
    assert torch.tensor([len(r["chosen"]) for r in train]).float().mean() > 40


def test_hub_dataset_arguments_are_passed_through(monkeypatch):
    import datasets
    seen = {}

    def fake_load_dataset(name, config=None, data_dir=None, split=None):
        seen.update(name=name, config=config, data_dir=data_dir, split=split)
        return datasets.Dataset.from_list(ROWS)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    import data
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: True)  # as with a network
    assert load_rows("Anthropic/hh-rlhf", "test", None, "harmless-base") == ROWS
    assert seen == dict(name="Anthropic/hh-rlhf", config=None, data_dir="harmless-base", split="test")


def test_string_prompt_beside_whole_conversations_keeps_their_history():
    """A string prompt beside conversational chosen/rejected that carry the whole conversation: the
    shared history of the conversations is the prompt (TRL 1.16's maybe_extract_prompt does the same
    and ignores the prompt column), not just the string and the last messages."""
    from data import normalize_row
    history = [{"role": "user", "content": "What is snow?"}, {"role": "assistant", "content": "Frozen rain, roughly."},
               {"role": "user", "content": "And in winter?"}]
    row = dict(prompt="And in winter?", chosen=history + [{"role": "assistant", "content": "It falls more."}],
               rejected=history + [{"role": "assistant", "content": "No idea."}])
    assert normalize_row(row) == (history, "It falls more.", "No idea.")
    # single-message responses beside a string prompt: as before
    one = dict(prompt="Hi", chosen=[{"role": "assistant", "content": "Hello!"}], rejected=[{"role": "assistant", "content": "Go."}])
    assert normalize_row(one) == ("Hi", "Hello!", "Go.")
    # conversations that do not share their history are skipped and counted, not silently cut
    bad = dict(row, rejected=[{"role": "user", "content": "Other"}, {"role": "assistant", "content": "No idea."}])
    with pytest.raises(BadRow, match="no_shared_prompt"):
        normalize_row(bad)
