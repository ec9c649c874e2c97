import pytest

from emloc_nb import EmlocError, LoraSpec, load_adapter, tiny_model
from emloc_nb.lora import attach_lora, lora_factors, peft_config

from ..conftest import quick_finetune, tiny_emulator


def test_peft_config_targets_every_block_linear_of_either_model(toy_task):
    model, tok, emulator = tiny_emulator(toy_task)
    for net in (model, emulator.model):
        config = peft_config(LoraSpec(r=2, alpha=4), net)
        assert sorted(config.target_modules) == [
            "down_proj",
            "gate_proj",
            "k_proj",
            "o_proj",
            "q_proj",
            "up_proj",
            "v_proj",
        ]
    with pytest.raises(EmlocError, match="lora.r=0 must be ≥ 1"):
        LoraSpec(r=0)
    with pytest.raises(EmlocError, match="Could not attach"):
        attach_lora(model, LoraSpec(targets=["no_such_layer"]))


def test_load_adapter_names_a_missing_or_unchecked_adapter(toy_task, tmp_path):
    model, tok = tiny_model("llama")
    with pytest.raises(EmlocError, match="adapter_config.json is missing"):
        load_adapter(model, tmp_path / "nothing-here")
    result = quick_finetune(model, tok, toy_task, tmp_path / "run", LoraSpec(r=2, alpha=2), steps=1)
    (result.adapter_dir / "emloc.json").unlink()
    with pytest.raises(EmlocError, match=r"lacks \['emloc.json'\]"):
        load_adapter(model, result.adapter_dir, check_base=False)


def test_adapter_refuses_another_base(toy_task, tmp_path):
    model, tok, emulator = tiny_emulator(toy_task)
    result = quick_finetune(emulator.model, tok, toy_task, tmp_path / "emu", LoraSpec(r=2, alpha=2), steps=1)
    with pytest.raises(EmlocError, match="fingerprint"):
        load_adapter(model, result.adapter_dir)
    naive = load_adapter(model, result.adapter_dir, check_base=False)  # the deliberate naive transfer
    assert len(lora_factors(naive)) == 14
    naive.unload()


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_is_read_from_peft(toy_task, tmp_path, rslora):
    model, tok, emulator = tiny_emulator(toy_task)
    spec = LoraSpec(r=4, alpha=6, rslora=rslora)
    result = quick_finetune(emulator.model, tok, toy_task, tmp_path / "emu", spec, steps=1)
    peft_model = load_adapter(emulator.model, result.adapter_dir)
    scalings = [s for _, _, s in lora_factors(peft_model).values()]
    peft_model.unload()
    assert scalings == pytest.approx([spec.scaling()] * 14)
    assert spec.scaling() == pytest.approx(6 / (2 if rslora else 4))
