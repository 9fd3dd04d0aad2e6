"""model.py against the reference implementation (transformers) on tiny random checkpoints."""

import os
import re
import subprocess
import sys

import pytest
import torch

import model as m
from conftest import edit_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_logits_match(ours, hf, ids: torch.Tensor) -> None:
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_logits_match_transformers(tiny):
    path, hf = tiny
    ours, _, _ = m.load(path, device="cpu", dtype=torch.float32)
    ids = torch.tensor([random_ids(40, hf.config.vocab_size, 0), random_ids(40, hf.config.vocab_size, 1)])
    assert_logits_match(ours, hf, ids)


def test_no_mask_is_the_same_attention_as_an_all_ones_mask(tiny):
    # Without a mask SDPA runs plain causal attention (the fast path on a GPU); with one, our explicit mask.
    path, _ = tiny
    ours, _, _ = m.load(path, device="cpu", dtype=torch.float32)
    ids = torch.tensor([random_ids(30, ours.config.vocab_size, 4), random_ids(30, ours.config.vocab_size, 5)])
    with torch.no_grad():
        assert (ours(ids) - ours(ids, torch.ones_like(ids))).abs().max().item() <= 1e-5


def test_repeated_kv_heads_give_the_grouped_heads_result(tiny, monkeypatch):
    # On CUDA with a mask or in float32, k/v heads are repeated for SDPA; elsewhere they stay grouped.
    path, _ = tiny
    ours, _, _ = m.load(path, device="cpu", dtype=torch.float32)
    ids = torch.tensor([random_ids(20, ours.config.vocab_size, 6), random_ids(20, ours.config.vocab_size, 7)])
    padded = torch.ones_like(ids)
    padded[1, :6] = 0  # left padding in one row, so the mask is a real one
    with torch.no_grad():
        grouped = ours(ids, padded)
        monkeypatch.setattr(m, "sdpa_takes_grouped_heads", lambda q, mask: False)
        repeated = ours(ids, padded)
    assert (grouped - repeated).abs().max().item() <= 1e-5


def test_greedy_generation_matches_transformers(tiny):
    path, hf = tiny
    ours, _, _ = m.load(path, device="cpu", dtype=torch.float32)
    prompt = random_ids(7, hf.config.vocab_size, 2)
    hf.generation_config.eos_token_id = None  # compare 20 tokens, wherever an end-of-text falls
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, 7:].tolist()
    got = m.generate(ours, [prompt], max_new_tokens=20)[0]
    assert got == expected


def test_kv_cached_decoding_equals_full_forward(tiny):
    path, _ = tiny
    ours, _, _ = m.load(path, device="cpu", dtype=torch.float32)
    ids = torch.tensor([random_ids(24, ours.config.vocab_size, 3)])
    with torch.no_grad():
        full = ours(ids)
        cache = m.KVCache(ours.config, 1, 24, "cpu", torch.float32)
        steps = [ours(ids[:, :10], cache=cache)]  # prefill, then one token at a time
        steps += [ours(ids[:, t:t + 1], cache=cache) for t in range(10, 24)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4


def test_batched_left_padded_generation_equals_one_by_one(tiny):
    path, _ = tiny
    ours, _, _ = m.load(path, device="cpu", dtype=torch.float32)
    prompts = [random_ids(n, ours.config.vocab_size, n) for n in (3, 11, 6)]
    batched = m.generate(ours, prompts, max_new_tokens=12)
    alone = [m.generate(ours, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == alone


def test_generation_stops_at_any_stop_id(tiny_llama):
    path, _ = tiny_llama
    ours, _, _ = m.load(path)
    prompt = random_ids(5, ours.config.vocab_size, 4)
    free = m.generate(ours, [prompt], max_new_tokens=12)[0]
    stop = [free[3], 95]  # pretend the 4th generated token ends the turn
    stopped = m.generate(ours, [prompt], max_new_tokens=12, stop_ids=stop)[0]
    first = next(i for i, t in enumerate(free) if t in stop)
    assert stopped == free[: first + 1]


def test_rows_that_stop_early_leave_the_batch_without_changing_the_others(tiny, monkeypatch):
    path, _ = tiny
    ours, _, _ = m.load(path, device="cpu", dtype=torch.float32)
    prefix = random_ids(5, ours.config.vocab_size, 7)
    prompts = [random_ids(n, ours.config.vocab_size, 20 + n) for n in (2, 7, 4, 5, 3)]
    free = [m.generate(ours, [prefix + p], max_new_tokens=12)[0] for p in prompts]
    stop = [free[0][1], free[2][5]]  # rows end at different steps, some maybe never
    alone = [m.generate(ours, [prefix + p], max_new_tokens=12, stop_ids=stop)[0] for p in prompts]
    assert len({len(a) for a in alone}) > 1
    kept = []
    keep_rows = m.KVCache.keep_rows
    monkeypatch.setattr(m.KVCache, "keep_rows", lambda cache, rows: kept.append(len(rows)) or keep_rows(cache, rows))
    batched = m.generate(ours, prompts, max_new_tokens=12, stop_ids=stop, prefix=prefix)
    assert kept, "no finished row left the batch"
    assert batched == alone


def test_sampling_is_reproducible_and_respects_top_k():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    a = m.sample(logits, 1.5, 5, None, torch.Generator().manual_seed(1))
    b = m.sample(logits, 1.5, 5, None, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    top5 = logits.topk(5).indices
    for _ in range(20):
        token = m.sample(logits, 1.5, 5, None)
        assert all(t in row for t, row in zip(token.tolist(), top5.tolist()))


def test_top_p_keeps_the_smallest_set_holding_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {m.sample(logits, 1.0, None, 0.7).item() for _ in range(200)}
    assert seen == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3


def test_top_p_of_zero_keeps_the_most_likely_token():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]]))
    assert {m.sample(logits, 1.0, None, 0.0).item() for _ in range(20)} == {1}


def test_a_negative_temperature_or_an_empty_prompt_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="temperature"):
        m.sample(torch.zeros(1, 4), -1.0, None, None)
    ours, _, _ = m.load(tiny_llama[0])
    for prompts in ([], [[5, 6], []]):
        with pytest.raises(ValueError, match="at least one token"):
            m.generate(ours, prompts, max_new_tokens=2)


def test_a_qwen2_config_with_attention_bias_still_has_no_output_bias(tmp_path):
    # transformers' Qwen2 gives q, k and v a bias whatever attention_bias says, and o_proj none.
    from conftest import make_tiny_checkpoint
    hf = make_tiny_checkpoint(str(tmp_path), "qwen2_bias")
    edit_json(str(tmp_path / "config.json"), lambda config: {**config, "attention_bias": True})
    ours, _, _ = m.load(str(tmp_path))
    assert_logits_match(ours, hf, torch.tensor([random_ids(20, hf.config.vocab_size, 0)]))


def test_an_older_checkpoints_rotary_inv_freq_buffers_are_ignored(tiny_llama):
    from safetensors.torch import load_file, save_file
    path, hf = tiny_llama
    weights = os.path.join(path, "model.safetensors")
    state = load_file(weights)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # wrong on purpose: it must be unused
    save_file(state, weights, metadata={"format": "pt"})
    ours, _, _ = m.load(path)
    assert_logits_match(ours, hf, torch.tensor([random_ids(20, hf.config.vocab_size, 0)]))


def test_a_chat_template_may_break_out_of_a_loop_as_transformers_allows():
    template = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m['content'] }}{% endfor %}"
    chat = m.Chat(template, {}, [])
    assert chat.render([{"role": "user", "content": "first"}, {"role": "user", "content": "second"}]) == "first"


def test_chat_template_and_stop_ids_come_from_the_folder(tiny_llama):
    path, _ = tiny_llama
    _, tokenizer, chat = m.load(path)
    text = chat.render([{"role": "user", "content": "who is the mayor"}])
    assert text == "<|im_start|>user\nwho is the mayor<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.token_to_id("<|im_end|>") in chat.stop_ids and 2 in chat.stop_ids


def test_rope_parameters_and_rope_scaling_spellings_agree():
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=8, hidden_size=8, intermediate_size=8,
                num_hidden_layers=1, num_attention_heads=2)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    old = m.Config.from_hf({**base, "rope_theta": 5e5, "rope_scaling": scaling})
    new = m.Config.from_hf({**base, "rope_parameters": {**scaling, "rope_theta": 5e5}})
    assert old == new and old.rope_theta == 5e5


@pytest.mark.parametrize("field, value, words", [
    ("architectures", ["MistralForCausalLM"], "architecture 'MistralForCausalLM'"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_type='yarn'"),
    ("use_sliding_window", True, "sliding-window"),
    ("hidden_act", "gelu", "hidden_act 'gelu'"),
])
def test_unsupported_config_is_refused_by_name(field, value, words):
    hf = {**dict(architectures=["LlamaForCausalLM"], vocab_size=8, hidden_size=8, intermediate_size=8,
                 num_hidden_layers=1, num_attention_heads=2), field: value}
    with pytest.raises(m.ModelError, match=words.replace("(", r"\(")):
        m.Config.from_hf(hf)


@pytest.mark.parametrize("changes, words", [
    ({"hidden_size": None}, "hidden_size must be a positive integer, not None"),
    ({"num_attention_heads": "four"}, "num_attention_heads must be a positive integer, not 'four'"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer, not 0"),
    ({"num_key_value_heads": 3}, "num_attention_heads=2 is not a multiple of num_key_value_heads=3"),
    ({"num_attention_heads": 3, "num_key_value_heads": 1}, "hidden_size=8 is not a multiple of num_attention_heads=3"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "needs high_freq_factor, low_freq_factor, original_max_position_embeddings"),
    ({"rope_scaling": {"rope_type": "linear"}}, "rope_type='linear' needs factor"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "rope scaling factor must be a positive number, not '2'"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps must be a positive number, not '1e-6'"),
    ({"architectures": "GPT2LMHeadModel"}, "unsupported architecture 'GPT2LMHeadModel'"),
])
def test_a_malformed_config_is_refused_by_name(changes, words):
    hf = dict(architectures=["LlamaForCausalLM"], vocab_size=8, hidden_size=8, intermediate_size=8,
              num_hidden_layers=1, num_attention_heads=2)
    hf = {k: v for k, v in {**hf, **changes}.items() if v is not None}
    with pytest.raises(m.ModelError, match=re.escape(words)):
        m.Config.from_hf(hf)


# Bad model folders: the demo prints one line and exits non-zero, no traceback.

def run_demo(folder: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "model.py"), "--model", folder, "--prompt", "hi"],
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.stderr


def test_demo_answers_on_a_tiny_model(tiny_llama):
    path, _ = tiny_llama
    result = run_demo(path)
    assert result.returncode == 0, result.stderr


def test_missing_folder_is_one_line(tmp_path):
    assert_one_line_error(run_demo(str(tmp_path / "nope")), "model folder not found")


@pytest.mark.parametrize("device", ["nodevice", "cuda:0" if not torch.cuda.is_available() else "cuda:4096"])
def test_a_device_this_machine_lacks_is_refused_by_name(tiny_llama, device):
    with pytest.raises(m.ModelError, match=f"device '{device}' is not usable here"):
        m.load(tiny_llama[0], device=device)


@pytest.mark.parametrize("remove, words", [
    ("config.json", "missing config.json"),
    ("model.safetensors", "missing model.safetensors"),
    ("tokenizer.json", "missing tokenizer.json"),
])
def test_folder_missing_a_file_is_one_line(tiny_llama, remove, words):
    path, _ = tiny_llama
    os.remove(os.path.join(path, remove))
    assert_one_line_error(run_demo(path), words)


def test_truncated_safetensors_is_one_line(tiny_llama):
    path, _ = tiny_llama
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    assert_one_line_error(run_demo(path), "cannot read")


@pytest.mark.parametrize("edit, words", [
    (lambda config: {**config, "architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'GPT2LMHeadModel'"),
    (lambda config: {**config, "intermediate_size": 2 * config["intermediate_size"]},
     "checkpoint does not match config: model.layers.0.mlp.gate_proj.weight is (112, 64) in the checkpoint, "
     "(224, 64) by config.json"),
    (lambda config: [config], "config.json is not a JSON object"),
])
def test_an_unsupported_or_misfitting_config_is_one_line(tiny_llama, edit, words):
    path, _ = tiny_llama
    edit_json(os.path.join(path, "config.json"), edit)
    assert_one_line_error(run_demo(path), words)


@pytest.mark.parametrize("content", ["not json", "{}"])
def test_a_malformed_tokenizer_json_is_one_line(tiny_llama, content):
    path, _ = tiny_llama
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write(content)
    assert_one_line_error(run_demo(path), f"cannot read tokenizer.json in {path}: ")


def test_a_chat_template_that_does_not_compile_is_one_line(tiny_llama):
    path, _ = tiny_llama
    edit_json(os.path.join(path, "tokenizer_config.json"),
              lambda config: {**config, "chat_template": "{% for m in messages %}{{ m['content'] }"})
    assert_one_line_error(run_demo(path), "chat template does not compile")


def test_shared_prefix_generation_equals_full_prompts(tiny):
    path, _ = tiny
    ours, _, _ = m.load(path, device="cpu", dtype=torch.float32)
    prefix = random_ids(9, ours.config.vocab_size, 5)
    prompts = [random_ids(n, ours.config.vocab_size, 10 + n) for n in (2, 6, 4)]
    shared = m.generate(ours, prompts, max_new_tokens=10, prefix=prefix)
    alone = [m.generate(ours, [prefix + p], max_new_tokens=10)[0] for p in prompts]
    assert shared == alone


def test_the_decoder_alone_gives_transformers_hidden_states_which_lm_head_reads(tiny_llama):
    path, hf = tiny_llama
    ours, _, _ = m.load(path)
    ids = torch.tensor([random_ids(12, ours.config.vocab_size, 6)])
    with torch.no_grad():
        hidden = ours.model(ids)  # as hf.model: the transformer without its output layer
        assert (hidden - hf.model(ids).last_hidden_state).abs().max().item() <= 1e-5
        assert torch.equal(ours(ids, return_hidden=True), hidden)
        assert torch.allclose(ours.lm_head(hidden), ours(ids), atol=1e-6)


def test_the_forward_pass_traces_as_one_graph_for_torch_compile(tiny_llama):
    # A graph break (a tensor read back into Python, a branch on its value) would split torch.compile's
    # graph; dynamo's trace alone shows it, in seconds, without compiling.
    path, _ = tiny_llama
    ours, _, _ = m.load(path)
    ids = torch.tensor([random_ids(10, ours.config.vocab_size, 8), random_ids(10, ours.config.vocab_size, 9)])
    padded = torch.ones_like(ids)
    padded[0, :4] = 0
    cache = m.KVCache(ours.config, 2, 16, "cpu", torch.float32)
    for args in ((ids,), (ids, padded), (ids, padded, cache)):
        traced = torch._dynamo.explain(ours)(*args)
        assert (traced.graph_count, traced.graph_break_count) == (1, 0), traced.break_reasons
