"""gguf_model.py: tiny GGUF files of each architecture, written by the gguf package's own writer, convert
back to the weights they were written from and give the logits that transformers' GGUF reader gives."""

import os

import gguf
import numpy as np
import pytest
import torch

import gguf_model
import model as m
from conftest import CHAT_TEMPLATE, make_tiny_checkpoint
from test_prompt_distill import assert_one_line_error, run_cli

IDS = torch.tensor([[5, 17, 260, 3, 88, 201, 44, 9, 120, 7]])


def byte_level_vocabulary() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a small byte-level BPE: GPT-2's 256 byte symbols, three merges and
    two chat tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    symbols = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(rest)}  # GPT-2's table
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = [symbols[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "<|im_start|>", "<|im_end|>"]
    return tokens, [1] * 259 + [3, 3], merges  # 1: normal, 3: control


def write_gguf(path: str, hf, arch: str, quantization=gguf.GGMLQuantizationType.F32, tokenizer=True,
               chat_template=True) -> str:
    """A GGUF file of the transformers model hf, laid out as llama.cpp's converter lays it out."""
    c = hf.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"] if hasattr(c, "rope_parameters") else c.rope_theta)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    if tokenizer:
        tokens, types, merges = byte_level_vocabulary()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2" if arch.startswith("qwen") else "smollm")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokens.index("<|im_start|>"))
        writer.add_eos_token_id(tokens.index("<|im_end|>"))
    if chat_template:
        writer.add_chat_template(CHAT_TEMPLATE)
    to_gguf = {v: k for k, v in gguf_model.GGUF_TOP_NAMES.items()}
    to_gguf |= {f"model.layers.{i}.{v}": f"blk.{i}.{k}" for i in range(c.num_hidden_layers)
                for k, v in gguf_model.GGUF_LAYER_NAMES.items()}
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        w = tensor.float().numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's row order
            heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
            w = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        if w.ndim == 2 and w.shape[1] % 32 == 0 and quantization != gguf.GGMLQuantizationType.F32:  # in blocks of 32
            writer.add_tensor(to_gguf[name], gguf.quants.quantize(w, quantization), raw_dtype=quantization)
        else:
            writer.add_tensor(to_gguf[name], np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


FAMILIES = {"smollm_tied": "llama", "llama_gqa_untied": "llama", "qwen2_bias": "qwen2", "qwen3_qk_norm": "qwen3"}


@pytest.fixture(params=list(FAMILIES))
def tiny_gguf(request, tmp_path, monkeypatch):
    """(GGUF path, transformers model) for each architecture, the conversion cached under tmp_path."""
    monkeypatch.setenv("PROMPT_DISTILL_CACHE", str(tmp_path / "cache"))
    # head_dim 128 for qwen3: transformers' reader ignores qwen3.attention.key_length and assumes 128
    head_dim = {"head_dim": 128} if request.param == "qwen3_qk_norm" else {}
    hf = make_tiny_checkpoint(str(tmp_path / "hf"), request.param, vocab_size=len(byte_level_vocabulary()[0]),
                              **head_dim)
    return write_gguf(str(tmp_path / f"{request.param}.gguf"), hf, FAMILIES[request.param]), hf


def logits_of(path: str) -> torch.Tensor:
    net, _, _ = m.load(path, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        return net(IDS)


def test_a_converted_gguf_gives_the_logits_of_the_weights_it_was_written_from(tiny_gguf):
    path, hf = tiny_gguf
    with torch.no_grad():
        expected = hf(IDS).logits
    assert torch.allclose(logits_of(gguf_model.gguf_model_dir(path)), expected, atol=1e-5)


@pytest.mark.parametrize("quantization", [gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0])
def test_a_converted_gguf_gives_the_logits_of_transformers_gguf_reader(tiny_gguf, quantization):
    transformers = pytest.importorskip("transformers")
    path, hf = tiny_gguf
    if quantization != gguf.GGMLQuantizationType.F32:
        path = write_gguf(path.replace(".gguf", f".{quantization.name}.gguf"), hf, gguf_model.read_gguf(path).fields[
            "general.architecture"].contents(), quantization)
    folder, name = os.path.split(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(IDS).logits
    assert torch.allclose(logits_of(gguf_model.gguf_model_dir(path)), expected, atol=1e-5)


def test_the_tokenizer_and_chat_template_come_from_the_files_metadata(tiny_gguf):
    path, _ = tiny_gguf
    _, tokenizer, chat = m.load(gguf_model.gguf_model_dir(path))
    tokens, _, _ = byte_level_vocabulary()
    assert tokenizer.encode(" the", add_special_tokens=False).ids == [tokens.index("Ġthe")]
    ids = tokenizer.encode(chat.render([{"role": "user", "content": "hi"}]), add_special_tokens=False).ids
    assert ids[0] == tokens.index("<|im_start|>") and tokens.index("<|im_end|>") in chat.stop_ids


def test_a_gguf_is_converted_once_and_again_when_the_file_changes(tiny_gguf):
    path, hf = tiny_gguf
    first = gguf_model.gguf_model_dir(path)
    stamp = os.path.getmtime(os.path.join(first, "config.json"))
    assert gguf_model.gguf_model_dir(path) == first and os.path.getmtime(os.path.join(first, "config.json")) == stamp
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 10**9))  # touched: another file, for all we know
    assert gguf_model.gguf_model_dir(path) != first


# Bad input: one line each

def test_a_gguf_of_another_architecture_is_one_line(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(m.ModelError, match="unsupported GGUF architecture 'gpt2'"):
        gguf_model.convert_gguf(str(tmp_path / "gpt2.gguf"), str(tmp_path / "out"))


@pytest.mark.parametrize("what, words", [("tokenizer", "holds no tokenizer"), ("chat_template", "holds no chat template")])
def test_a_gguf_without_a_tokenizer_or_chat_template_is_one_line(tmp_path, what, words):
    hf = make_tiny_checkpoint(str(tmp_path / "hf"), "qwen2_bias", vocab_size=len(byte_level_vocabulary()[0]))
    path = write_gguf(str(tmp_path / "m.gguf"), hf, "qwen2", **{what: False})
    with pytest.raises(m.ModelError, match=words):
        gguf_model.convert_gguf(path, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_a_truncated_gguf_is_one_line_and_leaves_no_folder(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    with open(path, "rb") as f:
        data = f.read()
    cut = str(tmp_path / "cut.gguf")
    with open(cut, "wb") as f:
        f.write(data[: len(data) // 2])
    result = run_cli("--doc", os.path.join(os.path.dirname(__file__), "..", "data", "lake_town.txt"),
                     "--model", cut, "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "is not a whole GGUF file")
    assert not os.path.exists(tmp_path / "o")


def test_a_model_that_is_neither_a_folder_nor_a_gguf_file_is_one_line(tmp_path):
    notes = tmp_path / "model.bin"
    notes.write_bytes(b"\x00" * 16)
    result = run_cli("--ask", "Who?", "--model", str(notes))
    assert_one_line_error(result, "is neither a model folder nor a .gguf file")
