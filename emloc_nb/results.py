"""The results table of a run: accuracy, loss and memory per evaluated setting, as JSON and markdown."""

from __future__ import annotations

from .atomic import atomic_path
from .eval_settings import SETTINGS, TRAINED_BY, settings
from .layout import record_name
from .serial import write_json


def write_results(run) -> None:
    """The results table (json and markdown): accuracy, loss and memory per setting."""
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
    write_json(run.path("results"), {"kind": "results", "config": run.config.to_dict(), "rows": rows})
    with atomic_path(run.path("results_markdown")) as tmp:
        tmp.write_text(results_markdown(rows))


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
