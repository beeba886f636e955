import json

import pytest

from tunelab.data.formats import (
    ChatExample,
    DataError,
    PreferenceExample,
    Record,
    TextExample,
    detect_format,
    load_records,
    to_example,
)


@pytest.mark.parametrize("rec,fmt", [
    ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
    ({"messages": [{"role": "user", "content": "a"}]}, "messages"),
    ({"conversations": [{"from": "human", "value": "a"}]}, "messages"),
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"text": "a"}, "text"),
    ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference"),
])
def test_detect_format(rec, fmt):
    assert detect_format(rec) == fmt


def test_detect_format_unknown_keys():
    with pytest.raises(DataError, match="cannot detect"):
        detect_format({"foo": 1})


def test_alpaca_with_input_history_and_system():
    rec = Record({"instruction": "Translate", "input": "chat", "output": "cat", "history": [["hi", "hello"]],
                  "system": "Be brief."}, "f.jsonl:3")
    ex = to_example(rec, "alpaca")
    assert isinstance(ex, ChatExample)
    assert ex.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Translate\n\nchat"}, {"role": "assistant", "content": "cat"},
    ]


def test_sharegpt_roles_are_mapped():
    rec = Record({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                    {"from": "gpt", "value": "a"}]}, "x")
    assert [m["role"] for m in to_example(rec, "messages").messages] == ["system", "user", "assistant"]


def test_messages_without_assistant_is_an_error():
    rec = Record({"messages": [{"role": "user", "content": "q"}]}, "f.jsonl:7")
    with pytest.raises(DataError, match=r"f.jsonl:7.*no assistant message"):
        to_example(rec, "messages")


def test_missing_field_names_origin_and_field():
    with pytest.raises(DataError, match=r"f.jsonl:2: missing field 'output'"):
        to_example(Record({"instruction": "a"}, "f.jsonl:2"), "alpaca")


def test_wrong_type_names_field():
    with pytest.raises(DataError, match=r"field 'completion' must be str"):
        to_example(Record({"prompt": "a", "completion": 3}, "o"), "prompt_completion")


def test_preference_plain_strings_and_identical_pair():
    ex = to_example(Record({"prompt": "q", "chosen": "good", "rejected": "bad"}, "o"), "preference")
    assert isinstance(ex, PreferenceExample)
    assert ex.prompt == [{"role": "user", "content": "q"}]
    assert ex.chosen == [{"role": "assistant", "content": "good"}]
    with pytest.raises(DataError, match="identical"):
        to_example(Record({"prompt": "q", "chosen": "x", "rejected": "x"}, "o"), "preference")


def test_text_example():
    assert to_example(Record({"text": "hello"}, "o"), "text") == TextExample("hello", "o")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "a"}) + "\n\n" + '{"text": "b"\n')
    with pytest.raises(DataError, match=rf"{p}:3: malformed JSON"):
        load_records(str(p))


def test_jsonl_origins_are_line_numbers(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    recs = load_records(str(p))
    assert [r.origin for r in recs] == [f"{p}:1", f"{p}:3"]
    assert [r.data["text"] for r in recs] == ["a", "b"]


def test_parquet_and_csv_load_through_datasets(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    for name in ("d.parquet", "d.csv"):
        recs = load_records(str(tmp_path / name), n=1)
        assert len(recs) == 1 and recs[0].data == {"prompt": "p1", "completion": "c1"}


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_records(str(tmp_path / "nope.jsonl"))


def test_preference_answer_of_wrong_type_is_a_data_error():
    with pytest.raises(DataError, match=r"o: field 'chosen' must be str or list, got int"):
        to_example(Record({"prompt": "q", "chosen": 5, "rejected": "x"}, "o"), "preference")


def test_loss_weights_column():
    from tunelab.data.formats import ChatExample, Record, to_example

    ex = to_example(Record({"prompt": "p", "completion": "c", "loss_weights": [1, 0.5]}, "f.jsonl:1"),
                    "prompt_completion")
    assert isinstance(ex, ChatExample) and ex.loss_weights == [1.0, 0.5]
    assert to_example(Record({"text": "t", "loss_weights": 2}, "f.jsonl:2"), "text").loss_weights == 2.0
    for bad in ("x", [], [1, -1], True):
        with pytest.raises(DataError, match=r"f\.jsonl:3: field 'loss_weights' must be"):
            to_example(Record({"prompt": "p", "completion": "c", "loss_weights": bad}, "f.jsonl:3"),
                       "prompt_completion")
    with pytest.raises(DataError, match=r"f\.jsonl:4: field 'loss_weights' is for SFT data"):
        to_example(Record({"prompt": "p", "chosen": "a", "rejected": "b", "loss_weights": 1}, "f.jsonl:4"),
                   "preference")
