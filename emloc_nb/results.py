"""The results table of a run: accuracy, loss and memory per evaluated setting, as JSON and markdown."""

from __future__ import annotations

import hashlib
import json

from .atomic import atomic_path
from .eval_settings import SETTINGS, TRAINED_BY, settings
from .layout import record_name
from .serial import read_json_object, write_json


def write_results(run, inputs: dict[str, str]) -> None:
    """The results table (json and markdown): accuracy, loss and memory per setting.

    `inputs` (each evaluation's manifest digest) and the run's config tie the table to what produced it.
    """
    records = run.stage_records()
    rows = []
    for setting in settings(run.config):
        ev, s = run.eval_result(setting), SETTINGS[setting]
        train = records.get(TRAINED_BY.get(s.adapter), {})
        rows.append(
            {
                "setting": setting,
                "description": s.description,
                **ev.summary(),
                "eval_peak_mb": records.get(record_name(f"evaluate:{setting}"), {}).get("peak_rss_mb"),
                "train_peak_mb": train.get("peak_rss_mb"),
                "train_weights_mb": train.get("weights_mb"),
            }
        )
    table = {"kind": "results", "config": run.config.to_dict(), "inputs": inputs, "rows": rows}
    write_json(run.path("results"), {**table, "rows_sha256": rows_digest(rows)})
    with atomic_path(run.path("results_markdown")) as tmp:
        tmp.write_text(results_markdown(rows))


def rows_digest(rows: list) -> str:
    """The SHA-256 of a results table's rows, as JSON with sorted keys: a row changed after writing is noticed."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def read_results(run) -> dict:
    """The results table as stored ({"config", "inputs", "rows"}); emloc_nb.stages checks that it is the run's."""
    return read_json_object(run.path("results"), {"rows": list})


def results_markdown(rows: list[dict]) -> str:
    """The results table; for a choice task also the bias-free views (AUC, balanced accuracy, predictions)."""

    def fmt(v, spec):
        return "–" if v is None else format(v, spec)

    def predicted(counts):
        return "–" if not counts else " / ".join(str(n) for n in counts.values())

    choice_task = any(r.get("auc") is not None for r in rows)
    extra = " AUC | balanced accuracy | predicted " + " / ".join(rows[0]["predicted"]) + " |" if choice_task else ""
    lines = [
        "| setting | accuracy | answer loss |" + extra + " examples | fine-tuning peak (MB) | eval peak (MB) |",
        "|---|---|---|" + ("---|---|---|" if choice_task else "") + "---|---|---|",
    ]
    for r in rows:
        views = (
            f" {fmt(r['auc'], '.3f')} | {fmt(r['balanced_accuracy'], '.3f')} | {predicted(r['predicted'])} |"
            if choice_task
            else ""
        )
        lines.append(
            f"| {r['description']} | {r['accuracy']:.3f} | {r['answer_loss']:.3f} |{views} {r['examples']} | "
            f"{fmt(r['train_peak_mb'], '.0f')} | {fmt(r['eval_peak_mb'], '.0f')} |"
        )
    return "\n".join(lines) + "\n"
