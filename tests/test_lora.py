import contextlib
import json
import os
import warnings

import pytest
import torch
import torch.nn as nn

from lora import (LoRALinear, inject_lora, load_adapter, lora_disabled, lora_parameters, merge_lora,
                  save_adapter)
from conftest import edit_json

transformers = pytest.importorskip("transformers")


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """A fresh B is zero, which would hide any bug in the adapter path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_llama(path: str) -> nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


IDS = torch.tensor([[1, 5, 9, 42, 7, 100, 3, 64]])


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(IDS).logits


def test_fresh_adapter_is_identity_on_a_plain_module():
    model, x = tiny_mlp(), torch.randn(4, 16)
    before = model(x)
    assert inject_lora(model, r=4, alpha=8, targets=("0", "2")) == ["0", "2"]
    assert torch.equal(model(x), before)


def test_fresh_adapter_is_identity_on_llama(llama_dir):
    model = load_llama(llama_dir)
    before = logits(model)
    paths = inject_lora(model, r=4, alpha=8)
    assert len(paths) == 2 * 7
    assert torch.equal(logits(model), before)


def test_adapter_trains_in_float32_on_a_bf16_base():
    layer = LoRALinear(nn.Linear(16, 8, dtype=torch.bfloat16), r=4, alpha=8)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    assert layer.scaling == 2.0 and torch.count_nonzero(layer.lora_B.weight) == 0
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16  # the layer's output keeps the base's dtype
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32


def test_a_layer_injected_into_an_eval_model_is_in_eval_mode_so_dropout_is_off():
    model, x = tiny_mlp().eval(), torch.randn(4, 16)
    inject_lora(model, r=4, alpha=8, dropout=0.5, targets=("0", "2"))
    randomize_adapters(model)
    assert not any(m.training for m in model.modules())
    assert torch.equal(model(x), model(x))


def test_merged_layer_matches_unmerged_output():
    model, x = tiny_mlp(), torch.randn(4, 16)
    inject_lora(model, r=4, alpha=8, targets=("0", "2"))
    randomize_adapters(model)
    with torch.no_grad():
        unmerged = model(x)
        merged = merge_lora(model)(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_merge_returns_a_plain_linear_and_leaves_the_lora_layer_untouched():
    layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    base = layer.base_layer.weight.clone()
    merged = layer.merge()
    assert type(merged) is nn.Linear and merged.bias is layer.base_layer.bias
    assert torch.equal(layer.base_layer.weight, base)
    assert torch.equal(layer.merge().weight, merged.weight)  # idempotent


def test_merge_lora_leaves_no_lora_layer_in_the_model():
    model = tiny_mlp()
    inject_lora(model, r=4, alpha=8, targets=("0", "2"))
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(model[i]) is nn.Linear for i in (0, 2))


def test_only_adapter_parameters_get_gradients(llama_dir):
    model = load_llama(llama_dir)
    inject_lora(model, r=4, alpha=8)
    randomize_adapters(model)  # with B = 0, A would get no gradient either
    model(IDS).logits.sum().backward()
    adapter = {id(p) for p in lora_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) in adapter:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_lora_disabled_gives_the_base_model_exactly(llama_dir):
    model = load_llama(llama_dir)
    base = logits(model)
    inject_lora(model, r=4, alpha=8)
    randomize_adapters(model)
    student = logits(model)
    assert not torch.allclose(student, base)
    with lora_disabled(model):
        assert torch.equal(logits(model), base)
    assert torch.equal(logits(model), student)


def test_lora_disabled_restores_each_layers_previous_state_even_after_an_exception():
    model = tiny_mlp()
    inject_lora(model, r=4, alpha=8, targets=("0", "2"))
    model[2].enabled = False
    with pytest.raises(RuntimeError):
        with lora_disabled(model):
            assert not model[0].enabled and not model[2].enabled
            raise RuntimeError("boom")
    assert model[0].enabled and not model[2].enabled


def test_save_then_load_gives_identical_logits(llama_dir, tmp_path):
    model = load_llama(llama_dir)
    inject_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    randomize_adapters(model)
    save_adapter(model, str(tmp_path), base_model_name_or_path=llama_dir)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]

    fresh = load_llama(llama_dir)
    config = load_adapter(fresh, str(tmp_path))
    assert config["r"] == 4 and config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert torch.equal(logits(fresh), logits(model))


def test_load_adapter_refuses_an_adapter_whose_keys_do_not_match(llama_dir, tmp_path):
    model = load_llama(llama_dir)
    inject_lora(model, r=4, alpha=8, targets=("q_proj",))
    save_adapter(model, str(tmp_path))
    other = load_llama(llama_dir)
    inject_lora(other, r=4, alpha=8, targets=("q_proj", "k_proj"))
    with pytest.raises(ValueError, match="missing .*k_proj"):
        load_adapter(other, str(tmp_path))


def test_a_key_mismatch_names_the_first_few_keys_and_the_counts_in_one_short_line(tmp_path):
    def tiny(config_cls, model_cls, **kw):
        torch.manual_seed(0)
        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(
            vocab_size=32, hidden_size=16, num_attention_heads=2, max_position_embeddings=16, **kw))
    opt = tiny("OPTConfig", "OPTForCausalLM", ffn_dim=32, num_hidden_layers=2, word_embed_proj_dim=16)
    inject_lora(opt, r=4, alpha=8, targets=("q_proj", "v_proj"))
    save_adapter(opt, str(tmp_path))
    deep_llama = tiny("LlamaConfig", "LlamaForCausalLM", intermediate_size=32, num_hidden_layers=24)
    with pytest.raises(ValueError) as caught:
        load_adapter(deep_llama, str(tmp_path))
    message = str(caught.value)
    assert message.startswith("load_adapter: adapter keys do not match the model: "
                              "96 missing (model.layers.0.self_attn.q_proj.lora_A.weight, "), message
    assert "8 unexpected (model.decoder.layers.0.self_attn.q_proj.lora_A.weight, " in message, message
    assert len(message) < 500 and "\n" not in message, message


def test_inject_lora_without_a_matching_target_raises_naming_the_targets():
    with pytest.raises(ValueError, match="no_such_proj"):
        inject_lora(tiny_mlp(), r=4, alpha=8, targets=("no_such_proj",))


def test_peft_loads_our_adapter_with_identical_weights_and_logits(llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    ours = load_llama(llama_dir)
    inject_lora(ours, r=4, alpha=16)
    randomize_adapters(ours)
    save_adapter(ours, str(tmp_path), base_model_name_or_path=llama_dir)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(load_llama(llama_dir), str(tmp_path)).eval()
    assert not [w for w in caught if "key" in str(w.message).lower()], [str(w.message) for w in caught]

    with open(tmp_path / "adapter_config.json") as f:
        assert json.load(f)["target_modules"] == sorted(
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    loaded = peft.get_peft_model_state_dict(theirs)
    expected = {f"base_model.model.{name}": p for name, p in ours.named_parameters() if "lora_" in name}
    assert loaded.keys() == expected.keys()
    for key, p in expected.items():
        assert torch.equal(loaded[key], p), key
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-4, rtol=0)


def test_lm_head_can_be_a_target_while_tied_to_the_embedding():
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    before = logits(model)
    assert inject_lora(model, r=4, alpha=8, targets=("lm_head",)) == ["lm_head"]
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight  # still tied, frozen
    assert torch.equal(logits(model), before)


def remove_weights(folder):
    os.remove(os.path.join(folder, "adapter_model.safetensors"))


def truncate_weights(folder):
    with open(os.path.join(folder, "adapter_model.safetensors"), "r+b") as f:
        f.truncate(100)


def config_text(text):
    def write(folder):
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            f.write(text)
    return write


@pytest.mark.parametrize("break_it, words", [
    (remove_weights, "cannot read .*adapter_model.safetensors"),
    (truncate_weights, "cannot read .*adapter_model.safetensors"),
    (config_text("{not json"), "cannot read .*adapter_config.json"),
    (config_text('{"peft_type": "LORA", "r": 4}'), "lacks lora_alpha, target_modules"),
])
def test_a_broken_adapter_folder_raises_a_value_error_naming_the_problem(llama_dir, tmp_path, break_it, words):
    model = load_llama(llama_dir)
    inject_lora(model, r=4, alpha=8, targets=("q_proj",))
    save_adapter(model, str(tmp_path))
    break_it(str(tmp_path))
    with pytest.raises(ValueError, match=words):
        load_adapter(load_llama(llama_dir), str(tmp_path))


@pytest.mark.parametrize("field, value, words", [
    ("r", "32", "r must be an integer >= 1, not '32'"),
    ("r", 0, "r must be an integer >= 1"),
    ("r", True, "r must be an integer >= 1"),
    ("r", 4.0, "r must be an integer >= 1"),
    ("lora_alpha", None, "lora_alpha must be a positive number, not None"),
    ("lora_alpha", True, "lora_alpha must be a positive number"),
    ("lora_alpha", -8, "lora_alpha must be a positive number"),
    ("target_modules", "q_proj", "target_modules must be a list of module names, not a regex"),
    ("target_modules", ["q_proj", 3], "target_modules must be a list of module names"),
    ("lora_dropout", "x", r"lora_dropout must be a number in \[0, 1\), not 'x'"),
    ("lora_dropout", 1.0, r"lora_dropout must be a number in \[0, 1\)"),
])
def test_a_wrongly_typed_config_field_is_refused_by_name_before_the_model_is_touched(
        llama_dir, tmp_path, field, value, words):
    model = load_llama(llama_dir)
    inject_lora(model, r=4, alpha=8, targets=("q_proj",))
    save_adapter(model, str(tmp_path))
    edit_json(str(tmp_path / "adapter_config.json"), lambda config: {**config, field: value})
    target = load_llama(llama_dir)
    with pytest.raises(ValueError, match=words) as caught:
        load_adapter(target, str(tmp_path))
    assert "\n" not in str(caught.value)
    assert not [m for m in target.modules() if isinstance(m, LoRALinear)]


def test_an_adapter_that_fails_to_load_leaves_the_model_as_it_was(llama_dir, tmp_path):
    model = load_llama(llama_dir)
    inject_lora(model, r=4, alpha=8, targets=("q_proj",))
    save_adapter(model, str(tmp_path))
    edit_json(str(tmp_path / "adapter_config.json"), lambda config: {**config, "r": 8})  # the tensors are rank 4
    target = load_llama(llama_dir)
    before = logits(target)
    with pytest.raises(ValueError, match="has shape"):
        load_adapter(target, str(tmp_path))
    assert not [m for m in target.modules() if isinstance(m, LoRALinear)]
    assert all(p.requires_grad for p in target.parameters())  # inject_lora froze them; they are back
    assert torch.equal(logits(target), before)


def test_a_wrapped_layer_reads_through_to_the_linear_it_wraps():
    # transformers reads get_output_embeddings().weight, our generate reads sizes: both see the base layer.
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, r=4, alpha=8)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert (layer.in_features, layer.out_features) == (16, 8)
    assert {name for name, _ in layer.named_parameters()} == {
        "base_layer.weight", "base_layer.bias", "lora_A.weight", "lora_B.weight"}  # no second copy


def test_rank_zero_is_refused():
    with pytest.raises(ValueError, match="rank r must be at least 1"):
        LoRALinear(nn.Linear(16, 8), r=0, alpha=8)


def test_adapters_on_or_off_trace_as_one_graph_for_torch_compile():
    model, x = tiny_mlp(), torch.randn(4, 16)
    inject_lora(model, r=4, alpha=8, targets=("0", "2"), dropout=0.1)
    model.train()  # dropout on
    for switch in (contextlib.nullcontext, lora_disabled):
        with switch(model):
            traced = torch._dynamo.explain(model)(x)
        assert (traced.graph_count, traced.graph_break_count) == (1, 0), traced.break_reasons
