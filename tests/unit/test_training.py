import pytest
import torch
from safetensors.torch import load_file

from emloc_nb import EmlocError, LoraSpec, TrainSpec, finetune, finetune_hf, hf_trainer, tiny_model

from ..conftest import FAST, quick_finetune, tiny_emulator


def test_lora_on_the_emulator_uses_the_original_names(toy_task, tmp_path):
    model, tok, emulator = tiny_emulator(toy_task)
    events = []
    result = quick_finetune(
        emulator.model, tok, toy_task, tmp_path / "emu", LoraSpec(r=4, alpha=8), steps=3, callbacks=[events.append]
    )
    on_emulator = set(load_file(str(result.adapter_dir / "adapter_model.safetensors")))
    result = quick_finetune(model, tok, toy_task, tmp_path / "orig", LoraSpec(r=4, alpha=8), steps=3)
    on_original = set(load_file(str(result.adapter_dir / "adapter_model.safetensors")))
    assert on_emulator == on_original and len(on_original) == 2 * 14
    assert [e["step"] for e in events] == [1, 2, 3] and all("loss" in e and "lr" in e for e in events)
    assert not any(".down.lora" in k or ".up.lora" in k for k in on_emulator)
    # training leaves the emulator as it was
    assert not any("lora" in n for n, _ in emulator.model.named_parameters())


def test_training_lowers_the_loss(toy_task, tmp_path):
    model, tok = tiny_model("llama")
    result = finetune(
        model,
        tok,
        toy_task,
        tmp_path / "run",
        lora=LoraSpec(r=8, alpha=16, dropout=0.0),
        config=TrainSpec(steps=30, checkpoint_every=0, batch_size=8, lr=1e-2, warmup_steps=2),
        progress=False,
    )
    first = sum(h["loss"] for h in result.history[:3]) / 3
    last = sum(h["loss"] for h in result.history[-3:]) / 3
    assert last < 0.7 * first


def test_resumed_run_matches_an_uninterrupted_one(toy_task, tmp_path):
    model, tok, emulator = tiny_emulator(toy_task)
    config = TrainSpec(steps=6, checkpoint_every=2, **FAST)
    lora = LoraSpec(r=4, alpha=8, dropout=0.1)  # dropout makes the RNG state part of what must resume
    whole = finetune(emulator.model, tok, toy_task, tmp_path / "whole", lora=lora, config=config, progress=False)
    part = finetune(
        emulator.model, tok, toy_task, tmp_path / "parts", lora=lora, config=config, stop_after=3, progress=False
    )
    assert len(part.history) == 3 and not (tmp_path / "parts" / "adapter").exists()
    assert (tmp_path / "parts" / "checkpoint" / "state.safetensors").is_file()
    resumed = finetune(emulator.model, tok, toy_task, tmp_path / "parts", lora=lora, config=config, progress=False)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in whole.history], rel=1e-6)
    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)
    assert not (tmp_path / "parts" / "checkpoint").exists()


def test_stop_after_keeps_the_progress_without_periodic_checkpoints(toy_task, tmp_path):
    model, tok = tiny_model("llama")
    config = TrainSpec(steps=4, checkpoint_every=0, **FAST)
    part = finetune(
        model, tok, toy_task, tmp_path / "run", lora=LoraSpec(r=2, alpha=2), config=config, stop_after=2, progress=False
    )
    rest = finetune(model, tok, toy_task, tmp_path / "run", lora=LoraSpec(r=2, alpha=2), config=config, progress=False)
    assert len(part.history) == 2 and [h["step"] for h in rest.history] == [1, 2, 3, 4]
    assert rest.history[:2] == part.history


def test_a_checkpoint_or_adapter_of_another_run_is_refused(toy_task, tmp_path):
    model, tok, emulator = tiny_emulator(toy_task)
    config = TrainSpec(steps=4, checkpoint_every=0, **FAST)
    quick_finetune(emulator.model, tok, toy_task, tmp_path / "run", LoraSpec(r=2, alpha=2), steps=4, stop_after=2)
    with pytest.raises(EmlocError, match="another fine-tuning run.*base_fingerprint"):  # same names, other weights
        finetune(model, tok, toy_task, tmp_path / "run", lora=LoraSpec(r=2, alpha=2), config=config, progress=False)
    with pytest.raises(EmlocError, match="another fine-tuning run.*train"):
        finetune(
            emulator.model,
            tok,
            toy_task,
            tmp_path / "run",
            lora=LoraSpec(r=2, alpha=2),
            config=TrainSpec(steps=4, checkpoint_every=0, batch_size=8, lr=1.0, warmup_steps=1),
            progress=False,
        )
    finetune(
        emulator.model, tok, toy_task, tmp_path / "run", lora=LoraSpec(r=2, alpha=2), config=config, progress=False
    )
    with pytest.raises(EmlocError, match="another fine-tuning run.*lora"):  # a finished adapter is not reused either
        finetune(
            emulator.model, tok, toy_task, tmp_path / "run", lora=LoraSpec(r=4, alpha=2), config=config, progress=False
        )


def test_a_checkpoint_is_not_resumed_in_another_dtype(toy_task, tmp_path):
    # The fingerprint is the same in float32 and bf16; an adapter trained half in each would be neither's.
    model, tok = tiny_model("llama")
    quick_finetune(model, tok, toy_task, tmp_path / "run", LoraSpec(r=2, alpha=2), steps=4, stop_after=2)
    with pytest.raises(EmlocError, match="another fine-tuning run.*dtype"):
        quick_finetune(model.to(torch.bfloat16), tok, toy_task, tmp_path / "run", LoraSpec(r=2, alpha=2), steps=4)


def test_checkpointing_a_model_that_cannot_is_one_line_and_leaves_no_lora(toy_task, tmp_path, monkeypatch):
    model, tok = tiny_model("llama")
    monkeypatch.setattr(type(model), "supports_gradient_checkpointing", False)
    config = TrainSpec(steps=2, checkpoint_every=0, gradient_checkpointing=True, **FAST)
    with pytest.raises(EmlocError, match="cannot recompute its activations.*gradient_checkpointing: false"):
        finetune(model, tok, toy_task, tmp_path / "a", lora=LoraSpec(r=2, alpha=2), config=config, progress=False)
    assert not any("lora" in n for n, _ in model.named_modules())
    config = TrainSpec(steps=1, checkpoint_every=0, gradient_checkpointing=False, **FAST)
    again = finetune(model, tok, toy_task, tmp_path / "b", lora=LoraSpec(r=2, alpha=2), config=config, progress=False)
    assert (again.adapter_dir / "adapter_model.safetensors").is_file()


def test_a_failed_run_leaves_the_model_without_lora(toy_task, tmp_path):
    model, tok = tiny_model("llama")

    def interrupt(event):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quick_finetune(model, tok, toy_task, tmp_path / "a", LoraSpec(r=2, alpha=2), steps=3, callbacks=[interrupt])
    assert not any("lora" in n for n, _ in model.named_modules())
    again = quick_finetune(model, tok, toy_task, tmp_path / "b", LoraSpec(r=2, alpha=2), steps=1)
    assert (again.adapter_dir / "adapter_model.safetensors").is_file()


def test_hf_trainer_runs_with_the_same_collator(toy_task, tmp_path):
    model, tok, emulator = tiny_emulator(toy_task)
    events = []
    trainer = hf_trainer(
        emulator.model,
        tok,
        toy_task,
        tmp_path / "hf",
        lora=LoraSpec(r=4, alpha=8),
        config=TrainSpec(steps=3, checkpoint_every=0, **FAST),
        callbacks=[events.append],
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert [e["step"] for e in events] == [1, 2, 3]


def test_gradient_checkpointing_gives_the_same_weights(toy_task, tmp_path):
    model, tok, emulator = tiny_emulator(toy_task)
    lora = LoraSpec(r=4, alpha=8, dropout=0.0)
    plain = finetune(
        emulator.model,
        tok,
        toy_task,
        tmp_path / "plain",
        lora=lora,
        config=TrainSpec(steps=3, checkpoint_every=0, **FAST),
        progress=False,
    )
    recomputed = finetune(
        emulator.model,
        tok,
        toy_task,
        tmp_path / "gc",
        lora=lora,
        config=TrainSpec(steps=3, checkpoint_every=0, gradient_checkpointing=True, **FAST),
        progress=False,
    )
    a = load_file(str(plain.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(recomputed.adapter_dir / "adapter_model.safetensors"))
    # bitwise: the default turned checkpointing on after the ablation tables were made without it
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in emulator.model.modules())


def test_hf_trainer_resumes_from_its_safetensors_checkpoint_to_the_same_weights(toy_task, tmp_path):
    model, tok, emulator = tiny_emulator(toy_task)
    config = TrainSpec(steps=6, checkpoint_every=2, **FAST)
    lora = LoraSpec(r=4, alpha=8, dropout=0.1)  # dropout makes the RNG state part of what must resume
    whole = finetune_hf(emulator.model, tok, toy_task, tmp_path / "whole", lora=lora, config=config)
    part = finetune_hf(emulator.model, tok, toy_task, tmp_path / "parts", lora=lora, config=config, stop_after=3)
    assert len(part.history) == 3 and not (tmp_path / "parts" / "adapter").exists()
    checkpoint = tmp_path / "parts" / "checkpoint"
    assert {p.name for p in checkpoint.iterdir()} == {
        "state.safetensors",
        "state.json",
        "trainer_state.json",
        "manifest.json",
    }  # the built-in loop's format, and no pickle (optimizer.pt, rng_state.pth, training_args.bin)
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl")]
    resumed = finetune_hf(emulator.model, tok, toy_task, tmp_path / "parts", lora=lora, config=config)
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in whole.history], rel=1e-6)
    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)
    assert not checkpoint.exists()


def test_non_finite_lora_weights_stop_training_and_write_no_adapter(toy_task, tmp_path, monkeypatch):
    model, tok = tiny_model("llama")
    real_step = torch.optim.AdamW.step

    def overflowing_step(self, *args, **kwargs):  # an update that overflows one weight, after a finite loss
        out = real_step(self, *args, **kwargs)
        self.param_groups[0]["params"][0].data[0, 0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    config = TrainSpec(steps=3, checkpoint_every=0, **FAST)
    with pytest.raises(EmlocError, match="became non-finite.*after step 1.*Lower the learning rate"):
        finetune(model, tok, toy_task, tmp_path / "run", lora=LoraSpec(r=2, alpha=2), config=config, progress=False)
    assert not (tmp_path / "run" / "adapter").exists()
    assert not any("lora" in n for n, _ in model.named_modules())


def test_micro_batches_give_the_adapter_of_the_full_batch(toy_task, tmp_path):
    model, tok, emulator = tiny_emulator(toy_task)
    lora = LoraSpec(r=4, alpha=8)
    results = {}
    for micro in (None, 2, 1):
        config = TrainSpec(steps=4, checkpoint_every=0, micro_batch_size=micro, **FAST)
        results[micro] = finetune(
            emulator.model, tok, toy_task, tmp_path / f"micro-{micro}", lora=lora, config=config, progress=False
        )
    full = load_file(str(results[None].adapter_dir / "adapter_model.safetensors"))
    for micro in (2, 1):
        split = load_file(str(results[micro].adapter_dir / "adapter_model.safetensors"))
        assert all(torch.allclose(full[k], split[k], rtol=1e-4, atol=1e-6) for k in full)
        assert [h["loss"] for h in results[micro].history] == pytest.approx(
            [h["loss"] for h in results[None].history], rel=1e-5
        )
    assert any(v.abs().max() > 0 for k, v in full.items() if "lora_B" in k)  # it trained: B left zero


def test_bf16_frozen_weights_train_with_fp32_lora_weights(toy_task, tmp_path):
    model, tok = tiny_model("llama")
    config = TrainSpec(steps=20, checkpoint_every=0, frozen_dtype="bfloat16", **FAST)
    with pytest.raises(EmlocError, match="frozen_dtype='bfloat16'.*float32"):  # a float32 model is not converted here
        finetune(model, tok, toy_task, tmp_path / "refused", lora=LoraSpec(r=4, alpha=8), config=config, progress=False)
    model = model.to(torch.bfloat16)
    events = []
    result = finetune(
        model,
        tok,
        toy_task,
        tmp_path / "bf16",
        lora=LoraSpec(r=4, alpha=8),
        config=config,
        callbacks=[events.append],
        progress=False,
    )
    seen = [e["loss"] for e in events]
    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # the frozen weights stay as loaded
    assert all(torch.isfinite(torch.tensor(seen))) and sum(seen[-3:]) < 0.8 * sum(seen[:3])


def test_the_lora_weights_are_fp32_while_training_on_bf16_weights(toy_task):
    from emloc_nb.lora import attach_lora

    model, _ = tiny_model("llama")
    peft_model = attach_lora(model.to(torch.bfloat16), LoraSpec(r=4, alpha=8))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    frozen = [p for p in peft_model.parameters() if not p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    peft_model.unload()


def test_16_bit_weights_on_the_cpu_train_on_batches_padded_to_few_lengths(toy_task, tmp_path, monkeypatch):
    """oneDNN caches kernels per input shape for bf16: each new length cost memory (transients.md, item 7)."""
    import emloc_nb.training
    from emloc_nb.models import length_multiple
    from emloc_nb.scoring import answer_nll
    from emloc_nb.tokens import collator_for, tokenize

    model, tok = tiny_model("llama")
    assert length_multiple(model) == 1  # float32 (MKL) keeps no per-shape cache: no padding to pay for
    rows = tokenize(tok, toy_task.train.select(range(3)), max_length=256).to_list()
    plain, padded = collator_for(tok)(rows), collator_for(tok, 32)(rows)
    assert plain["input_ids"].shape[1] % 32 and padded["input_ids"].shape[1] % 32 == 0
    with torch.no_grad():  # left padding with position ids over real tokens: the same losses
        (nll, mask), (nll_padded, mask_padded) = answer_nll(model, plain), answer_nll(model, padded)
    assert torch.allclose(nll[mask], nll_padded[mask_padded], atol=1e-5)

    model = model.to(torch.bfloat16)
    assert length_multiple(model) == 32
    widths = []
    real_collator_for = emloc_nb.training.collator_for

    def spy(tokenizer, multiple=1):
        collate = real_collator_for(tokenizer, multiple)
        return lambda features: widths.append(collate(features)["input_ids"].shape[1]) or collate(features)

    monkeypatch.setattr(emloc_nb.training, "collator_for", spy)
    config = TrainSpec(steps=2, checkpoint_every=0, frozen_dtype="bfloat16", micro_batch_size=1, **FAST)
    finetune(model, tok, toy_task, tmp_path / "bf16", lora=LoraSpec(r=2, alpha=2), config=config, progress=False)
    assert widths and all(w % 32 == 0 for w in widths)
