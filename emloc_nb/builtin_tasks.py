"""The built-in tasks, from files that ship inside PyPI distributions (fetched once, hash-checked).

Movie-review sentiment (a choice between two answers, the default) and word analogies
(a one-word answer scored by exact match).
"""

from __future__ import annotations

import io
import logging
import tarfile
import zipfile
from pathlib import Path

from datasets import Dataset

from .atomic import atomic_path
from .fetch import cache_dir, pip_download
from .tasks import MOVIE_SENTIMENT, WORD_ANALOGIES, Task, three_way_split

log = logging.getLogger(__name__)
_VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
_VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_MOVIE_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
_MOVIE_PROMPT = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\nReview: {text}"
# gensim's copy of Mikolov et al.'s analogy questions; the wheel of one platform, for a stable hash.
_GENSIM = "gensim==4.4.0"
_GENSIM_SHA256 = "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8"
_GENSIM_TAGS = (
    "--platform",
    "manylinux_2_28_x86_64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
)
_ANALOGY_MEMBER = "gensim/test/test_data/questions-words.txt"
_ANALOGY_SECTIONS = ("family", "gram")  # relations a small model can learn; the capitals and currencies need facts
_ANALOGY_PROMPT = "Complete the analogy with one word.\n\n{a} is to {b} as {c} is to"


def movie_reviews_file() -> Path:
    """The Rotten Tomatoes snippets of VADER's ground truth, fetched once from the vaderSentiment sdist."""
    target = cache_dir() / "data" / "movieReviewSnippets_GroundTruth.txt"
    if target.is_file():
        return target
    log.info("Fetching the movie-review data from the vaderSentiment==3.3.2 source distribution")
    with (
        pip_download(
            "vaderSentiment==3.3.2",
            sdist=True,
            sha256=_VADER_SHA256,
            hint=f"place movieReviewSnippets_GroundTruth.txt at {target} by hand",
        ) as sdist,
        tarfile.open(sdist) as outer,
    ):
        inner_bytes = outer.extractfile(_VADER_INNER).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        text = inner.extractfile(_MOVIE_MEMBER).read()
    with atomic_path(target) as tmp_path:
        tmp_path.write_bytes(text)
    return target


def movie_sentiment(
    *, test_size: float | int = 1000, validation_size: float | int = 500, threshold: float = 0.5, seed: int = 0
) -> Task:
    """Movie-review snippets with |mean human rating| > threshold, labelled positive/negative."""
    rows = []
    for line in movie_reviews_file().read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        rating, text = float(parts[1]), parts[2].strip()
        if abs(rating) > threshold and text:
            rows.append(
                {
                    "messages": [{"role": "user", "content": _MOVIE_PROMPT.format(text=text)}],
                    "answer": "positive" if rating > 0 else "negative",
                    "rating": rating,
                }
            )
    train, validation, test = three_way_split(
        Dataset.from_list(rows), test_size=test_size, validation_size=validation_size, seed=seed
    )
    return Task(
        MOVIE_SENTIMENT,
        train,
        validation,
        test,
        choices=["positive", "negative"],
        meta={
            "source": "vaderSentiment==3.3.2 movieReviewSnippets_GroundTruth.txt",
            "threshold": threshold,
            "seed": seed,
        },
    )


def analogy_questions_file() -> Path:
    """Mikolov et al.'s word-analogy questions, fetched once from the gensim wheel (where they ship as test data)."""
    target = cache_dir() / "data" / "questions-words.txt"
    if target.is_file():
        return target
    log.info("Fetching the word-analogy questions from the %s wheel", _GENSIM)
    hint = f"place {Path(_ANALOGY_MEMBER).name} (from the {_GENSIM} wheel) at {target} by hand"
    with (
        pip_download(_GENSIM, sdist=False, sha256=_GENSIM_SHA256, hint=hint, wheel_tags=_GENSIM_TAGS) as wheel,
        zipfile.ZipFile(wheel) as z,
        atomic_path(target) as tmp_path,
    ):
        tmp_path.write_bytes(z.read(_ANALOGY_MEMBER))
    return target


def word_analogies(*, test_size: float | int = 1000, validation_size: float | int = 500, seed: int = 0) -> Task:
    """'a is to b as c is to ?' over the family and grammar sections; the answer is one word, scored by exact match."""
    rows, section = [], ""
    for line in analogy_questions_file().read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            section = line[1:].strip()
        elif section.startswith(_ANALOGY_SECTIONS) and len(words := line.split()) == 4:
            a, b, c, d = words
            rows.append(
                {
                    "messages": [{"role": "user", "content": _ANALOGY_PROMPT.format(a=a, b=b, c=c)}],
                    "answer": d,
                    "section": section,
                }
            )
    train, validation, test = three_way_split(
        Dataset.from_list(rows), test_size=test_size, validation_size=validation_size, seed=seed
    )
    meta = {"source": f"{_GENSIM} {_ANALOGY_MEMBER}", "sections": list(_ANALOGY_SECTIONS), "seed": seed}
    return Task(WORD_ANALOGIES, train, validation, test, choices=None, meta=meta)


BUILT_IN = {MOVIE_SENTIMENT: movie_sentiment, WORD_ANALOGIES: word_analogies}
