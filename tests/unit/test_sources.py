"""Hub models and `datasets` sources, offline: a tiny model in Hub cache layout, and dataset folders."""

import json

import pytest
import yaml
from datasets import Dataset, DatasetDict

from emloc_nb import EmlocError, Run, fingerprint, load_model, load_task, tiny_model
from emloc_nb.config import RunConfig
from emloc_nb.eval_settings import SETTINGS

from ..conftest import tiny_run_config, toy_rows

REPO_ID = "tiny-org/tiny-llama"
REVISION = "0123456789abcdef0123456789abcdef01234567"
TEMPLATE = "Review: {text}\nPositive or negative?"
ANSWER_MAP = {0: "negative", 1: "positive"}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A tiny llama saved as the Hugging Face cache holds a downloaded model; the Hub itself is unreachable."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    model, tok = tiny_model("llama")
    model.save_pretrained(repo / "snapshots" / REVISION)
    tok.save_pretrained(repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("EMLOC_ALLOW_DOWNLOAD", raising=False)
    return model


def labelled_rows(n: int = 80) -> list[dict]:
    """`text` plus an integer `label`, the shape of imdb or sst2."""
    return [{"text": r["prompt"], "label": int(r["answer"] == "yes")} for r in toy_rows(n)]


def test_a_hub_id_resolves_through_the_local_cache(hub_cache):
    model, tok = load_model(REPO_ID)
    assert fingerprint(model) == fingerprint(hub_cache)
    assert tok.chat_template


def test_a_hub_id_missing_from_the_cache_says_how_to_fetch_it(hub_cache, monkeypatch):
    with pytest.raises(EmlocError, match=r"huggingface-cli download other/model.*--allow-download") as e:
        load_model("other/model")
    assert "HF_HUB_OFFLINE is set" in str(e.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(EmlocError, match="downloads are off by default"):
        load_model("other/model")
    # Allowed but offline: still no download.
    monkeypatch.setenv("EMLOC_ALLOW_DOWNLOAD", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EmlocError, match="HF_HUB_OFFLINE is set"):
        load_model("other/model")


def test_a_saved_dataset_with_a_template_and_an_answer_map(tmp_path):
    rows = labelled_rows()
    DatasetDict({"train": Dataset.from_list(rows[:60]), "test": Dataset.from_list(rows[60:])}).save_to_disk(
        tmp_path / "saved"
    )
    task = load_task(f"hf:{tmp_path / 'saved'}", prompt_template=TEMPLATE, answer_map=ANSWER_MAP, answer_field="label")
    assert (len(task.train), len(task.validation), len(task.test)) == (54, 6, 20)  # validation carved from train
    assert task.choices == ["negative", "positive"]  # the map's answers, in its order
    first = task.test[0]  # the dataset's own test split, in its order
    assert first["messages"][0]["content"] == TEMPLATE.format(text=rows[60]["text"])
    assert first["answer"] == ANSWER_MAP[rows[60]["label"]]
    fmt = dict(prompt_template=TEMPLATE, answer_map=ANSWER_MAP, answer_field="label")
    one = load_task(f"hf:{tmp_path / 'saved'}", split="train", test_size=10, **fmt)
    assert (len(one.train), len(one.validation), len(one.test)) == (44, 6, 10)


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_parquet_and_csv_folders_load_through_datasets(tmp_path, kind):
    rows = labelled_rows(40)
    folder = tmp_path / kind
    folder.mkdir()
    for split, part in (("train", rows[:30]), ("test", rows[30:])):
        getattr(Dataset.from_list(part), f"to_{kind}")(str(folder / f"{split}.{kind}"))
    answers = {"0": "negative", "1": "positive"}
    task = load_task(f"hf:{folder}", prompt_template=TEMPLATE, answer_map=answers, answer_field="label")
    assert (len(task.train), len(task.validation), len(task.test)) == (27, 3, 10)
    assert set(task.test["answer"]) <= {"negative", "positive"}


def test_bad_templates_maps_and_splits_name_the_fix(tmp_path):
    Dataset.from_list(labelled_rows(10)).save_to_disk(tmp_path / "one")
    source = f"hf:{tmp_path / 'one'}"
    with pytest.raises(EmlocError, match=r"names \{review\}, but the columns are \['label', 'text'\]"):
        load_task(source, prompt_template="{review}", answer_map=ANSWER_MAP, answer_field="label")
    with pytest.raises(EmlocError, match="label = 1 is not a key of the answer_map"):
        load_task(source, prompt_template=TEMPLATE, answer_map={0: "negative"}, answer_field="label")
    with pytest.raises(EmlocError, match="single dataset with no splits"):
        load_task(source, split="train", prompt_template=TEMPLATE, answer_map=ANSWER_MAP, answer_field="label")
    DatasetDict({"train": Dataset.from_list(labelled_rows(10))}).save_to_disk(tmp_path / "dict")
    with pytest.raises(EmlocError, match=r"has the splits \['train'\], not 'validation'"):
        load_task(
            f"hf:{tmp_path / 'dict'}",
            split="validation",
            prompt_template=TEMPLATE,
            answer_map=ANSWER_MAP,
            answer_field="label",
        )


def test_a_hub_dataset_missing_from_the_cache_is_not_downloaded(monkeypatch):
    monkeypatch.delenv("EMLOC_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(EmlocError, match=r"huggingface-cli download --repo-type dataset no-org/no-such-set"):
        load_task("hf:no-org/no-such-set")


def test_yaml_int_keys_and_run_json_string_keys_are_one_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task:\n  source: hf:x\n  answer_map: {0: negative, 1: positive}\n")
    config = RunConfig.load(path)
    assert config.task.answer_map == {"0": "negative", "1": "positive"}
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))).to_dict() == config.to_dict()
    with pytest.raises(EmlocError, match="answer_map"):
        RunConfig.from_dict(yaml.safe_load("task: {answer_map: [negative, positive]}"))


def test_fine_tune_a_hub_cache_model_on_a_datasets_folder(hub_cache, tmp_path):
    """The whole pipeline, offline: a Hub id from the cache, and a save_to_disk folder with a template and a map."""
    rows = labelled_rows()
    Dataset.from_list(rows).save_to_disk(tmp_path / "reviews")
    config = tiny_run_config(
        REPO_ID,
        "unused",
        task={
            "source": f"hf:{tmp_path / 'reviews'}",
            "prompt_template": TEMPLATE,
            "answer_field": "label",
            "answer_map": ANSWER_MAP,
            "test_size": 0.25,
        },
        baseline=False,
    )
    run = Run(tmp_path / "run", config)
    run.run_all(isolate=False)
    assert [r["setting"] for r in run.results()] == [s for s in SETTINGS if s != "original+lora"]
    assert run.task().choices == ["negative", "positive"]
    assert run.task().train[0]["messages"][0]["content"].startswith("Review: The film was")
    history = run.history("emulator")
    assert len(history) == config.train.steps and all(h["loss"] > 0 for h in history)
    assert set(run.eval_result("original+corrected").predictions) <= {"negative", "positive"}
    assert Run(tmp_path / "run").config.task.answer_map == {"0": "negative", "1": "positive"}  # read back
