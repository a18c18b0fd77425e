"""Data: row validation with counted skips, loss masks on completions, clear errors."""
import json

import pytest

from fastmath.data import DataReport, Formatter, load_documents
from fastmath.errors import DataError


def _write_jsonl(path, lines):
    with open(path, "wb") as handle:
        for line in lines:
            handle.write(line if isinstance(line, bytes) else json.dumps(line).encode())
            handle.write(b"\n")


def test_bad_rows_are_counted_not_lost(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    _write_jsonl(path, [
        {"problem": "What is 2 + 3?", "solution": "<think> 2+3=5 </think> \\boxed{5}"},
        {"problem": "What is 1 + 1?"},                                   # missing field
        {"problem": "What is 4 + 4?", "solution": 8},                     # wrong type
        {"problem": "What is 5 + 5?", "solution": "   "},                 # empty
        b'{"problem": "\xff\xfe bad bytes", "solution": "x"}',           # not UTF-8
        b"{not json",                                                     # not JSON
        [1, 2],                                                           # not an object
        {"problem": "What is 6 + 1?", "solution": "<think> 6+1=7 </think> \\boxed{7}"},
    ])
    docs, report = load_documents(str(path), "train", Formatter(tokenizer))
    assert len(docs) == report.used == 2
    assert report.rows == 8
    assert report.skipped == {"missing field 'solution'": 1, "field 'solution' is not a string": 1,
                              "empty field 'solution'": 1, "not UTF-8": 1, "not valid JSON": 1,
                              "not a JSON object": 1}
    assert "2 of 8 rows used" in report.summary()
    assert "1 not UTF-8" in report.summary()


def test_zero_usable_rows_is_an_error(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    _write_jsonl(path, [{"question": "x", "answer": "y"}] * 3)
    with pytest.raises(DataError, match="no usable rows .* 3 missing field 'problem'"):
        load_documents(str(path), "train", Formatter(tokenizer))


def test_missing_file_is_an_error(tmp_path, tokenizer):
    with pytest.raises(DataError, match="data file not found"):
        load_documents(str(tmp_path / "none.jsonl"), "train", Formatter(tokenizer))


def test_loss_mask_covers_exactly_the_completion(tokenizer):
    formatter = Formatter(tokenizer)
    row = {"problem": "What is 12 + 30?", "solution": "<think> 2+0=2 ; 1+3=4 </think> \\boxed{42}"}
    doc = formatter.document(row, DataReport("t"))
    prompt = formatter.prompt_ids(row["problem"])
    completion = tokenizer(row["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert doc.input_ids == prompt + completion
    assert doc.loss_mask == [False] * len(prompt) + [True] * len(completion)
    assert tokenizer.decode(prompt).endswith("assistant\n")  # generation prompt is part of the prompt

    everything = Formatter(tokenizer, loss_on="all").document(row, DataReport("t"))
    assert all(everything.loss_mask)


def test_overlong_policy(tokenizer):
    row = {"problem": "What is 12 + 30?", "solution": "<think> " + "check ok ; " * 40 + "</think> \\boxed{42}"}
    report = DataReport("t")
    assert Formatter(tokenizer, max_length=40).document(row, report) is None
    assert report.skipped == {"longer than max_length": 1}
    report = DataReport("t")
    doc = Formatter(tokenizer, max_length=40, overlong="truncate").document(row, report)
    assert len(doc.input_ids) == 40 and report.truncated == 1
    # A prompt that alone fills max_length leaves nothing to learn: skipped with its reason.
    report = DataReport("t")
    assert Formatter(tokenizer, max_length=5, overlong="truncate").document(row, report) is None
    assert report.skipped == {"no completion tokens within max_length": 1}


def test_chat_messages_mask_every_assistant_turn(tokenizer):
    formatter = Formatter(tokenizer, messages_field="messages")
    messages = [{"role": "user", "content": "What is 1 + 2?"},
                {"role": "assistant", "content": "<think> 1+2=3 </think> \\boxed{3}"},
                {"role": "user", "content": "And 2 + 2?"},
                {"role": "assistant", "content": "<think> 2+2=4 </think> \\boxed{4}"}]
    doc = formatter.document({"messages": messages}, DataReport("t"))
    full = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert doc.input_ids == full
    learned = tokenizer.decode([t for t, m in zip(doc.input_ids, doc.loss_mask) if m])
    assert "\\boxed{3}" in learned and "\\boxed{4}" in learned
    assert "What is" not in learned and "And 2" not in learned
    report = DataReport("t")
    assert formatter.document({"messages": [{"role": "user", "content": "hi"}]}, report) is None
    assert formatter.document({"messages": "nope"}, report) is None
    assert sum(report.skipped.values()) == 2


def test_parquet_and_json_array_sources(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"problem": "What is 2 + 3?", "solution": "<think> 2+3=5 </think> \\boxed{5}"},
            {"problem": "What is 1 + 1?", "solution": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    docs, report = load_documents(str(tmp_path / "rows.parquet"), "train", Formatter(tokenizer))
    assert len(docs) == 1 and report.skipped == {"missing field 'solution'": 1}
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    docs, report = load_documents(str(tmp_path / "rows.json"), "train", Formatter(tokenizer))
    assert len(docs) == 1 and report.rows == 2


GOOD_CHAT = [{"role": "user", "content": "What is 1 + 2?"},
             {"role": "assistant", "content": "<think> 1+2=3 </think> \\boxed{3}"}]


@pytest.mark.parametrize("messages, reason", [
    ("nope", "field 'messages' is not a non-empty list of messages"),
    ([], "field 'messages' is not a non-empty list of messages"),
    (["hi", "there"], "a message in 'messages' is not an object with string 'role' and 'content'"),
    ([{"role": "user", "content": 3}], "a message in 'messages' is not an object with string 'role' and 'content'"),
    ([{"role": "user"}], "a message in 'messages' is not an object with string 'role' and 'content'"),
    ([GOOD_CHAT[0], {"role": "bot", "content": "3"}], "unknown role 'bot' in 'messages'"),
    ([GOOD_CHAT[0], {"role": "tool", "content": "3"}, GOOD_CHAT[1]], "unknown role 'tool' in 'messages'"),
    ([GOOD_CHAT[0], {"role": "system", "content": "be brief"}, GOOD_CHAT[1]], "a system message after the first"),
    ([GOOD_CHAT[0]], "no assistant message"),
    # The reported crash: a conversation that opens with the assistant ("Cannot apply chat template to an
    # empty conversation" from transformers, ending the run).
    ([GOOD_CHAT[1], GOOD_CHAT[0], GOOD_CHAT[1]], "no user message before the first assistant message"),
    ([{"role": "system", "content": "be brief"}, GOOD_CHAT[1]], "no user message before the first assistant"),
    ([GOOD_CHAT[0], {"role": "assistant", "content": "  "}], "an empty assistant message"),
    (GOOD_CHAT + [{"role": "user", "content": "thanks"}], "the last message is not the assistant's"),
])
def test_bad_conversations_are_counted_by_reason(tokenizer, messages, reason):
    formatter = Formatter(tokenizer, messages_field="messages")
    report = DataReport("t")
    assert formatter.document({"messages": messages}, report) is None
    [(got, count)] = report.skipped.items()
    assert got.startswith(reason) and count == 1


def test_one_bad_conversation_does_not_stop_the_others(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    _write_jsonl(path, [{"messages": GOOD_CHAT}, {"messages": [GOOD_CHAT[1], GOOD_CHAT[0]]},
                        {"messages": [GOOD_CHAT[0], {"role": "robot", "content": "3"}]}, {"messages": GOOD_CHAT}])
    docs, report = load_documents(str(path), "train", Formatter(tokenizer, messages_field="messages"))
    assert len(docs) == report.used == 2 and sum(report.skipped.values()) == 2, report.summary()


def test_a_row_the_chat_template_refuses_is_a_counted_skip(assets):
    # Gemma's template as TRL ships it: it raises on a system turn and on roles that do not alternate.
    from pathlib import Path

    import trl

    from fastmath.model import load_tokenizer

    tokenizer = load_tokenizer(str(assets.model_dir))
    tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" / "gemma.jinja").read_text()
    formatter = Formatter(tokenizer, messages_field="messages")
    report = DataReport("t")
    assert formatter.document({"messages": GOOD_CHAT}, report) is not None
    two_users = [GOOD_CHAT[0], {"role": "user", "content": "Quick!"}, GOOD_CHAT[1]]
    assert formatter.document({"messages": two_users}, report) is None
    assert formatter.document({"messages": [{"role": "system", "content": "x"}, *GOOD_CHAT]}, report) is None
    assert report.skipped == {
        "chat template refused the row: Conversation roles must alternate user/assistant/user/assistant/...": 1,
        "chat template refused the row: System role not supported": 1}
    # Where a single prompt is templated (GRPO, eval), the refusal is an error that names its cause.
    with pytest.raises(DataError, match="the chat template refused a conversation: System role not supported"):
        Formatter(tokenizer, system_prompt="be brief").prompt_ids("What is 1 + 2?")


def test_a_folder_or_an_unreadable_file_is_named(tmp_path, tokenizer, monkeypatch):
    folder = tmp_path / "train.jsonl"
    folder.mkdir()
    with pytest.raises(DataError, match=f"data source {folder} is a folder, not a data file"):
        load_documents(str(folder), "train", Formatter(tokenizer))
    path = tmp_path / "rows.jsonl"
    _write_jsonl(path, [{"problem": "p", "solution": "s"}])
    from fastmath import data

    def refuse(*args, **kwargs):  # the suite may run as root, which no file mode stops: refuse the open itself
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(data, "open", refuse, raising=False)
    with pytest.raises(DataError, match=f"data file {path} cannot be read: Permission denied"):
        load_documents(str(path), "train", Formatter(tokenizer))
