import pytest
import torch

from emloc_nb.scoring import answer_nll, choice_logprobs
from emloc_nb.structure import model_inputs
from emloc_nb.tokens import IGNORE_INDEX, batches, encode_example


def _naive_choice_logprob(model, tok, messages, choice):
    enc = encode_example(tok, messages, choice)
    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        logp = model(input_ids=ids).logits.float().log_softmax(-1)[0]
    labels = torch.tensor(enc["labels"])
    positions = (labels != IGNORE_INDEX).nonzero().flatten()
    return float(sum(logp[p - 1, labels[p]] for p in positions))


def test_cached_choice_scoring_equals_full_sequences(tiny, toy_task):
    model, tok = tiny
    prompts = list(toy_task.test["messages"][:5])
    choices = ["yes", "no", "maybe not"]
    scores, counts = choice_logprobs(model, tok, prompts, choices)
    for i, messages in enumerate(prompts):
        for j, choice in enumerate(choices):
            assert scores[i, j].item() == pytest.approx(_naive_choice_logprob(model, tok, messages, choice), abs=2e-4)


def test_answer_nll_only_counts_answer_tokens(llama, toy_task):
    model, tok = llama
    batch = batches(tok, toy_task.test, batch_size=4, limit=4)[0]
    nll, mask = answer_nll(model, batch)
    assert int(mask.sum()) == int((batch["labels"] != IGNORE_INDEX).sum())
    with torch.no_grad():
        loss = model(**model_inputs(model, batch), labels=batch["labels"]).loss
    assert float(nll[mask].mean()) == pytest.approx(float(loss), rel=1e-4)
