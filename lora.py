"""
LoRA (Hu et al. 2021) for any nn.Module with nn.Linear children, saved in the layout PEFT loads.

    y = W x + b + (alpha / r) * B A dropout(x),   A: (r, in), B: (out, r)

B starts at zero, so a freshly injected adapter is exactly the identity. The base
weights stay frozen and in place: with `lora_disabled` the same model in memory is
the teacher (adapters off) and the student (adapters on).
"""
import json
import math
import os
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> our model, as PEFT names its keys
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"  # PEFT's file names


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be at least 1, not {r}")
        self.base_layer = base_layer  # the name PEFT uses, so state-dict paths line up
        self.r, self.alpha, self.dropout_p, self.scaling = r, alpha, dropout, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # The adapter trains in float32 even on a bf16/fp16 base (as PEFT does): Adam's small updates
        # vanish in a 16-bit weight. Under autocast its matmuls still run in the low precision.
        dtype = torch.promote_types(base_layer.weight.dtype, torch.float32)
        kw = dict(bias=False, device=base_layer.weight.device, dtype=dtype)
        self.lora_A = nn.Linear(base_layer.in_features, r, **kw)
        self.lora_B = nn.Linear(r, base_layer.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's default, as loralib
        nn.init.zeros_(self.lora_B.weight)  # so B A = 0: the adapter starts as the identity
        self.enabled = True

    # Read through to the wrapped layer, as PEFT's layers do: code that reads lm_head.weight or
    # in_features (a transformers model's output embeddings, our own generate) works on either.
    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)
    in_features = property(lambda self: self.base_layer.in_features)
    out_features = property(lambda self: self.base_layer.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.enabled:
            return y
        # (.., in) -> (.., r) -> (.., out): never materialise the (out, in) delta while training
        x = x.to(self.lora_A.weight.dtype)
        return y + (self.lora_B(self.lora_A(self.dropout(x))) * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A new plain nn.Linear with W + scaling * B A folded in; self is left untouched."""
        W = self.base_layer.weight
        # in float32, so a bf16 weight is rounded once (at the end), not in the matmul and again in the sum
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()  # (out, r) @ (r, in)
        merged = nn.Linear(W.shape[1], W.shape[0], bias=self.base_layer.bias is not None, device="meta")
        merged.weight = nn.Parameter((W.float() + self.scaling * delta).to(W.dtype), requires_grad=W.requires_grad)
        merged.bias = self.base_layer.bias
        return merged


def _lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def inject_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Wrap every nn.Linear whose last name is in `targets`; freeze everything else. Returns the paths."""
    targets = [targets] if isinstance(targets, str) else list(targets)  # "q_proj" must not match "q"
    if _lora_layers(model):
        raise ValueError("model already has LoRA layers; inject once (or merge_lora first)")
    paths = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rpartition(".")[2] in targets]
    if not paths:
        raise ValueError(f"inject_lora: no nn.Linear module is named any of {targets}")
    for p in model.parameters():
        p.requires_grad_(False)
    for path in paths:  # a tied lm_head keeps sharing the embedding: both are frozen, so that is harmless
        _set_submodule(model, path, LoRALinear(model.get_submodule(path), r, alpha, dropout))
    return paths


def lora_parameters(model: nn.Module, matrices: str = "AB") -> list[nn.Parameter]:
    """The trainable adapter weights, for the optimizer: A and B, or only "A" or "B" (LoRA+ gives B its own lr)."""
    return [getattr(m, f"lora_{x}").weight for _, m in _lora_layers(model) for x in matrices]


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: every adapter off inside the block, each one's previous state back after."""
    layers = [m for _, m in _lora_layers(model)]
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(layers, before):
            m.enabled = was


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear with its merged nn.Linear (for export or faster inference). A merged
    lm_head that was tied to the embedding gets a weight of its own: W + BA is no longer the embedding."""
    for path, m in _lora_layers(model):
        _set_submodule(model, path, m.merge())
    return model


def _peft_state_dict(model: nn.Module) -> dict[str, nn.Parameter]:
    return {f"{PEFT_PREFIX}{path}.{ab}.weight": getattr(m, ab).weight
            for path, m in _lora_layers(model) for ab in ("lora_A", "lora_B")}


def save_adapter(model: nn.Module, out_dir: str, base_model_name_or_path: str = "") -> None:
    """
    Write adapter_model.safetensors + adapter_config.json in PEFT's layout, hyperparameters read from
    the layers. Each file goes to a .tmp name in out_dir, then os.replace (atomic on POSIX) puts it in
    place, weights first: a crash leaves each file whole, old or new, never half-written.
    """
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: model has no LoRA layers")
    hparams = {(m.r, m.alpha, m.dropout_p) for _, m in layers}
    if len(hparams) != 1:
        raise ValueError(f"save_adapter: PEFT's config has one r/alpha/dropout, layers have {hparams}")
    (r, alpha, dropout), = hparams
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": sorted({path.rpartition(".")[2] for path, _ in layers}),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True,
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in _peft_state_dict(model).items()}
    os.makedirs(out_dir, exist_ok=True)
    weights, cfg = os.path.join(out_dir, WEIGHTS_NAME), os.path.join(out_dir, CONFIG_NAME)
    save_file(tensors, weights + ".tmp", metadata={"format": "pt"})
    with open(cfg + ".tmp", "w") as f:
        json.dump(config, f, indent=2)
    os.replace(weights + ".tmp", weights)
    os.replace(cfg + ".tmp", cfg)


def load_adapter(model: nn.Module, adapter_dir: str) -> dict:
    """
    Load a PEFT LoRA adapter (ours or PEFT's) into model, injecting it first if needed. Strict on keys.
    A missing, unreadable or unsupported adapter raises ValueError with a one-line message.
    """
    path = os.path.join(adapter_dir, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise ValueError(f"load_adapter: cannot read {path}: {e}") from None
    unsupported = ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform")
    if not isinstance(config, dict) or config.get("peft_type") != "LORA" or any(config.get(k) for k in unsupported):
        raise ValueError(f"load_adapter: only plain LoRA (none of {unsupported}) is supported, got {config}")
    if missing := [k for k in ("r", "lora_alpha", "target_modules") if k not in config]:
        raise ValueError(f"load_adapter: {path} lacks {', '.join(missing)}")
    weights = os.path.join(adapter_dir, WEIGHTS_NAME)
    try:
        tensors = load_file(weights)
    except Exception as e:  # a missing file, or safetensors' own error for a truncated one
        raise ValueError(f"load_adapter: cannot read {weights}: {e}") from None
    injected = not _lora_layers(model)
    if injected:
        trainable = {name: p.requires_grad for name, p in model.named_parameters()}  # inject_lora freezes all
        inject_lora(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0),
                    config["target_modules"])
    try:
        params = _peft_state_dict(model)
        if any(m.alpha != config["lora_alpha"] for _, m in _lora_layers(model)):
            raise ValueError(f"load_adapter: model's LoRA alpha differs from the adapter's {config['lora_alpha']}")
        missing, extra = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
        if missing or extra:
            raise ValueError(f"load_adapter: adapter keys do not match the model; missing {missing}, "
                             f"unexpected {extra}")
        for key, p in params.items():  # all checked before any is copied: a bad file changes nothing
            if p.shape != tensors[key].shape:
                raise ValueError(f"load_adapter: {key} has shape {tuple(tensors[key].shape)}, "
                                 f"model wants {tuple(p.shape)}")
    except ValueError:
        if injected:  # give the caller back the model it passed in
            for path, m in _lora_layers(model):
                _set_submodule(model, path, m.base_layer)
            for name, p in model.named_parameters():
                p.requires_grad_(trainable[name])
        raise
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(tensors[key])
    return config
