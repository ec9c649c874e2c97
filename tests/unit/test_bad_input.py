"""The bad-input matrix: every CLI subcommand and public API entry point, fed what a hostile or careless user would.

Each case asserts the same four things:
- the command exits with 1 (the CLI) or raises EmlocError (the API), never another exception;
- the message is one line that names the problem (the case's pattern) and a fix (an imperative sentence);
- no traceback is printed;
- no file under the case's directory changed (a run's lock file aside), so nothing was lost or half written.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

import emloc_nb
from emloc_nb import EmlocError, RunConfig
from emloc_nb.artifacts import MANIFEST, write_manifest
from emloc_nb.cli import main as cli
from emloc_nb.errors import MAX_MESSAGE
from emloc_nb.provenance import provenance
from emloc_nb.run import Run

from ..conftest import tiny_run_config

# A fix is an imperative at the start of a sentence or clause: "Use ...", "...: use ...", "(--overwrite) to ...".
FIX = re.compile(
    r"(?:^|[.:;!?]\s+|\(|\bor\s+)(Use|Pass|Change|Fix|Give|Set|Remove|Rename|Delete|Recreate|Rebuild|Retrain|Choose|Move|Wait|Write|Save|"
    r"Quote|Add|Leave|Load|Point|Check|Lower|Reload|List|Start|Open|Convert|Rerun|Train|Build|Run|Drop|Raise|"
    r"Keep|Retry|Empty|Calibrate|Reopen|Install|Label)\b",
    re.IGNORECASE,
)


@dataclass
class Env:
    """What a case builds on: a scratch directory, the tiny model and task, and finished runs to copy."""

    tmp: Path
    model: Path
    data: Path
    complete_run: Path  # every stage done, ratio 0.5
    run_09: Path  # calibrated and emulated at ratio 0.9

    def copy_run(self, name: str = "run", source: Path | None = None) -> Path:
        target = self.tmp / name
        shutil.copytree(source or self.complete_run, target, ignore=shutil.ignore_patterns(".lock"))
        return target

    def config(self, **overrides) -> dict:
        return tiny_run_config(self.model, self.data, **overrides).to_dict()

    def yaml(self, d, name: str = "c.yaml") -> Path:
        path = self.tmp / name
        path.write_text(yaml.safe_dump(d) if not isinstance(d, str) else d)
        return path


@dataclass
class Case:
    id: str
    problem: str  # a pattern the message must match: the problem, named
    cli: Callable[[Env], list[str]] | None = None  # argv for `emloc`
    api: Callable[[Env], Callable[[], object]] | None = None  # a call that must raise EmlocError
    family: str = ""  # the kind of failure it guards against (docs/guarantees.md counts them)


CASES: list[Case] = []
FAMILY = ["bad input (before issue 30)"]  # the family of the cases defined from here on (`family`)


def family(name: str) -> None:
    FAMILY[0] = name


def case(id, problem, *, cli=None, api=None, family=None):
    CASES.append(Case(id, problem, cli, api, family or FAMILY[0]))


def _set(d: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = d
    for p in parents:
        node = node[p]
    node[last] = value
    return d


# ----------------------------------------------------------------------------- config values

BAD_VALUES = [  # (setting, value, pattern)
    ("train.steps", 0, r"train\.steps=0 must be ≥ 1"),
    ("train.steps", -3, r"train\.steps=-3 must be ≥ 1"),
    ("train.steps", 2.5, r"train\.steps must be a whole number, not float"),
    ("train.steps", "10", r"train\.steps must be a whole number, not str"),
    ("train.steps", True, r"train\.steps must be a whole number, not a boolean"),
    ("train.steps", None, r"train\.steps is empty"),
    ("train.batch_size", 0, r"train\.batch_size=0 must be ≥ 1"),
    ("train.lr", math.nan, r"train\.lr=nan is not a finite number"),
    ("train.lr", -1e-3, r"train\.lr=-0\.001 must be > 0"),
    ("train.lr", 0.0, r"train\.lr=0\.0 must be > 0"),
    ("train.lr", math.inf, r"train\.lr=inf is not a finite number"),
    ("train.lr", "1e-3", r"train\.lr must be a number, not str.*write 1\.0e-3"),
    ("train.lr", 1e9, r"train\.lr=1000000000\.0 must be ≤ 10"),
    ("train.lr", "nan", r"train\.lr must be a number, not str"),
    ("train.max_length", -5, r"train\.max_length=-5 must be ≥ 1"),
    ("train.warmup_steps", -5, r"train\.warmup_steps=-5 must be ≥ 0"),
    ("train.weight_decay", -0.1, r"train\.weight_decay=-0\.1 must be ≥ 0"),
    ("train.weight_decay", math.nan, r"train\.weight_decay=nan is not a finite"),
    ("train.seed", 1, r"Unknown setting\(s\) \['seed'\] in train"),  # the run's seed is top-level
    ("seed", 2**40, r"seed=1099511627776 must be ≤"),
    ("train.micro_batch_size", 3, r"train\.micro_batch_size=3 must divide train\.batch_size=8"),
    ("train.micro_batch_size", 0, r"train\.micro_batch_size=0 must be ≥ 1"),
    ("train.micro_batch_size", 2.0, r"train\.micro_batch_size must be a whole number, not float"),
    ("train.frozen_dtype", "float16", r"train\.frozen_dtype='float16' is not a supported dtype"),
    ("train.frozen_dtype", 16, r"train\.frozen_dtype must be a string, not int"),
    ("train.checkpoint_every", -1, r"train\.checkpoint_every=-1 must be ≥ 0"),
    ("train.gradient_checkpointing", "false", r"train\.gradient_checkpointing must be true or false, not str"),
    ("train.gradient_checkpointing", 1, r"train\.gradient_checkpointing must be true or false, not int"),
    ("calibration.examples", 0, r"calibration\.examples=0 must be ≥ 1"),
    ("calibration.heldout_examples", 0, r"calibration\.heldout_examples=0 must be ≥ 1"),
    ("calibration.batch_size", 0, r"calibration\.batch_size=0 must be ≥ 1"),
    ("calibration.max_length", 0, r"calibration\.max_length=0 must be ≥ 1"),
    ("evaluation.limit", 0, r"evaluation\.limit=0 must be ≥ 1"),
    ("evaluation.batch_size", 0, r"evaluation\.batch_size=0 must be ≥ 1"),
    ("evaluation.split", "train", r"evaluation\.split='train' is not one of \['validation', 'test'\]"),
    ("evaluation.split", None, r"evaluation\.split is empty"),
    ("baseline", "no", r"baseline must be true or false, not str"),
    ("baseline", 0, r"baseline must be true or false, not int"),
    ("baseline", None, r"baseline is empty"),
    ("lora.r", 2.5, r"lora\.r must be a whole number, not float"),
    ("lora.r", 0, r"lora\.r=0 must be ≥ 1"),
    ("lora.alpha", 0, r"lora\.alpha=0 must be > 0"),
    ("lora.alpha", math.nan, r"lora\.alpha=nan is not a finite"),
    ("lora.dropout", 1.0, r"lora\.dropout=1\.0 must be < 1"),
    ("lora.dropout", -0.1, r"lora\.dropout=-0\.1 must be ≥ 0"),
    ("lora.targets", "(", r"lora\.targets='\(' is not a valid regular expression"),
    ("lora.targets", [], r"lora\.targets is empty"),
    ("lora.targets", [""], r"lora\.targets=\[''\] holds an empty entry"),
    ("lora.targets", 5, r"lora\.targets must be a list of strings or a string, not int"),
    ("lora.rslora", "yes", r"lora\.rslora must be true or false, not str"),
    ("lora.init", "svd", r"lora\.init='svd' is not one of \['random', 'eigen'\]"),
    ("lora.init", None, r"lora\.init is empty"),
    ("emulator.mode", "svd", r"emulator\.mode='svd' is not one of \['whitened', 'plain'\]"),
    ("emulator.eps", 0, r"emulator\.eps=0 must be > 0"),
    ("emulator.eps", math.nan, r"emulator\.eps=nan is not a finite"),
    ("emulator.shrinkage", -0.5, r"emulator\.shrinkage=-0\.5 must be ≥ 0"),
    ("emulator.shrinkage", math.inf, r"emulator\.shrinkage=inf is not a finite"),
    ("emulator.shrinkage", "0.1", r"emulator\.shrinkage must be a number, not str"),
    ("emulator.streaming", "no", r"emulator\.streaming must be true or false, not str"),
    ("emulator.plan", {"ratio": 1.5}, r"ρ=1\.5 is outside \(0, 1\]"),
    ("emulator.plan", {"ratio": True}, r"ρ=True is outside \(0, 1\]"),
    ("emulator.plan", {"ratio": math.nan}, r"ρ=nan is outside \(0, 1\]"),
    ("emulator.plan", {"ratio": 0.5, "rules": {"(": 0.5}}, r"Rule '\(' is not a valid regular expression"),
    ("emulator.plan", {"ratio": 0.5, "ranks": {"x": 0}}, r"Rank 0 for x must be a positive integer"),
    ("emulator.plan", {"ratio": 0.5, "rules": None}, r"RankPlan\.rules must map"),
    ("emulator.plan", {"ratio": 0.5, "foo": 1}, r"Unknown plan field\(s\) \['foo'\]"),
    ("emulator.plan", 5, r"emulator\.plan must be a mapping or a string, not int"),
    ("emulator.plan", "no-such-plan.json", r"no-such-plan\.json does not exist"),
    ("clamp", 3.0, r"Unknown setting\(s\) \['clamp'\] in the run config"),  # now correction.clamp
    ("correction.clamp", math.nan, r"correction\.clamp=nan is not a finite number"),
    ("correction.clamp", -1, r"correction\.clamp=-1 must be ≥ 0"),
    ("correction.clamp", "abc", r"correction\.clamp must be a number, not str"),
    ("correction.clamp", "nan", r"correction\.clamp must be a number, not str"),
    ("correction.clamp", True, r"correction\.clamp must be a number, not a boolean"),
    ("correction.kappa", "ls", r"correction\.kappa='ls' is not one of \['clamp', 'lstsq'\]"),
    ("correction.prior", "yes", r"correction\.prior must be true or false, not str"),
    ("correction", 3.0, r"correction must be a mapping of \[.*\], not float"),
    ("task.choices", "no yes", r"task\.choices must be a list of strings, not str"),
    ("task.choices", ["a", "a"], r"task\.choices=\['a', 'a'\] lists a value twice"),
    ("task.choices", [1, 2], r"task\.choices must be a list of strings, not list"),
    ("task.test_size", 0, r"task\.test_size=0 is a count of test examples and must be ≥ 1"),
    ("task.test_size", 1.5, r"task\.test_size=1\.5 is a share of the examples and must lie in \(0, 1\)"),
    ("task.test_size", True, r"task\.test_size must be a number or a whole number, not a boolean"),
    ("task.validation_size", 0, r"task\.validation_size=0 is a count of validation examples and must be ≥ 1"),
    ("task.validation_size", 1.0, r"task\.validation_size=1\.0 is a share of the examples and must lie in"),
    ("task.split_seed", -1, r"task\.split_seed=-1 must be ≥ 0"),
    ("task.split_seed", "0", r"task\.split_seed must be a whole number, not str"),
    ("task.split", "", r"task\.split is empty"),
    ("task.prompt_template", 5, r"task\.prompt_template must be a string, not int"),
    ("task.answer_map", {}, r"task\.answer_map=\{\} must be a mapping of label value -> answer text"),
    ("task.answer_map", "0: no", r"task\.answer_map must be a mapping, not str"),
    ("task.source", "", r"task\.source is empty"),
    ("task.source", 5, r"task\.source must be a string, not int"),
    ("task.prompt_field", "", r"task\.prompt_field is empty"),
    ("model", "", r"model is empty"),
    ("model", 5, r"model must be a string, not int"),
    ("seed", -1, r"seed=-1 must be ≥ 0"),
    ("seed", 1.5, r"seed must be a whole number, not float"),
    ("device", "gpu", r"device='gpu': use 'cpu', 'cuda', 'cuda:N' or 'auto'"),
    ("device", "cpu:0", r"device='cpu:0': use 'cpu', 'cuda', 'cuda:N' or 'auto'"),
    ("device", 0, r"device must be a string, not int"),
    ("dtype", "float16", r"dtype='float16' is not a supported dtype\. Use one of float32, bfloat16"),
    ("dtype", None, r"dtype is empty"),
    ("trust_remote_code", True, r"trust_remote_code is never read from a config"),
    ("trust_remote_code", "false", r"trust_remote_code is never read from a config"),
    ("trian", {"steps": 1}, r"Unknown setting\(s\) \['trian'\] in the run config"),
    ("lora.rank", 4, r"Unknown setting\(s\) \['rank'\] in lora"),
    ("train", 5, r"train must be a mapping of \[.*\], not int"),
    ("train", [1], r"train must be a mapping of \[.*\], not list"),
]

for setting, value, pattern in BAD_VALUES:
    name = f"{setting}={value!r}"

    def config_dict(env, setting=setting, value=value):
        return _set(env.config(), setting, value)

    case(f"api-from_dict-{name}", pattern, api=lambda env, d=config_dict: lambda: RunConfig.from_dict(d(env)))
    case(
        f"cli-run-{name}",
        pattern,
        cli=lambda env, d=config_dict: ["run", str(env.yaml(d(env))), "--run-dir", str(env.tmp / "out")],
    )

# --set and the flags that stand for settings: checked as the config file's values are

BAD_SETTINGS = [  # (extra argv, pattern)
    (["--set", "train.stepz=3"], r"Unknown setting 'train\.stepz'"),
    (["--set", "clamp=3"], r"Unknown setting 'clamp'"),  # correction.clamp since the CorrectionSpec
    (["--set", "correction.clamp=-1"], r"correction\.clamp=-1 must be ≥ 0"),
    (["--set", "correction.kappa=ls"], r"correction\.kappa='ls' is not one of"),
    (["--set", "train.micro_batch_size=3"], r"train\.micro_batch_size=3 must divide train\.batch_size=8"),
    (["--set", "lora.init=svd"], r"lora\.init='svd' is not one of"),
    (["--set", "train.steps.x=1"], r"train\.steps takes no nested key 'x'"),
    (["--set", "train.steps"], r"--set 'train\.steps': write KEY=VALUE"),
    (["--set", "train.steps=[1"], r"the value is not valid YAML"),
    (["--device", "gpu"], r"device='gpu': use 'cpu', 'cuda', 'cuda:N' or 'auto'"),
]
for extra, pattern in BAD_SETTINGS:
    case(
        f"cli-run-{' '.join(extra)}",
        pattern,
        cli=lambda env, extra=extra: ["run", str(env.yaml(env.config())), "--run-dir", str(env.tmp / "o"), *extra],
    )

# ----------------------------------------------------------------------------- config files

BAD_FILES = [  # (file name, content (bytes or text), pattern)
    ("empty.yaml", "", r"empty\.yaml is empty"),
    ("comments.yaml", "# nothing set\n", r"comments\.yaml is empty"),
    ("list.yaml", "- 1\n- 2\n", r"A run config must be a mapping of settings, not list"),
    ("scalar.yaml", "42\n", r"A run config must be a mapping of settings, not int"),
    ("syntax.yaml", "train:\n  steps: [1\n", r"syntax\.yaml is not valid YAML .* at line \d"),
    ("latin1.yaml", "model: caf\xe9\n".encode("latin-1"), r"latin1\.yaml is not UTF-8 text"),
    ("bad.json", '{"train": {"steps": 3,}}', r"bad\.json is not valid JSON \(.*at line 1\)"),
    ("array.json", "[1, 2]", r"A run config must be a mapping of settings, not list"),
    ("nan.json", '{"correction": {"clamp": NaN}}', r"correction\.clamp=nan is not a finite number"),
]
for filename, content, pattern in BAD_FILES:

    def write(env, filename=filename, content=content):
        path = env.tmp / filename
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    case(f"api-load-{filename}", pattern, api=lambda env, w=write: (lambda p: lambda: RunConfig.load(p))(w(env)))
    case(f"cli-run-{filename}", pattern, cli=lambda env, w=write: ["run", str(w(env)), "--run-dir", str(env.tmp / "o")])

case(
    "api-load-missing",
    r"Config file .*missing\.yaml does not exist",
    api=lambda env: lambda: RunConfig.load(env.tmp / "missing.yaml"),
)
case(
    "cli-run-missing",
    r"Config file .*missing\.yaml does not exist",
    cli=lambda env: ["run", str(env.tmp / "missing.yaml"), "--run-dir", str(env.tmp / "o")],
)
case(
    "cli-build-config-dir",
    r"Config file .* is a directory, not a file",
    cli=lambda env: ["build-emulator", "--config", str(env.tmp), "--run-dir", str(env.tmp / "o")],
)

# ----------------------------------------------------------------------------- data files

STRAY_QUOTE = {3: '"'}
BAD_DATA = [  # (file name, content, pattern)
    (
        "stray.csv",  # a quote opened on row 4 and closed on row 39 swallows the 36 rows between into one prompt
        "prompt,answer\n"
        + "".join(
            STRAY_QUOTE.get(i, "") + f"The film was good {i}." + ('"' if i == 39 else "") + ",yes\n" for i in range(40)
        ),
        r"stray\.csv:5: a quoted field runs over \d+ line break\(s\) into what look like rows",
    ),
    ("unclosed.csv", 'prompt,answer\n"The film,yes\nok,no\n', r"unclosed\.csv:\d+ is not valid CSV"),
    ("fields.csv", "prompt,answer\na,yes,extra\nb,no\n", r"fields\.csv:2 has 3 fields, the header 2"),
    ("latin1.csv", "prompt,answer\ncaf\xe9,yes\nb,no\n".encode("latin-1"), r"latin1\.csv:2 is not UTF-8"),
    (
        "latin1.jsonl",
        b'{"prompt": "a", "answer": "yes"}\n{"prompt": "caf\xe9", "answer": "no"}\n',
        r"latin1\.jsonl:2 is not UTF-8",
    ),
    ("array.jsonl", '{"prompt": "a", "answer": "yes"}\n[1, 2]\n', r"array\.jsonl:2 is a JSON list, not an object"),
    ("null.jsonl", '{"prompt": "a", "answer": "yes"}\nnull\n', r"null\.jsonl:2 is a JSON NoneType, not an object"),
    ("broken.jsonl", '{"prompt": "a", "answer": "yes"}\n{"prompt": \n', r"broken\.jsonl:2 is not valid JSON"),
    (
        "messages-str.jsonl",
        '{"messages": "hi"}\n{"messages": "yo"}\n',
        r"messages-str\.jsonl:1: 'messages' must be a list",
    ),
    (
        "messages-turn.jsonl",
        '{"messages": [1, {"role": "assistant", "content": "yes"}]}\n' * 2,
        r"messages-turn\.jsonl:1: turn '1' is malformed",
    ),
    (
        "messages-last.jsonl",
        '{"messages": [{"role": "user", "content": "a"}]}\n' * 2,
        r"messages-last\.jsonl:1: the last turn is 'user', not 'assistant'",
    ),
    (
        "messages-alone.jsonl",
        '{"messages": [{"role": "assistant", "content": "yes"}]}\n' * 2,
        r"messages-alone\.jsonl:1: there is no prompt before the assistant's answer",
    ),
    (
        "missing-field.jsonl",
        '{"text": "a", "answer": "yes"}\n' * 2,
        r"missing-field\.jsonl:1: missing field\(s\) \['prompt'\]",
    ),
    ("list-prompt.jsonl", '{"prompt": ["a"], "answer": "yes"}\n' * 2, r"list-prompt\.jsonl:1: field 'prompt' is list"),
    ("one.jsonl", '{"prompt": "a", "answer": "yes"}\n', r"one has 1 example\(s\); a task needs at least 3"),
    ("data.txt", "prompt,answer\na,yes\n", r"data\.txt is neither \.jsonl nor \.csv"),
]
for filename, content, pattern in BAD_DATA:

    def write(env, filename=filename, content=content):
        path = env.tmp / "data" / filename
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    case(
        f"api-load_task-{filename}", pattern, api=lambda env, w=write: (lambda p: lambda: emloc_nb.load_task(p))(w(env))
    )
    case(
        f"cli-build-{filename}",
        pattern,
        cli=lambda env, w=write: [
            "build-emulator",
            "--model",
            str(env.model),
            "--data",
            str(w(env)),
            "--run-dir",
            str(env.tmp / "o"),
        ],
    )

case(
    "api-load_task-missing",
    r"Data file .*nope\.jsonl does not exist",
    api=lambda env: lambda: emloc_nb.load_task(env.tmp / "nope.jsonl"),
)
case(
    "cli-build-missing-data",
    r"Data file .*nope\.jsonl does not exist",
    cli=lambda env: [
        "build-emulator",
        "--model",
        str(env.model),
        "--data",
        str(env.tmp / "nope.jsonl"),
        "--run-dir",
        str(env.tmp / "o"),
    ],
)
case(
    "api-load_task-choices-string",
    r"choices must be a list of strings, not str",
    api=lambda env: lambda: emloc_nb.load_task(env.data, choices="no yes"),
)
case(
    "api-load_task-stray-answer",
    r"Answers \['no'\] are not among the choices \['yes'\]",
    api=lambda env: lambda: emloc_nb.load_task(env.data, choices=["yes"]),
)
case(
    "api-load_task-test-size-too-big",
    r"80 examples cannot give 500 test and \d+ validation examples",
    api=lambda env: lambda: emloc_nb.load_task(env.data, test_size=500),
)
case(
    "api-load_task-test-size-zero",
    r"test_size=0 is a count of test examples",
    api=lambda env: lambda: emloc_nb.load_task(env.data, test_size=0),
)
case(
    "api-load_task-not-a-source",
    r"A task source is a file path, .* not int",
    api=lambda env: lambda: emloc_nb.load_task(5),
)
case(
    "cli-build-answer-field",
    r"missing field\(s\) \['label'\]",
    cli=lambda env: [
        "build-emulator",
        "--model",
        str(env.model),
        "--data",
        str(env.data),
        "--answer-field",
        "label",
        "--run-dir",
        str(env.tmp / "o"),
    ],
)

# ----------------------------------------------------------------------------- run directories and --overwrite


def _inputs_in_output(env):
    """The issue's case 1: the data file lies in the directory that --overwrite would replace."""
    proj = env.tmp / "proj"
    proj.mkdir()
    shutil.copy(env.data, proj / "toy.jsonl")
    return [
        "build-emulator",
        "--model",
        str(env.model),
        "--data",
        str(proj / "toy.jsonl"),
        "--run-dir",
        str(proj),
        "--overwrite",
    ]


def _model_in_run(env):
    run = env.copy_run()
    shutil.copytree(env.model, run / "scratch" / "model")
    config = env.yaml(env.config(model=str(run / "scratch" / "model"), correction={"clamp": 1.0}))
    return ["run", str(config), "--run-dir", str(run), "--overwrite"]


def _foreign_file(env):
    run = env.copy_run()
    (run / "notes.txt").write_text("mine")
    return ["run", str(env.yaml(env.config(correction={"clamp": 1.0}))), "--run-dir", str(run), "--overwrite"]


def _no_run_here(env):
    (env.tmp / "home").mkdir()
    (env.tmp / "home" / "thesis.tex").write_text("years of work")
    return [
        "build-emulator",
        "--model",
        str(env.model),
        "--data",
        str(env.data),
        "--run-dir",
        str(env.tmp / "home"),
        "--overwrite",
    ]


case(
    "cli-build-data-inside-output",
    r"toy\.jsonl is an input of the run and lies inside its run directory",
    cli=_inputs_in_output,
)
case("cli-run-model-inside-run", r"model is an input of the run and lies inside its run directory", cli=_model_in_run)
case("cli-run-foreign-file", r"holds \['notes\.txt'\], which emloc-nb did not write", cli=_foreign_file)
case("cli-build-overwrite-non-run", r"holds files but no emloc-nb run \(no run\.json\)", cli=_no_run_here)
case(
    "cli-run-different-run",
    r"already holds a different run",
    cli=lambda env: ["run", str(env.yaml(env.config(correction={"clamp": 1.0}))), "--run-dir", str(env.copy_run())],
)
case(
    "cli-run-dir-is-file",
    r"is a file, not a run directory",
    cli=lambda env: ["run", str(env.yaml(env.config())), "--run-dir", str(env.yaml("x", "file.txt"))],
)
case(
    "cli-finetune-no-run",
    r"is not a run directory \(no run\.json\)",
    cli=lambda env: ["finetune", "--run-dir", str(env.tmp)],
)
case(
    "cli-correct-no-run",
    r"is not a run directory \(no run\.json\)",
    cli=lambda env: ["correct", "--run-dir", str(env.tmp / "none")],
)
case(
    "cli-evaluate-no-run",
    r"is not a run directory \(no run\.json\)",
    cli=lambda env: ["evaluate", "--run-dir", str(env.tmp / "none")],
)
case(
    "cli-report-no-run",
    r"is not a run directory \(no run\.json\)",
    cli=lambda env: ["report", "--run-dir", str(env.tmp / "none")],
)
case(
    "api-run-foreign-file",
    r"holds \['notes\.txt'\], which emloc-nb did not write",
    api=lambda env: (
        lambda run: lambda: Run(run, tiny_run_config(env.model, env.data, correction={"clamp": 1.0}), overwrite=True)
    )(_foreign_file(env)[3]),
)
case("api-run-not-a-run", r"is not a run directory", api=lambda env: lambda: Run(env.tmp))
case(
    "api-run-overwrite-not-bool",
    r"overwrite must be True or False, not str",
    api=lambda env: lambda: Run(env.tmp / "r", tiny_run_config(env.model, env.data), overwrite="yes"),
)
case(
    "api-run-trust-not-bool",
    r"trust_remote_code must be True or False, not str 'false'",
    api=lambda env: lambda: Run(env.tmp / "r", tiny_run_config(env.model, env.data), trust_remote_code="false"),
)
case(
    "api-run-config-not-runconfig",
    r"config must be a RunConfig, not dict",
    api=lambda env: lambda: Run(env.tmp / "r", {"model": "x"}),
)


def _run_json(env, mutate) -> Path:
    run = env.copy_run()
    d = json.loads((run / "run.json").read_text())
    mutate(d)
    (run / "run.json").write_text(json.dumps(d))
    return run


case(
    "cli-evaluate-run-json-trusts-code",
    r"trust_remote_code is never read from a config",
    cli=lambda env: ["evaluate", "--run-dir", str(_run_json(env, lambda d: d.update(trust_remote_code=True)))],
)
case(
    "cli-evaluate-run-json-nan",
    r"run\.json: correction\.clamp=nan is not a finite",
    cli=lambda env: ["evaluate", "--run-dir", str(_run_json(env, lambda d: d["correction"].update(clamp=math.nan)))],
)
case(
    "cli-evaluate-run-json-steps-0",
    r"run\.json: train\.steps=0 must be ≥ 1",
    cli=lambda env: ["evaluate", "--run-dir", str(_run_json(env, lambda d: d["train"].update(steps=0)))],
)
case(
    "cli-correct-run-json-garbled",
    r"run\.json is not valid JSON",
    cli=lambda env: ["correct", "--run-dir", str((lambda r: (r / "run.json").write_text("{") and r)(env.copy_run()))],
)
case(
    "api-run-run-json-list",
    r"run\.json: A run config must be a mapping",
    api=lambda env: (lambda r: (r / "run.json").write_text("[]") and (lambda: Run(r)))(env.copy_run()),
)

# ----------------------------------------------------------------------------- artifacts: copied, edited, damaged


def _emulator_from_09(env) -> Path:
    """The issue's case: an emulator built at ρ = 0.9 copied into a ρ = 0.5 run (before its fine-tuning)."""
    run = env.copy_run()
    shutil.rmtree(run / "finetune_emulator")
    shutil.rmtree(run / "emulator")
    shutil.copytree(env.run_09 / "emulator", run / "emulator")
    return run


def _edit_json(path: Path, mutate) -> None:
    d = json.loads(path.read_text())
    mutate(d)
    path.write_text(json.dumps(d))


def _edited_alpha(env) -> Path:
    run = env.copy_run()
    _edit_json(run / "finetune_emulator" / "adapter" / "adapter_config.json", lambda d: d.update(lora_alpha=1000))
    shutil.rmtree(run / "correct")
    return run


def _weight_plus_1000(env) -> Path:
    """+1000 on one value of a weight, where the 64-value fingerprint sample does not look."""
    run = env.copy_run()
    path = run / "emulator" / "emulator.safetensors"
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.endswith("down.weight"))
    tensors[name][1, 1] += 1000
    save_file(tensors, str(path))
    shutil.rmtree(run / "finetune_emulator")
    return run


def _deleted_corrected_weights(env) -> Path:
    run = env.copy_run()
    (run / "correct" / "adapter" / "adapter_model.safetensors").unlink()
    shutil.rmtree(run / "evaluate")
    return run


def _remove(rel: str, then_drop: str | None = None):
    def build(env):
        run = env.copy_run()
        target = run / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        if then_drop:
            shutil.rmtree(run / then_drop)
        return run

    return build


def _append(rel: str, then_drop: str, data: bytes = b"\0"):
    def build(env):
        run = env.copy_run()
        with (run / rel).open("ab") as f:
            f.write(data)
        shutil.rmtree(run / then_drop)
        return run

    return build


def _resign(run: Path, rel_dir: str) -> None:
    """A hostile edit that also rewrites the manifest, so the checksums agree with the edited files."""
    manifest = json.loads((run / rel_dir / MANIFEST).read_text())
    (run / rel_dir / MANIFEST).unlink()
    token = provenance.set(manifest["run"])
    try:
        write_manifest(
            run / rel_dir,
            kind=manifest["kind"],
            model_fingerprint=manifest["model_fingerprint"],
            config=manifest["config"],
        )
    finally:
        provenance.reset(token)


def _nan_adapter_resigned(env) -> Path:
    run = env.copy_run()
    path = run / "finetune_emulator" / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    first = next(iter(tensors))
    tensors[first][0, 0] = math.nan
    save_file(tensors, str(path))
    _resign(run, "finetune_emulator/adapter")
    shutil.rmtree(run / "correct")
    return run


EVIL_AUTO_MAP = {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}  # a type transformers lacks


def _auto_map_resigned(env) -> Path:
    """An emulator whose config.json asks for its own code, with a matching manifest: no code may run."""
    run = env.copy_run()
    (run / "emulator" / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    _edit_json(
        run / "emulator" / "config.json",
        lambda d: d.update(model_type="evil", auto_map=EVIL_AUTO_MAP),
    )
    _resign(run, "emulator")
    shutil.rmtree(run / "finetune_emulator")
    return run


def _stale_calibration(env) -> Path:
    """The calibration statistics changed (consistently, manifest and all): the emulator built from the old is stale."""
    run = env.copy_run()
    stats = run / "calibrate" / "train" / "calibration.safetensors"
    tensors = load_file(str(stats))
    key = next(iter(tensors))
    tensors[key] = tensors[key] * 1.01
    save_file(tensors, str(stats))
    _resign(run, "calibrate/train")
    shutil.rmtree(run / "drift")
    return run


def _foreign_checkpoint(env) -> Path:
    run = env.copy_run()
    shutil.rmtree(run / "finetune_emulator")
    other = env.tmp / "other"
    emloc_nb.finetune(
        *emloc_nb.tiny_model("llama"),
        emloc_nb.load_task(env.data),
        other,
        lora=emloc_nb.LoraSpec(r=2, alpha=2),
        config=emloc_nb.TrainSpec(steps=4, checkpoint_every=0, batch_size=8),
        stop_after=1,
        progress=False,
    )
    (run / "finetune_emulator").mkdir()
    shutil.copytree(other / "checkpoint", run / "finetune_emulator" / "checkpoint")
    shutil.rmtree(other)
    return run


ARTIFACT_CASES = [  # (id, builder, command, pattern)
    (
        "emulator-from-another-ratio",
        _emulator_from_09,
        "finetune",
        r"emulator was produced with other settings.*'ratio': 0\.9",
    ),
    ("edited-lora-alpha", _edited_alpha, "correct", r"adapter_config\.json does not match its SHA-256"),
    ("weight-plus-1000", _weight_plus_1000, "finetune", r"emulator\.safetensors does not match its SHA-256"),
    (
        "deleted-corrected-weights",
        _deleted_corrected_weights,
        "evaluate",
        r"correct/adapter lacks \['adapter_model\.safetensors'\]",
    ),
    (
        "deleted-manifest",
        _remove("emulator/manifest.json", "finetune_emulator"),
        "finetune",
        r"emulator has no manifest\.json",
    ),
    (
        "extra-file",
        lambda env: (lambda r: (r / "emulator" / "notes.txt").write_text("x") and r)(_remove("drift")(env)),
        "run",
        r"emulator holds files its manifest does not list: \['notes\.txt'\]",
    ),
    (
        "truncated-weights",
        _append("emulator/emulator.safetensors", "drift"),
        "run",
        r"emulator\.safetensors does not match its SHA-256",
    ),
    (
        "edited-calibration",
        _append("calibrate/heldout/calibration.json", "drift", b" "),
        "run",
        r"calibration\.json does not match its SHA-256",
    ),
    ("nan-adapter-with-matching-manifest", _nan_adapter_resigned, "correct", r"has non-finite weights \(NaN/Inf\)"),
    (
        "auto-map-with-matching-manifest",
        _auto_map_resigned,
        "finetune",
        r"emulator asks to run its own code \(auto_map\)",
    ),
    ("stale-emulator", _stale_calibration, "run", r"emulator was computed from another calibration:train"),
    (
        "foreign-checkpoint",
        _foreign_checkpoint,
        "finetune",
        r"checkpoint was written by another fine-tuning run \(it differs in: base_fingerprint, lora, train\)",
    ),
    (
        "deleted-stats-file",
        _remove("calibrate/heldout/calibration.safetensors", "correct"),
        "correct",
        r"heldout lacks \['calibration\.safetensors'\]",
    ),
    (
        "edited-drift",
        _append("drift/drift.json", "evaluate", b" "),
        "report",
        r"drift\.json does not match its SHA-256",
    ),
    (  # the report's first table, the results, is refused first: one of its evaluations used the old emulator
        "spectra-from-another-ratio",
        _emulator_from_09,
        "report",
        r"evaluate/emulator was computed from another emulator than the run now holds",
    ),
]


def _command(command: str, run: Path, env: Env) -> list[str]:
    if command == "report":
        return ["report", "--run-dir", str(run)]
    if command == "run":
        return ["run", str(env.yaml(json.loads((run / "run.json").read_text()))), "--run-dir", str(run), "--in-process"]
    return [command, "--run-dir", str(run), "--in-process"]


for id_, build, command, pattern in ARTIFACT_CASES:
    case(f"cli-{command}-{id_}", pattern, cli=lambda env, b=build, c=command: _command(c, b(env), env))

# The same artifacts through the API loaders.
LOADERS = [  # (id, builder, call on the Run, pattern)
    ("emulator-from-another-ratio", _emulator_from_09, lambda run: run.emulator(), r"produced with other settings"),
    (
        "spectra-from-another-ratio",
        _emulator_from_09,
        lambda run: run.spectra(),
        r"spectra was produced with other settings",
    ),
    ("weight-plus-1000", _weight_plus_1000, lambda run: run.emulator(), r"does not match its SHA-256"),
    (
        "edited-drift",
        _append("drift/drift.json", "evaluate", b" "),
        lambda run: run.drift(),
        r"drift\.json does not match",
    ),
    (
        "edited-correction",
        _append("correct/report/correction.json", "evaluate", b" "),
        lambda run: run.correction(),
        r"correction\.json does not match",
    ),
    (
        "edited-eval",
        _append("evaluate/original/evaluation.json", "drift", b" "),
        lambda run: run.eval_result("original"),
        r"evaluation\.json does not match",
    ),
    (
        "edited-spectra",
        _append("emulator/spectra/spectra.json", "drift", b" "),
        lambda run: run.spectra(),
        r"spectra\.json does not match",
    ),
    (
        "heldout-missing",
        _remove("calibrate/heldout"),
        lambda run: run.calibration("heldout"),
        r"heldout does not exist",
    ),
    (
        "calibration-split",
        lambda env: env.copy_run(),
        lambda run: run.calibration("test"),
        r"Calibration split 'test': use 'train' or 'heldout'",
    ),
    ("adapter-name", lambda env: env.copy_run(), lambda run: run.adapter_dir("naive"), r"Unknown adapter 'naive'"),
    (
        "history-garbled",
        lambda env: (lambda r: (r / "finetune_emulator" / "history.json").write_text('{"a": 1}') and r)(env.copy_run()),
        lambda run: run.history(),
        r"history\.json is not a list of training steps",
    ),
    (
        "results-garbled",
        lambda env: (lambda r: (r / "evaluate" / "results.json").write_text("[1]") and r)(env.copy_run()),
        lambda run: run.results(),
        r"results\.json holds a JSON list, not an object",
    ),
    (
        "path-traversal",
        lambda env: env.copy_run(),
        lambda run: run.path("evaluation:../../etc"),
        r"'\.\./\.\./etc' cannot name an entry of a run",
    ),
    (
        "unknown-artifact",
        lambda env: env.copy_run(),
        lambda run: run.path("weights"),
        r"Unknown run artifact 'weights'",
    ),
    ("unknown-stage", lambda env: env.copy_run(), lambda run: run.run_stage("compress"), r"Unknown stage 'compress'"),
    (
        "stage-inputs-missing",
        _remove("emulator", "drift"),
        lambda run: run.run_stage("drift", isolate=False),
        r"Stage drift needs emulator",
    ),
]
for id_, build, call, pattern in LOADERS:
    case(f"api-run-{id_}", pattern, api=lambda env, b=build, c=call: (lambda run: lambda: c(run))(Run(b(env))))

# ----------------------------------------------------------------------------- the other public entry points


def _auto_map_model(env) -> Path:
    model = env.tmp / "remote"
    shutil.copytree(env.model, model)
    (model / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    _edit_json(
        model / "config.json",
        lambda d: d.update(model_type="evil", auto_map=EVIL_AUTO_MAP),
    )
    return model


def _tiny():
    return emloc_nb.tiny_model("llama")


def _tiny_emulator(env):
    model, tok = _tiny()
    return model, tok, emloc_nb.build_emulator(model, None, 0.5, mode="plain", progress=False)


def _garbled_model(env) -> Path:
    model = Path(shutil.copytree(env.model, env.tmp / "m"))
    (model / "config.json").write_text("{")
    return model


def _written(rel: str, text: str):
    def build(env):
        path = env.tmp / rel
        path.write_text(text)
        return path

    return build


def _in_copy(edit, rel: str):
    def build(env):
        run = env.copy_run()
        edit(run)
        return run / rel

    return build


NOTHING = lambda env: None  # noqa: E731
API_CASES = [  # (id, setup before the snapshot, call(env, what setup made), pattern)
    (
        "load_model-missing",
        NOTHING,
        lambda env, _: emloc_nb.load_model(env.tmp / "none"),
        r"Model path .*none does not exist",
    ),
    ("load_model-no-config", NOTHING, lambda env, _: emloc_nb.load_model(env.tmp), r"holds no config\.json"),
    (
        "load_model-trust-string",
        NOTHING,
        lambda env, _: emloc_nb.load_model(env.model, trust_remote_code="false"),
        r"trust_remote_code must be True or False, not str",
    ),
    (
        "load_model-auto-map",
        _auto_map_model,
        lambda env, m: emloc_nb.load_model(m),
        r"asks to run its own code \(auto_map\).*Pass --trust-remote-code",
    ),
    (
        "load_model-not-a-path",
        NOTHING,
        lambda env, _: emloc_nb.load_model(5),
        r"A model is a path, a Hub id \(org/name\) or 'smollm2-135m-instruct', not 5",
    ),
    (
        "load_model-garbled-config",
        _garbled_model,
        lambda env, m: emloc_nb.load_model(m),
        r"is not a checkpoint transformers can load",
    ),
    (
        "collect_stats-empty",
        NOTHING,
        lambda env, _: emloc_nb.collect_stats(_tiny()[0], [], progress=False),
        r"The calibration set is empty",
    ),
    (
        "collect_stats-unknown-layer",
        NOTHING,
        lambda env, _: emloc_nb.collect_stats(_tiny()[0], [], layers=["nope"], progress=False),
        r"Layers \['nope'\] are not modules",
    ),
    (
        "build_emulator-mode",
        NOTHING,
        lambda env, _: emloc_nb.build_emulator(_tiny()[0], None, 0.5, mode="svd"),
        r"Unknown mode 'svd'",
    ),
    (
        "build_emulator-whitened-without-stats",
        NOTHING,
        lambda env, _: emloc_nb.build_emulator(_tiny()[0], None, 0.5),
        r"The whitened emulator needs calibration statistics",
    ),
    (
        "build_emulator-ratio",
        NOTHING,
        lambda env, _: emloc_nb.build_emulator(_tiny()[0], None, 1.5, mode="plain"),
        r"ρ=1\.5 is outside",
    ),
    (
        "build_emulator-stats-of-another-model",
        NOTHING,
        lambda env, _: emloc_nb.build_emulator(
            emloc_nb.tiny_model("llama", seed=1)[0], Run(env.complete_run).calibration(), 0.5
        ),
        r"calibration statistics belongs to a model with fingerprint",
    ),
    ("Emulator.load-missing", NOTHING, lambda env, _: emloc_nb.Emulator.load(env.tmp / "none"), r"none does not exist"),
    (
        "Emulator.load-a-report",
        NOTHING,
        lambda env, _: emloc_nb.Emulator.load(env.complete_run / "drift"),
        r"holds a 'drift' artifact, not 'emulator'",
    ),
    (
        "finetune-steps-0",
        NOTHING,
        lambda env, _: emloc_nb.finetune(
            *_tiny(), emloc_nb.load_task(env.data), env.tmp / "o", config=emloc_nb.TrainSpec(steps=0)
        ),
        r"train\.steps=0 must be ≥ 1",
    ),
    (
        "finetune-lora-targets",
        NOTHING,
        lambda env, _: emloc_nb.finetune(
            *_tiny(),
            emloc_nb.load_task(env.data),
            env.tmp / "o",
            lora=emloc_nb.LoraSpec(targets=["nope"]),
            config=emloc_nb.TrainSpec(steps=1),
            progress=False,
        ),
        r"Could not attach LoRA to targets \[.nope.\] \(Target modules",
    ),
    (
        "finetune_hf-steps-string",
        NOTHING,
        lambda env, _: emloc_nb.finetune_hf(
            *_tiny(), emloc_nb.load_task(env.data), env.tmp / "o", config=emloc_nb.TrainSpec(steps="3")
        ),
        r"train\.steps must be a whole number, not str",
    ),
    (
        "correct_lora-clamp-nan",
        NOTHING,
        lambda env, _: emloc_nb.correct_lora(*_tiny_emulator(env)[::2], env.tmp / "a", env.tmp / "o", clamp=math.nan),
        r"clamp=nan is not a finite number",
    ),
    (
        "correct_lora-clamp-string",
        NOTHING,
        lambda env, _: emloc_nb.correct_lora(*_tiny_emulator(env)[::2], env.tmp / "a", env.tmp / "o", clamp="3"),
        r"clamp must be a number, not str",
    ),
    (
        "correct_lora-missing-adapter",
        NOTHING,
        lambda env, _: emloc_nb.correct_lora(*_tiny_emulator(env)[::2], env.tmp / "a", env.tmp / "o"),
        r"holds no adapter \(adapter_config\.json is missing\)",
    ),
    (
        "correct_lora-emulator-of-another-model",
        NOTHING,
        lambda env, _: emloc_nb.correct_lora(
            emloc_nb.tiny_model("llama", seed=1)[0], _tiny_emulator(env)[2], env.tmp / "a", env.tmp / "o"
        ),
        r"emulator belongs to a model with fingerprint",
    ),
    (
        "evaluate-limit-0",
        NOTHING,
        lambda env, _: emloc_nb.evaluate(*_tiny(), emloc_nb.load_task(env.data), limit=0),
        r"evaluation\.limit=0 must be ≥ 1",
    ),
    (
        "evaluate-split",
        NOTHING,
        lambda env, _: emloc_nb.evaluate(*_tiny(), emloc_nb.load_task(env.data), split="dev"),
        r"evaluation\.split='dev' is not one of \['train', 'validation', 'test'\]",
    ),
    (
        "evaluate-batch-size",
        NOTHING,
        lambda env, _: emloc_nb.evaluate(*_tiny(), emloc_nb.load_task(env.data), batch_size=0),
        r"evaluation\.batch_size=0 must be ≥ 1",
    ),
    (
        "drift-emulator-of-another-model",
        NOTHING,
        lambda env, _: emloc_nb.drift(emloc_nb.tiny_model("llama", seed=1)[0], _tiny_emulator(env)[2], []),
        r"emulator belongs to a model with fingerprint",
    ),
    (
        "load_adapter-missing",
        NOTHING,
        lambda env, _: emloc_nb.load_adapter(_tiny()[0], env.tmp / "none"),
        r"holds no adapter \(adapter_config\.json is missing\)",
    ),
    (
        "load_adapter-weights-deleted",
        _deleted_corrected_weights,
        lambda env, run: emloc_nb.load_adapter(_tiny()[0], run / "correct" / "adapter"),
        r"holds no adapter \(adapter_model\.safetensors is missing\)",
    ),
    (
        "load_adapter-edited-alpha",
        _edited_alpha,
        lambda env, run: emloc_nb.load_adapter(
            Run(env.complete_run).emulator().model, run / "finetune_emulator" / "adapter"
        ),
        r"adapter_config\.json does not match its SHA-256",
    ),
    (
        "load_adapter-another-base",
        NOTHING,
        lambda env, _: emloc_nb.load_adapter(
            emloc_nb.tiny_model("llama", seed=1)[0], env.complete_run / "correct" / "adapter"
        ),
        r"belongs to a model with fingerprint",
    ),
    (
        "load_adapter-nan",
        _nan_adapter_resigned,
        lambda env, run: emloc_nb.load_adapter(
            Run(env.complete_run).emulator().model, run / "finetune_emulator" / "adapter"
        ),
        r"has non-finite weights",
    ),
    ("RankPlan-ratio-nan", NOTHING, lambda env, _: emloc_nb.RankPlan(math.nan), r"ρ=nan is outside"),
    (
        "RankPlan-ranks-bool",
        NOTHING,
        lambda env, _: emloc_nb.RankPlan(0.5, ranks={"a": True}),
        r"Rank True for a must be a positive integer",
    ),
    (
        "RankPlan-load-list",
        _written("plan.json", "[1]"),
        lambda env, p: emloc_nb.RankPlan.load(p),
        r"plan\.json holds a JSON list, not a rank plan",
    ),
    (
        "RankPlan-load-garbled",
        _written("plan.json", "{"),
        lambda env, p: emloc_nb.RankPlan.load(p),
        r"plan\.json is not valid JSON",
    ),
    (
        "RankPlan-from_dict-list",
        NOTHING,
        lambda env, _: emloc_nb.RankPlan.from_dict([0.5]),
        r"A rank plan is a mapping",
    ),
    (
        "CalibrationStats.load-missing",
        NOTHING,
        lambda env, _: emloc_nb.CalibrationStats.load(env.tmp / "none"),
        r"none does not exist",
    ),
    (
        "CalibrationStats.load-other-kind",
        NOTHING,
        lambda env, _: emloc_nb.CalibrationStats.load(env.complete_run / "drift"),
        r"holds a 'drift' artifact, not 'calibration'",
    ),
    (
        "SpectrumTable.load-no-manifest",
        _in_copy(lambda r: (r / "emulator" / "spectra" / MANIFEST).unlink(), "emulator/spectra"),
        lambda env, p: emloc_nb.SpectrumTable.load(p),
        r"spectra has no manifest\.json",
    ),
    (
        "DriftReport.load-garbled-manifest",
        _in_copy(lambda r: (r / "drift" / MANIFEST).write_text("[]"), "drift"),
        lambda env, p: emloc_nb.DriftReport.load(p),
        r"manifest\.json holds a JSON list, not an object",
    ),
    (
        "CorrectionReport.load-old-format",
        _in_copy(
            lambda r: _edit_json(r / "correct" / "report" / MANIFEST, lambda d: d.update(format_version=1)),
            "correct/report",
        ),
        lambda env, p: emloc_nb.CorrectionReport.load(p),
        r"has format version 1; this emloc-nb reads version 2",
    ),
    (
        "EvalResult.load-a-file",
        NOTHING,
        lambda env, _: emloc_nb.EvalResult.load(env.data),
        r"toy\.jsonl is a file, not an artifact directory",
    ),
]
for id_, setup, call, pattern in API_CASES:
    case(f"api-{id_}", pattern, api=lambda env, s=setup, c=call: (lambda made: lambda: c(env, made))(s(env)))

# ----------------------------------------------------------------------------- issue 30: arguments of the wrong kind
# A public function given the wrong kind of object names the argument and what it should be (one helper,
# emloc_nb.errors.argument_kinds, checks them all), instead of an AttributeError deep inside.
family("a public function given the wrong kind of object")


def _toy_task(env):
    return emloc_nb.load_task(env.data)


WRONG_KINDS = [  # (id, call(env), pattern)
    ("collect_stats-model-str", lambda env: emloc_nb.collect_stats("not a model", []), r"model must be a model"),
    ("collect_stats-batches-str", lambda env: emloc_nb.collect_stats(_tiny()[0], "abc"), r"batches must be a list"),
    (
        "collect_stats-batch-int",
        lambda env: emloc_nb.collect_stats(_tiny()[0], [5], progress=False),
        r"batch must be a batch \(a dict of tensors",
    ),
    ("build_emulator-stats-dict", lambda env: emloc_nb.build_emulator(_tiny()[0], {}, 0.5), r"stats must be Calib"),
    (
        "build_emulator-plan-str",
        lambda env: emloc_nb.build_emulator(_tiny()[0], None, "0.5", mode="plain"),
        r"plan must be a RankPlan or a kept share",
    ),
    ("build_emulator-model-none", lambda env: emloc_nb.build_emulator(None, None, 0.5), r"model must be a model"),
    ("drift-emulator-str", lambda env: emloc_nb.drift(_tiny()[0], "emulator", []), r"emulator must be an Emulator"),
    ("drift-batches-dict", lambda env: emloc_nb.drift(*_tiny_emulator(env)[::2], {}), r"batches must be a list"),
    ("evaluate-tokenizer-str", lambda env: emloc_nb.evaluate(_tiny()[0], "tok", _toy_task(env)), r"tokenizer must be"),
    ("evaluate-task-path", lambda env: emloc_nb.evaluate(*_tiny(), str(env.data)), r"task must be a Task"),
    (
        "finetune-output-int",
        lambda env: emloc_nb.finetune(*_tiny(), _toy_task(env), 5),
        r"output_dir must be a path",
    ),
    (
        "finetune-lora-dict",
        lambda env: emloc_nb.finetune(*_tiny(), _toy_task(env), env.tmp / "o", lora={"r": 4}),
        r"lora must be a LoraSpec",
    ),
    (
        "finetune_hf-config-dict",
        lambda env: emloc_nb.finetune_hf(*_tiny(), _toy_task(env), env.tmp / "o", config={"steps": 3}),
        r"config must be a TrainSpec",
    ),
    (
        "correct_lora-emulator-path",
        lambda env: emloc_nb.correct_lora(_tiny()[0], env.complete_run / "emulator", env.tmp / "a", env.tmp / "o"),
        r"emulator must be an Emulator",
    ),
    (
        "correct_lora-heldout-path",
        lambda env: emloc_nb.correct_lora(
            *_tiny_emulator(env)[::2], env.tmp / "a", env.tmp / "o", heldout=env.complete_run / "calibrate"
        ),
        r"heldout must be CalibrationStats, or None",
    ),
    ("load_adapter-model-str", lambda env: emloc_nb.load_adapter("llama", env.tmp), r"model must be a model"),
    ("load_adapter-path-none", lambda env: emloc_nb.load_adapter(_tiny()[0], None), r"path must be a path"),
    ("attach_lora-spec-dict", lambda env: emloc_nb.attach_lora(_tiny()[0], {"r": 4}), r"spec must be a LoraSpec"),
    ("batches-tokenizer-str", lambda env: emloc_nb.batches("tok", _toy_task(env).train), r"tokenizer must be a trans"),
    ("batches-dataset-list", lambda env: emloc_nb.batches(_tiny()[1], [{"a": 1}]), r"dataset must be a datasets"),
    ("fingerprint-str", lambda env: emloc_nb.fingerprint("llama"), r"model must be a model"),
    ("correct_layer-lists", lambda env: emloc_nb.correct_layer([1], [1], [1], [1], 1.0), r"w must be a torch\.Tensor"),
    ("allocate-dict", lambda env: emloc_nb.allocate({}, 0.5), r"spectra must be a SpectrumTable"),
    ("Emulator.load-int", lambda env: emloc_nb.Emulator.load(5), r"path must be a path"),
    ("Emulator.load-original-str", lambda env: emloc_nb.Emulator.load(env.tmp, original="m"), r"original must be a"),
    ("CalibrationStats.load-none", lambda env: emloc_nb.CalibrationStats.load(None), r"path must be a path"),
    ("DriftReport.load-empty-path", lambda env: emloc_nb.DriftReport.load(""), r"path must be a path"),
    ("RankPlan.load-int", lambda env: emloc_nb.RankPlan.load(3), r"path must be a path"),
    ("RunConfig.load-dict", lambda env: RunConfig.load({"model": "x"}), r"path must be a path"),
]
for id_, call, pattern in WRONG_KINDS:
    case(f"api-kind-{id_}", pattern, api=lambda env, c=call: lambda: c(env))

# ----------------------------------------------------------------------------- issue 30: silent acceptance
family("silent acceptance")

SILENT = [  # (id, call(env), pattern): values that were accepted and quietly did something else
    ("batches-limit--1", lambda env: emloc_nb.batches(*_tok_data(env), limit=-1), r"limit must be a whole number ≥ 1"),
    ("batches-limit-0", lambda env: emloc_nb.batches(*_tok_data(env), limit=0), r"limit must be a whole number ≥ 1"),
    ("batches-limit-true", lambda env: emloc_nb.batches(*_tok_data(env), limit=True), r"limit must be a whole"),
    ("batches-batch-size-0", lambda env: emloc_nb.batches(*_tok_data(env), batch_size=0), r"batch_size must be"),
    ("batches-max-length--3", lambda env: emloc_nb.batches(*_tok_data(env), max_length=-3), r"max_length must be"),
]
for id_, call, pattern in SILENT:
    case(f"api-silent-{id_}", pattern, api=lambda env, c=call: lambda: c(env))


case(
    "api-silent-RankPlan.load-duplicate",
    r"plan\.json sets 'ratio' twice \(lines 2 and 4\)",
    api=lambda env: (lambda p: lambda: emloc_nb.RankPlan.load(p))(_dup_plan(env)),
)


def _tok_data(env):
    return _tiny()[1], _toy_task(env).train


def _dup_plan(env) -> Path:
    path = env.tmp / "plan.json"
    path.write_text('{\n  "ratio": 0.5,\n  "rules": {},\n  "ratio": 0.9\n}\n')
    return path


DUPLICATE_KEYS = [  # (file name, text, pattern): a key given twice, the last one silently winning
    ("dup.yaml", "train:\n  steps: 3\n  lr: 0.01\n  steps: 5\n", r"dup\.yaml sets 'steps' twice \(lines 2 and 4\)"),
    ("top.yaml", "seed: 1\nmodel: x\nseed: 2\n", r"top\.yaml sets 'seed' twice \(lines 1 and 3\)"),
    ("flow.yaml", "task: {source: a.jsonl, source: b.jsonl}\n", r"flow\.yaml sets 'source' twice \(lines 1 and 1\)"),
    ("section.yaml", "train:\n  steps: 3\nlora:\n  r: 4\ntrain:\n  lr: 1\n", r"sets 'train' twice \(lines 1 and 5\)"),
    ("dup.json", '{"train": {"steps": 3,\n "steps": 5}}', r"dup\.json sets 'steps' twice \(lines 1 and 2\)"),
    ("nested.json", '{"a": {"x": 1}, "b": {"x": 2},\n"seed": 1,\n"seed": 2}', r"sets 'seed' twice \(lines 2 and 3\)"),
]
for filename, text, pattern in DUPLICATE_KEYS:

    def write(env, filename=filename, text=text):
        path = env.tmp / filename
        path.write_text(text)
        return path

    case(f"api-load-{filename}", pattern, api=lambda env, w=write: (lambda p: lambda: RunConfig.load(p))(w(env)))
    case(f"cli-run-{filename}", pattern, cli=lambda env, w=write: ["run", str(w(env)), "--run-dir", str(env.tmp / "o")])

case(
    "cli-run-set-duplicate-key",
    r"--set 'task\.answer_map=\{0: no, 0: yes\}' sets 0 twice",
    cli=lambda env: [
        "run",
        str(env.yaml(env.config())),
        "--run-dir",
        str(env.tmp / "o"),
        "--set",
        "task.answer_map={0: no, 0: yes}",
    ],
)
case(
    "cli-evaluate-run-json-duplicate-key",
    r"run\.json sets 'seed' twice",
    cli=lambda env: [
        "evaluate",
        "--run-dir",
        str(
            (lambda r: (r / "run.json").write_text('{"seed": 0, ' + (r / "run.json").read_text()[1:]) and r)(
                env.copy_run()
            )
        ),
    ],
)

# ------------------------------------------------------------------------ issue 30: errors naming the wrong problem
family("an error naming the wrong problem")

WRONG_PROBLEM_DATA = [  # (file name, content, pattern)
    ("null-answer.jsonl", '{"prompt": "a", "answer": null}\n' * 4, r"null-answer\.jsonl:1: field 'answer' is null"),
    ("empty-answer.jsonl", '{"prompt": "a", "answer": ""}\n' * 4, r":1: field 'answer' is an empty string"),
    ("null-prompt.jsonl", '{"prompt": null, "answer": "yes"}\n' * 4, r":1: field 'prompt' is null"),
    ("null-both.csv", "prompt,answer\n,\n,\n,\n", r"null-both\.csv:2: field 'answer' is an empty string"),
]
for filename, content, pattern in WRONG_PROBLEM_DATA:

    def write(env, filename=filename, content=content):
        path = env.tmp / "data" / filename
        path.parent.mkdir(exist_ok=True)
        path.write_text(content)
        return path

    case(
        f"api-load_task-{filename}", pattern, api=lambda env, w=write: (lambda p: lambda: emloc_nb.load_task(p))(w(env))
    )


def _data_dir(env) -> Path:
    (env.tmp / "data.jsonl").mkdir()
    return env.tmp / "data.jsonl"


def _gguf(env, content: bytes, name: str = "m.gguf") -> Path:
    path = env.tmp / name
    path.write_bytes(content)
    return path


case(
    "api-load_task-data-dir",
    r"Data path .*data\.jsonl is a directory, not a file",
    api=lambda env: (lambda d: lambda: emloc_nb.load_task(d))(_data_dir(env)),
)
case(
    "cli-build-data-dir",
    r"Data path .*data\.jsonl is a directory, not a file",
    cli=lambda env: [
        "build-emulator",
        "--model",
        str(env.model),
        "--data",
        str(_data_dir(env)),
        "--run-dir",
        str(env.tmp / "o"),
    ],
)
case(
    "api-load_model-a-file",
    r"Model path .*toy\.jsonl is a file, not a checkpoint directory",
    api=lambda env: lambda: emloc_nb.load_model(env.data),
)
case(
    "cli-build-model-a-file",
    r"Model path .*config\.json is a file, not a checkpoint directory",
    cli=lambda env: ["build-emulator", "--model", str(env.model / "config.json"), "--run-dir", str(env.tmp / "o")],
)
case(
    "api-load_model-gguf-garbage-body",
    r"m\.gguf is not a GGUF file transformers can read",
    api=lambda env: (lambda p: lambda: emloc_nb.load_model(p))(_gguf(env, b"GGUF\x03\x00\x00\x00" + b"garbage" * 100)),
)
case(
    "api-load_model-gguf-json-body",
    r"m\.gguf is not a GGUF file transformers can read",
    api=lambda env: (lambda p: lambda: emloc_nb.load_model(p))(_gguf(env, b"GGUF\x03\x00\x00\x00" + b"{" * 40)),
)
case(
    "api-load_model-gguf-no-magic",
    r"m\.gguf is not a GGUF file \(it does not start with the GGUF magic bytes\)",
    api=lambda env: (lambda p: lambda: emloc_nb.load_model(p))(_gguf(env, b'{"model_type": "llama"}')),
)
case(
    "cli-build-gguf-empty",
    r"e\.gguf is not a GGUF file \(it does not start",
    cli=lambda env: ["build-emulator", "--model", str(_gguf(env, b"", "e.gguf")), "--run-dir", str(env.tmp / "o")],
)
case(
    "api-load_model-gguf-a-directory",
    r"Model path .*d\.gguf is not a file",
    api=lambda env: (lambda p: lambda: emloc_nb.load_model(p))((env.tmp / "d.gguf").mkdir() or env.tmp / "d.gguf"),
)


def _huge_config(env) -> Path:
    """The issue's 5 MB config: 200k plan rules that match no layer."""
    d = env.config()
    d["emulator"]["plan"]["rules"] = {f"nomatch{i}": 0.5 for i in range(200_000)}
    path = env.tmp / "huge.json"
    path.write_text(json.dumps(d))
    return path


def _huge_unknown(env) -> Path:
    d = env.config()
    d["train"].update({f"setting{i}": i for i in range(200_000)})
    return env.yaml(d, "unknown.yaml")


case(
    "cli-run-huge-config",
    r"Rule\(s\) \['nomatch0', .*'nomatch4'\] and 199995 more match no layer",
    cli=lambda env: ["run", str(_huge_config(env)), "--run-dir", str(env.tmp / "o")],
)
case(
    "cli-run-huge-unknown-settings",
    r"Unknown setting\(s\) \['setting0', .* characters left out\] .* in train\. Fix the name",
    cli=lambda env: ["run", str(_huge_unknown(env)), "--run-dir", str(env.tmp / "o")],
)
case(
    "api-run-huge-value",
    r"task\.source must be a string, not list \[0, 1, 2, .*\.\.\.",
    api=lambda env: lambda: RunConfig.from_dict(env.config(task={"source": list(range(500_000))})),
)


# ----------------------------------------------------------------------------- issue 30: what a stage needs
# Values each of the right type and range that no stage can use: a rank wider than the layers, a length shorter
# than the chat template, counts larger than the split they draw from. Refused when the run is set up (the model's
# config, its tokenizer and the task are read; no weight is loaded), for a config file, --set and the API alike.
family("values no stage can use")

STAGE_NEEDS = [  # (setting, value, pattern); the tiny llama's narrowest block linear is k_proj, 32 × 64
    ("lora.r", 10**12, r"lora\.r=1000000000000 is wider than the layers the LoRA targets: .*k_proj is 32 × 64"),
    ("lora.r", 33, r"lora\.r=33 is wider than .*Set lora\.r to at most 32"),
    ("lora", {"r": 65, "targets": ["up_proj"]}, r"lora\.r=65 is wider .*up_proj is 160 × 64"),
    ("lora", {"r": 161, "targets": "model\\.layers\\.1\\.mlp\\.down_proj"}, r"at most 64"),
    ("calibration.max_length", 1, r"calibration\.max_length=1 is shorter than the chat template itself"),
    ("calibration.max_length", 22, r"calibration\.max_length=22 .*Set calibration\.max_length to at least 23"),
    ("train.max_length", 5, r"train\.max_length=5 is shorter than the chat template"),
    ("calibration.examples", 1000, r"calibration\.examples=1000 asks for more examples than the train split .*\(52\)"),
    ("calibration.heldout_examples", 9, r"calibration\.heldout_examples=9 .* validation split of toy holds \(8\)"),
    ("evaluation.limit", 21, r"evaluation\.limit=21 .* test split of toy holds \(20\)"),
    ("evaluation", {"split": "validation", "limit": 9}, r"evaluation\.limit=9 .* validation split"),
    ("train.batch_size", 64, r"train\.batch_size=64 asks for more examples than the train split"),
]
for setting, value, pattern in STAGE_NEEDS:
    name = f"{setting}={value!r}"

    def config_dict(env, setting=setting, value=value):
        return _set(env.config(), setting, value)

    case(
        f"api-run-needs-{name}",
        pattern,
        api=lambda env, d=config_dict: lambda: Run(env.tmp / "r", RunConfig.from_dict(d(env))),
    )
    case(
        f"cli-run-needs-{name}",
        pattern,
        cli=lambda env, d=config_dict: ["run", str(env.yaml(d(env))), "--run-dir", str(env.tmp / "out")],
    )

NEEDS_SET = [  # (command on a copy of the finished run, or "run", extra argv, pattern)
    ("run", ["--set", "lora.r=100000"], r"lora\.r=100000 is wider than the layers"),
    ("build-emulator", ["--set", "calibration.max_length=2"], r"calibration\.max_length=2 is shorter than the chat"),
    ("evaluate", ["--limit", "1000"], r"evaluation\.limit=1000 asks for more examples than the test split"),
    ("finetune", ["--set", "lora.r=64"], r"lora\.r=64 is wider than the layers"),
    ("finetune", ["--set", "train.max_length=3"], r"train\.max_length=3 is shorter than the chat template"),
]
for command, extra, pattern in NEEDS_SET:

    def argv(env, command=command, extra=extra):
        if command in ("run", "build-emulator"):
            return [command, *(["--config"] if command != "run" else []), str(env.yaml(env.config())), "--run-dir",
                    str(env.tmp / "o"), *extra]  # fmt: skip
        return [command, "--run-dir", str(env.copy_run()), "--in-process", *extra]

    case(f"cli-{command.split('-')[0]}-needs-{' '.join(extra)}", pattern, cli=argv)


def _one_token_batches(env):
    import torch

    return [{"input_ids": torch.tensor([[5], [6]]), "attention_mask": torch.tensor([[1], [1]])}]


def _stats(model, tok, env):
    return emloc_nb.collect_stats(model, emloc_nb.batches(tok, _toy_task(env).train, limit=8), progress=False)


NEEDS_API = [  # (id, call(env), pattern)
    (
        "finetune-lora-r-wider-than-layers",
        lambda env: emloc_nb.finetune(
            *_tiny(), _toy_task(env), env.tmp / "o", lora=emloc_nb.LoraSpec(r=10**6), progress=False
        ),
        r"lora\.r=1000000 is wider than the layers",
    ),
    (
        "attach_lora-r-wider-than-targets",
        lambda env: emloc_nb.attach_lora(_tiny()[0], emloc_nb.LoraSpec(r=65, targets=["gate_proj"])),
        r"lora\.r=65 is wider .*gate_proj is 160 × 64",
    ),
    (
        "finetune-max-length-1",
        lambda env: emloc_nb.finetune(
            *_tiny(), _toy_task(env), env.tmp / "o", config=emloc_nb.TrainSpec(max_length=1), progress=False
        ),
        r"train\.max_length=1 is shorter than the chat template",
    ),
    ("batches-max-length-1", lambda env: emloc_nb.batches(*_tok_data(env), max_length=1), r"max_length=1 is shorter"),
    (
        "drift-one-token-examples",
        lambda env: (lambda m, e: emloc_nb.drift(m, e, _one_token_batches(env), progress=False))(
            *_tiny_emulator(env)[::2]
        ),
        r"drift: no example in the batches has two real tokens",
    ),
    (
        "drift-no-batches",
        lambda env: (lambda m, tok, e: emloc_nb.drift(m, e, [], heldout=_stats(m, tok, env), progress=False))(
            *_tiny_emulator(env)
        ),
        r"drift: no example in the batches has two real tokens",
    ),
]
for id_, call, pattern in NEEDS_API:
    case(f"api-needs-{id_}", pattern, api=lambda env, c=call: lambda: c(env))


# ----------------------------------------------------------------------------- issue 30: trusted on resume
# A finished stage is checked again whenever a run resumes (each file's size and sampled blocks against its
# manifest), and what a command reports (the corrected adapter's path, the results table) in full, first.
family("finished artifacts trusted on resume")


def _flip(rel: str, at: int = 200, count: int = 16):
    """The issue's case: flip `count` bytes of a finished artifact's file and leave everything else as it was."""

    def build(env):
        run = env.copy_run()
        path = run / rel
        data = bytearray(path.read_bytes())
        at_ = min(at, len(data) - count)
        data[at_ : at_ + count] = bytes(b ^ 0xFF for b in data[at_ : at_ + count])
        path.write_bytes(bytes(data))
        return run

    return build


def _edit_run_json(mutate):
    def build(env):
        run = env.copy_run()
        _edit_json(run / "run.json", mutate)
        return run

    return build


RESUME_CASES = [  # (id, builder, command, pattern)
    (
        "flipped-corrected-adapter",
        _flip("correct/adapter/adapter_model.safetensors"),
        "run",
        r"correct/adapter/adapter_model\.safetensors does not match its SHA-256",
    ),
    ("flipped-emulator", _flip("emulator/emulator.safetensors", 5000), "run", r"emulator\.safetensors does not match"),
    (
        "flipped-calibration",
        _flip("calibrate/train/calibration.safetensors", 3000),
        "run",
        r"calibration\.safetensors does not match",
    ),
    (
        "flipped-emulator-adapter",
        _flip("finetune_emulator/adapter/adapter_model.safetensors"),
        "run",
        r"finetune_emulator/adapter/adapter_model\.safetensors does not match",
    ),
    (
        "flipped-evaluation",
        _flip("evaluate/original+corrected/evaluation.json", 30, 1),
        "evaluate",
        r"evaluation\.json does not match its SHA-256",
    ),
    (
        "flipped-corrected-adapter-correct",  # `emloc correct` prints the corrected adapter: checked in full first
        _flip("correct/adapter/adapter_model.safetensors"),
        "correct",
        r"adapter_model\.safetensors does not match its SHA-256",
    ),
    (
        "corrected-adapter-grown",
        lambda env: (lambda r: (r / "correct/adapter/adapter_model.safetensors").open("ab").write(b"\0" * 8) and r)(
            env.copy_run()
        ),
        "run",
        r"adapter_model\.safetensors does not match its SHA-256",
    ),
    (
        "run-json-ratio-edited",  # the case: the stored table describes the ratio-0.5 run
        _edit_run_json(lambda d: d["emulator"]["plan"].update(ratio=0.8)),
        "evaluate",
        r"emulator was produced with other settings than this run's \(emulator: \{'plan': \{'ratio': 0\.5.* there, "
        r"\{'plan': \{'ratio': 0\.8",
    ),
    (
        "run-json-ratio-edited-report",
        _edit_run_json(lambda d: d["emulator"]["plan"].update(ratio=0.8)),
        "report",
        r"results\.json was computed for other settings than run\.json holds now .*emulator",
    ),
    (
        "run-json-seed-edited",
        _edit_run_json(lambda d: d.update(seed=7)),
        "evaluate",
        r"was produced with other settings than this run's .*seed: 0 there, 7 here",
    ),
    (
        "run-json-limit-edited",
        _edit_run_json(lambda d: d["evaluation"].update(limit=5)),
        "evaluate",
        r"was produced with other settings than this run's .*'limit': 8",
    ),
]
for id_, build, command, pattern in RESUME_CASES:
    case(
        f"cli-{command}-resume-{id_}",
        pattern,
        cli=lambda env, b=build, c=command: _command(c, b(env), env),
        family="results of another run" if id_.startswith("run-json") else None,
    )

# One error path: a missing manifest is the same EmlocError from Run.verify and from every loader, also where it is
# one of the loaded artifact's inputs' (the issue's case: the corrected adapter's, under an evaluation).
# tests/unit/test_resume.py checks the messages word for word, for each artifact's own manifest too.
MISSING_MANIFEST = [  # (id, the artifact whose manifest goes, the call)
    ("eval_result-corrected", "correct/adapter", lambda run: run.eval_result("original+corrected")),
    ("results-corrected", "correct/adapter", lambda run: run.results()),
    ("eval_result-emulator", "emulator", lambda run: run.eval_result("emulator+lora")),
    ("drift-emulator", "emulator", lambda run: run.drift()),
    ("emulator-calibration", "calibrate/train", lambda run: run.emulator()),
    ("drift-heldout", "calibrate/heldout", lambda run: run.drift()),
    ("correction-heldout", "calibrate/heldout", lambda run: run.correction()),
    ("correction-adapter", "finetune_emulator/adapter", lambda run: run.correction()),
    ("eval_result-baseline", "finetune_original/adapter", lambda run: run.eval_result("original+lora")),
    ("results-evaluation", "evaluate/original", lambda run: run.results()),
]
family("a missing manifest, not one error")
for id_, rel, call in MISSING_MANIFEST:
    case(
        f"api-run-no-manifest-{id_}",
        rf"{re.escape(rel)} has no manifest\.json",
        api=lambda env, rel=rel, c=call: (lambda run: lambda: c(Run(run)))(_remove(f"{rel}/{MANIFEST}")(env)),
    )


# -------------------------------------------------------------------------- issue 30: --overwrite and the user's files
# --overwrite replaces a run, and only what emloc-nb wrote (scratch/ included: notebooks write it through the run): a
# file of the user's anywhere in the directory, inside emloc-nb's own folders too, or a link keeps the run as it is.
family("--overwrite over the user's files")


def _overwrite_over(place):
    def build(env):
        run = env.copy_run()
        place(run)
        return ["run", str(env.yaml(env.config(correction={"clamp": 1.0}))), "--run-dir", str(run), "--overwrite"]

    return build


USERS_FILES = [  # (id, what the user put there, the file named)
    ("notes-in-evaluate", lambda r: (r / "evaluate" / "notes.md").write_text("mine"), r"evaluate/notes\.md"),
    ("file-in-an-artifact", lambda r: (r / "emulator" / "mine.txt").write_text("mine"), r"emulator/mine\.txt"),
    ("file-in-spectra", lambda r: (r / "emulator" / "spectra" / "mine.txt").write_text("x"), r"spectra/mine\.txt"),
    ("file-in-stages", lambda r: (r / "stages" / "timing.csv").write_text("mine"), r"stages/timing\.csv"),
    (
        "folder-in-correct",
        lambda r: (r / "correct" / "mine").mkdir() or (r / "correct" / "mine" / "a.txt").write_text("x"),
        r"correct/mine/a\.txt",
    ),
    ("link-to-a-file", lambda r: (r / "evaluate" / "link.json").symlink_to(r / "run.json"), r"evaluate/link\.json"),
]
for id_, place, named in USERS_FILES:
    pattern = rf"holds \[.*{named}.*\], which emloc-nb did not write"
    case(f"cli-run-overwrite-{id_}", pattern, cli=_overwrite_over(place))


# ----------------------------------------------------------------------------- the checks themselves


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under `root` with a content hash; a run's lock file is its own business."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.name == ".lock":
            continue
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _check_message(message: str, pattern: str) -> None:
    assert "\n" not in message.strip(), f"not one line: {message!r}"
    assert len(message) <= MAX_MESSAGE + len("error: "), f"{len(message)} characters: {message[:300]!r}..."
    assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    assert FIX.search(message), f"no fix named in {message!r}"
    assert "Traceback" not in message


@pytest.fixture(scope="module")
def env_base(tiny_files, tiny_run):
    root, model, data = tiny_files
    run_09 = Run(root / "run09", tiny_run_config(model, data, emulator={"plan": {"ratio": 0.9}}))
    run_09.run_all(isolate=False, until="emulator")
    return model, data, tiny_run.dir, run_09.dir


@pytest.fixture
def env(env_base, tmp_path):
    model, data, complete, run_09 = env_base
    return Env(tmp_path, model, data, complete, run_09)


@pytest.mark.parametrize("c", [c for c in CASES if c.cli], ids=lambda c: c.id)
def test_cli(c: Case, env: Env, capsys):
    argv = c.cli(env)
    capsys.readouterr()
    before = _snapshot(env.tmp)
    code = cli(argv)
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1, (code, err[-2000:])
    assert len(errors) == 1, err
    _check_message(errors[0], c.problem)
    assert "Traceback" not in out + err
    assert _snapshot(env.tmp) == before


@pytest.mark.parametrize("c", [c for c in CASES if c.api], ids=lambda c: c.id)
def test_api(c: Case, env: Env):
    call = c.api(env)
    before = _snapshot(env.tmp)
    with pytest.raises(EmlocError) as caught:
        call()
    _check_message(str(caught.value), c.problem)
    assert _snapshot(env.tmp) == before


def test_the_matrix_covers_every_subcommand_and_entry_point():
    cli_cases = [c for c in CASES if c.cli]
    assert len(CASES) >= 150
    commands = {c.id.split("-")[1] for c in cli_cases}
    assert commands >= {"run", "build", "finetune", "correct", "evaluate", "report"}
    api_ids = " ".join(c.id for c in CASES if c.api)
    for entry in (
        "from_dict", "-load-", "api-run-", "load_task", "load_model", "collect_stats", "build_emulator", "finetune",
        "correct_lora", "evaluate", "drift", "load_adapter", "RankPlan", "CalibrationStats.load", "SpectrumTable.load",
        "DriftReport.load", "CorrectionReport.load", "EvalResult.load", "Emulator.load",
    ):  # fmt: skip
        assert entry in api_ids, entry


def test_a_byte_order_mark_is_read_not_refused(env):
    """Files some editors start with a UTF-8 byte-order mark read as the same examples and settings."""
    bom = b"\xef\xbb\xbf"
    plain = emloc_nb.load_task(env.data)
    for name, content in (
        ("bom.jsonl", env.data.read_bytes()),
        (
            "bom.csv",
            b"prompt,answer\n"
            + b"".join(
                f"{r['prompt']},{r['answer']}\n".encode() for r in map(json.loads, env.data.read_text().splitlines())
            ),
        ),
    ):
        (env.tmp / name).write_bytes(bom + content)
        task = emloc_nb.load_task(env.tmp / name)
        assert task.train.to_list() == plain.train.to_list(), name
    config = env.config(seed=3)
    (env.tmp / "c.yaml").write_bytes(bom + yaml.safe_dump(config).encode())
    (env.tmp / "c.json").write_bytes(bom + json.dumps(config).encode())
    for name in ("c.yaml", "c.json"):
        assert RunConfig.load(env.tmp / name).to_dict() == RunConfig.from_dict(config).to_dict(), name
    run = env.copy_run()
    (run / "run.json").write_bytes(bom + (run / "run.json").read_bytes())
    assert Run(run).config.to_dict() == Run(env.complete_run).config.to_dict()


def test_the_guarantees_state_the_matrix_counts():
    """docs/guarantees.md gives the number of cases, in all and per family: they are this file's."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "guarantees.md").read_text(encoding="utf-8")
    assert f"{len(CASES)} cases over every subcommand and public entry point" in text
    stated = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[1].isdigit():
            stated[cells[0]] = int(cells[1])
    counted = {}
    for c in CASES:
        counted[c.family] = counted.get(c.family, 0) + 1
    assert {f: stated.get(f) for f in counted} == counted
