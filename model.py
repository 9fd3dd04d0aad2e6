"""
A Llama-family decoder in plain PyTorch: Llama 2 and 3, SmolLM/SmolLM2, Qwen2/2.5 and Qwen3.

It loads a Hugging Face-style folder (config.json, *.safetensors, tokenizer.json) and gives the same
logits as transformers. Modules are named after the checkpoint's tensors (model.layers.N.self_attn.q_proj,
...), so loading is a strict, name-for-name copy.

    model, tokenizer, chat = load("path/to/folder")
    ids = tokenizer.encode(chat.render([{"role": "user", "content": "Hi"}])).ids
    out = generate(model, [ids], max_new_tokens=32, stop_ids=chat.stop_ids)

Run `python model.py --model DIR --prompt "..."` to talk to a model. This file imports nothing else
from the project, so it can be copied into another one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
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

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
ROPE_TYPES = {  # rope_type -> the keys of rope_scaling it reads (rope_frequencies)
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


def positive(value, what: str, kind: type = float):
    """A config number, checked now so that a null or a string fails here, not inside the forward pass."""
    types = (int,) if kind is int else (int, float)
    if type(value) not in types or not 0 < value < math.inf:
        noun = "integer" if kind is int else "number"
        raise ModelError(f"config.json: {what} must be a positive {noun}, not {value!r}")
    return kind(value)


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
        archs = hf.get("architectures") or [ARCHITECTURES.get(hf.get("model_type"), hf.get("model_type"))]
        arch = archs if isinstance(archs, str) else archs[0]
        if arch not in ARCHITECTURES.values():
            raise ModelError(f"unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES.values())})")
        if hf.get("hidden_act", "silu") != "silu":
            raise ModelError(f"unsupported hidden_act {hf['hidden_act']!r} (only 'silu')")
        if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
            raise ModelError("unsupported sliding-window attention (use_sliding_window / layer_types)")
        if hf.get("partial_rotary_factor", 1.0) != 1.0:
            raise ModelError(f"unsupported partial_rotary_factor={hf['partial_rotary_factor']}")
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

        def size(key: str, default: int | None = None) -> int:  # null or absent: the default
            return positive(default if hf.get(key) is None else hf[key], key, int)

        hidden, heads = size("hidden_size"), size("num_attention_heads")
        kv_heads = size("num_key_value_heads", heads)
        if heads % kv_heads:
            raise ModelError(f"config.json: num_attention_heads={heads} is not a multiple of "
                             f"num_key_value_heads={kv_heads}")
        if not hf.get("head_dim") and hidden % heads:
            raise ModelError(f"config.json: hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
        qwen2, attention_bias = arch == "Qwen2ForCausalLM", bool(hf.get("attention_bias", False))
        return cls(
            architecture=arch, vocab_size=size("vocab_size"), hidden_size=hidden,
            intermediate_size=size("intermediate_size"), num_hidden_layers=size("num_hidden_layers"),
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=size("head_dim", hidden // heads),
            rms_norm_eps=positive(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
            max_position_embeddings=size("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # transformers' Qwen2 gives q, k and v a bias, and o none, whatever attention_bias says
            qkv_bias=qwen2 or attention_bias, o_bias=not qwen2 and attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",  # Qwen3 normalises each head's q and k
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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Hugging Face stores q/k so that dimension j pairs with j + head_dim/2 (not interleaved pairs).
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


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
    layer, written once a forward pass, so gradients can flow through a cache (a shared prompt prefix
    computed with autograd on): nothing attention saved for the backward pass is overwritten later.
    """

    def __init__(self, cfg: Config, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.length = 0  # tokens stored; Decoder.forward advances it after all layers wrote

    @staticmethod
    def bytes_per_token(cfg: Config, dtype: torch.dtype) -> int:
        return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.k[layer].shape[2]:
            raise ValueError(f"KV cache is full ({self.k[layer].shape[2]} tokens)")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows, one layer at a time so that the copy never doubles the memory."""
        for tensors in (self.k, self.v):
            for layer, t in enumerate(tensors):
                tensors[layer] = t[rows]

    def expand(self, batch: int, max_len: int) -> KVCache:
        """A new cache of `batch` rows, each starting with this one-row cache's tokens."""
        def grown(t: torch.Tensor) -> torch.Tensor:
            copy = t.new_zeros(batch, t.shape[1], max_len, t.shape[3])
            copy[:, :, :self.length] = t[:, :, :self.length]  # broadcast over the batch
            return copy

        new = KVCache.__new__(KVCache)
        new.k, new.v, new.length = [grown(t) for t in self.k], [grown(t) for t in self.v], self.length
        return new


def sdpa_takes_grouped_heads(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """
    Whether SDPA gets k/v heads as they are (enable_gqa) rather than repeated: on a CPU always (5x faster
    decoding); on CUDA only unmasked 16-bit input, as anything else falls back to its slow math kernel.
    """
    if q.device.type != "cuda":
        return True
    # Under autocast q is float32 here (the rotation promotes it), but SDPA runs in autocast's dtype.
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype
    return mask is None and dtype in (torch.float16, torch.bfloat16)


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
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
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
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))  # (B, T, dim)


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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """
        input_ids (B, T): the new tokens. attention_mask (B, S), S = cache.length + T: 1 for real tokens, 0 for
        padding, over the cached and the new tokens; None means no padding. Returns (B, T, dim), normed.
        """
        B, T = input_ids.shape
        device = input_ids.device
        past = cache.length if cache is not None else 0
        # Without padding SDPA needs no mask (its fastest kernels on a GPU), except for several
        # new tokens after cached ones, where causal must be offset by the cache.
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

        x = self.embed_tokens(input_ids)  # (B, T, dim)
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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, return_hidden: bool = False) -> torch.Tensor:
        """
        Logits (B, T, vocab), or with return_hidden the hidden states (B, T, dim), so that the caller puts
        only the positions it needs through lm_head: logits of long prompts are large (16 x 700 x 49152 is 2 GB).
        """
        x = self.model(input_ids, attention_mask, cache)
        return x if return_hidden else self.lm_head(x)


# -----------------------------------------------------------------------------
# Generation


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None = None) -> torch.Tensor:
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
    """The one-row cache of `prefix`, to expand() across a batch; with autograd on, gradients flow through it."""
    weight = model.model.embed_tokens.weight  # lm_head may be wrapped in a LoRA layer, the embedding never is
    cache = KVCache(model.config, 1, len(prefix), weight.device, weight.dtype)
    model(torch.tensor([prefix], device=weight.device), cache=cache, return_hidden=True)
    return cache


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int,
             stop_ids: list[int] | tuple[int, ...] = (), temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None,
             prefix: list[int] = ()) -> list[list[int]]:
    """
    The new tokens of each prompt, batched (left-padded) after a shared `prefix` computed once. A row ends
    after max_new_tokens or at its first stop id, which is kept at the end of its output.
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
        # Dropping rows copies the whole cache, so drop them once they are a quarter of the batch
        # (1.2x faster sampling 64 questions at a time; greedy outputs are unchanged).
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

        # loopcontrols: some templates {% break %}, and transformers renders them with it
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        # strftime_now: Llama 3's template puts today's date in the system prompt
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
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

    def text(token) -> str:  # a special token is spelled as a string or as {"content": "..."}
        return (token.get("content") if isinstance(token, dict) else token) or ""

    special = {k: text(tok_cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    ids = []
    for source in (gen_cfg.get("eos_token_id"), hf_config.get("eos_token_id")):
        ids += source if isinstance(source, list) else [source]
    ids.append(tokenizer.token_to_id(special["eos_token"]) if special["eos_token"] else None)
    return Chat(template, special, list(dict.fromkeys(i for i in ids if i is not None)))


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        shards = sorted(set(read_json(index)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        raise ModelError(f"missing model.safetensors (or model.safetensors.index.json) in {path}")
    for shard in shards:
        if not os.path.exists(os.path.join(path, shard)):
            raise ModelError(f"missing shard {shard} in {path}")
    return [os.path.join(path, shard) for shard in shards]


def default_device_and_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:  # an unknown device, or CUDA in a CPU-only PyTorch, fails here rather than in the middle of loading
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ModelError(f"device {name!r} is not usable here: {str(e).splitlines()[0]}") from None
    if dtype is None:  # bfloat16 halves memory and is fast on GPUs; CPUs are faster and exact in float32
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def load(path: str, device=None, dtype=None) -> tuple[Transformer, Tokenizer, Chat]:
    """Load a Hugging Face-style folder -> (model, tokenizer, chat)."""
    device, dtype = default_device_and_dtype(device, dtype)
    if not os.path.isdir(path):
        raise ModelError(f"model folder not found: {path}")
    hf_config = read_json(os.path.join(path, "config.json"))
    cfg = Config.from_hf(hf_config)
    files = safetensors_files(path)
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise ModelError(f"missing tokenizer.json in {path}")
    try:
        tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    except Exception as e:  # the tokenizers library raises a bare Exception for any malformed file
        raise ModelError(f"cannot read tokenizer.json in {path}: {str(e).splitlines()[0]}") from None

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


def main() -> None:
    parser = argparse.ArgumentParser(description="Answer a prompt with a Llama-family model.")
    parser.add_argument("--model", required=True, help="a Hugging Face-style folder")
    parser.add_argument("--prompt", required=True)
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
