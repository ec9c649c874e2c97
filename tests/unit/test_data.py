import json

import pytest
from datasets import Dataset, DatasetDict

from emloc_nb import EmlocError, load_task
from emloc_nb.builtin_tasks import movie_sentiment
from emloc_nb.tasks import three_way_split
from emloc_nb.tiny import tiny_tokenizer
from emloc_nb.tokens import IGNORE_INDEX, collator_for, encode_example


def test_jsonl_csv_and_messages(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": "a" if i % 2 else "b"} for i in range(10)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,answer\n" + "\n".join(f"{r['prompt']},{r['answer']}" for r in rows))
    chats = tmp_path / "c.jsonl"
    chats.write_text(
        "\n".join(
            json.dumps(
                {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}]}
            )
            for r in rows
        )
    )
    for path in (jsonl, csv, chats):
        task = load_task(path, test_size=0.2)
        assert (len(task.train), len(task.validation), len(task.test)) == (7, 1, 2)
        assert task.choices == ["a", "b"]
        assert task.train[0]["messages"][-1]["role"] == "user"


def test_missing_fields_name_the_problem(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps({"question": q, "answer": "y"}) for q in "xzv"))
    with pytest.raises(EmlocError, match=r"missing field\(s\) \['prompt'\].*prompt_field"):
        load_task(path)
    task = load_task(path, prompt_field="question", test_size=1)
    assert task.train[0]["messages"][0]["content"] in ("x", "z", "v")


def test_answers_outside_the_choices_are_refused():
    data = Dataset.from_list([{"prompt": f"p{i}", "answer": "yes" if i % 3 else "maybe"} for i in range(9)])
    with pytest.raises(EmlocError, match=r"Answers \['maybe'\] are not among the choices \['no', 'yes'\]"):
        load_task(data, choices=["no", "yes"])
    assert load_task(data, choices=[]).choices is None  # exact match instead


def test_dataset_dict_keeps_its_splits():
    d = DatasetDict(
        {
            "train": Dataset.from_list([{"prompt": "p", "answer": "a"}] * 3),
            "test": Dataset.from_list([{"prompt": "q", "answer": "b"}] * 2),
        }
    )
    task = load_task(d)
    assert (len(task.train), len(task.validation), len(task.test)) == (2, 1, 2)  # validation carved from train
    d["validation"] = Dataset.from_list([{"prompt": "v", "answer": "a"}] * 4)
    task = load_task(d)
    assert (len(task.train), len(task.validation), len(task.test)) == (3, 4, 2)


def test_three_way_split_is_disjoint_fixed_and_refuses_too_few_examples():
    data = Dataset.from_list([{"i": i} for i in range(50)])
    train, validation, test = three_way_split(data, test_size=10, validation_size=0.1, seed=3)
    parts = [set(x["i"]) for x in (train, validation, test)]
    assert [len(p) for p in parts] == [35, 5, 10] and set.union(*parts) == set(range(50))
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    again = three_way_split(data, test_size=10, validation_size=0.1, seed=3)
    assert [set(x["i"]) for x in again] == parts
    with pytest.raises(EmlocError, match="cannot give 30 test and 25 validation"):
        three_way_split(data, test_size=30, validation_size=25, seed=0)


def test_labels_mask_the_prompt_and_padding_is_left():
    tok = tiny_tokenizer()
    enc = encode_example(tok, [{"role": "user", "content": "hello"}], "yes")
    answer = [t for t, label in zip(enc["input_ids"], enc["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(answer).startswith("yes")
    prompt_len = enc["labels"].count(IGNORE_INDEX)
    assert tok.decode(enc["input_ids"][:prompt_len]).endswith("assistant\n")
    batch = collator_for(tok)([enc, encode_example(tok, [{"role": "user", "content": "hi"}], "no")])
    short = batch["attention_mask"][1]
    assert short[0] == 0 and short[-1] == 1  # left padding
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert batch["position_ids"][1][short.bool()].tolist() == list(range(int(short.sum())))


def test_movie_parser_on_a_small_file(tmp_path, monkeypatch):
    monkeypatch.setenv("EMLOC_CACHE", str(tmp_path))
    f = tmp_path / "data" / "movieReviewSnippets_GroundTruth.txt"
    f.parent.mkdir(parents=True)
    lines = [f"{i}\t{r}\tReview number {i}." for i, r in enumerate([2.0, -1.5, 0.2, -0.4, 3.1, -2.2] * 5)]
    f.write_text("\r\n".join(lines) + "\r\n")
    task = movie_sentiment(test_size=4, validation_size=3)
    assert (len(task.train), len(task.validation), len(task.test)) == (13, 3, 4)  # |rating| > 0.5 only
    assert set(task.train["answer"]) == {"positive", "negative"}
    again = movie_sentiment(test_size=4, validation_size=3)
    assert again.test["messages"] == task.test["messages"]  # fixed, seeded split


def test_analogy_parser_keeps_the_family_and_grammar_sections(tmp_path, monkeypatch):
    monkeypatch.setenv("EMLOC_CACHE", str(tmp_path))
    f = tmp_path / "data" / "questions-words.txt"
    f.parent.mkdir(parents=True)
    f.write_text(
        ": capital-common-countries\nAthens Greece Baghdad Iraq\n"
        ": family\nboy girl brother sister\nboy girl dad mom\n"
        ": gram3-comparative\nbad worse big bigger\nbad worse cheap cheaper\ngood better high higher\n"
        "broken line\n"
    )
    task = load_task("word-analogies", test_size=1, validation_size=1)
    rows = [*task.train, *task.validation, *task.test]
    assert len(rows) == 5 and task.choices is None  # the capital and the malformed line are left out
    by_answer = {r["answer"]: r for r in rows}
    assert set(by_answer) == {"sister", "mom", "bigger", "cheaper", "higher"}
    assert by_answer["bigger"]["messages"][0]["content"].endswith("bad is to worse as big is to")
    assert by_answer["mom"]["section"] == "family"
