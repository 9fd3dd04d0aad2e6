"""
LoRA (Hu et al. 2021) for any nn.Module with nn.Linear children, saved in the layout PEFT loads.

    y = W x + b + (alpha / r) * B A dropout(x),   A: (r, in), B: (out, r)

B starts at zero, so a freshly injected adapter is exactly the identity. The base weights stay
frozen and in place: with `lora_disabled` one model in memory is both the teacher (adapters off)
and the student (adapters on).
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
    """A frozen nn.Linear plus a trainable low-rank update that can be switched off (`enabled`)."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be at least 1, not {r}")
        self.base_layer = base_layer  # PEFT's name, so state-dict paths line up
        self.r, self.alpha, self.dropout_p, self.scaling = r, alpha, dropout, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # float32 even on a bf16 base, as PEFT does: Adam's small updates vanish in a 16-bit weight
        kw = dict(bias=False, device=base_layer.weight.device,
                  dtype=torch.promote_types(base_layer.weight.dtype, torch.float32))
        self.lora_A = nn.Linear(base_layer.in_features, r, **kw)
        self.lora_B = nn.Linear(r, base_layer.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's default, as loralib
        nn.init.zeros_(self.lora_B.weight)  # B A = 0: the adapter starts as the identity
        self.enabled = True
        self.train(base_layer.training)  # injected into an eval() model, dropout must stay off

    # Read through to the wrapped layer, as PEFT's layers do, for code that reads lm_head.weight or sizes
    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)
    in_features = property(lambda self: self.base_layer.in_features)
    out_features = property(lambda self: self.base_layer.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.enabled:
            return y
        # (.., in) -> A -> (.., r) -> B -> (.., out): the (out, in) delta is never materialised
        h = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return y + (h * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A new plain nn.Linear with W + scaling * B A folded in; self is left untouched."""
        W = self.base_layer.weight
        # in float32, so a bf16 weight is rounded once, at the end
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()  # (out, r) @ (r, in)
        merged = nn.Linear(W.shape[1], W.shape[0], bias=self.base_layer.bias is not None, device="meta")
        merged.weight = nn.Parameter((W.float() + self.scaling * delta).to(W.dtype), requires_grad=W.requires_grad)
        merged.bias = self.base_layer.bias
        return merged


def _lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALinear)]


def _target_paths(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The paths of the nn.Linear modules whose last name is one of targets."""
    return [path for path, m in model.named_modules()
            if isinstance(m, nn.Linear) and path.rpartition(".")[2] in targets]


def inject_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Wrap every nn.Linear whose last name is in targets; freeze everything else. Returns the paths."""
    targets = [targets] if isinstance(targets, str) else list(targets)  # "q_proj" must not match "q"
    if _lora_layers(model):
        raise ValueError("inject_lora: model already has LoRA layers; inject once (or merge_lora first)")
    paths = _target_paths(model, targets)
    if not paths:
        raise ValueError(f"inject_lora: no nn.Linear module is named any of {targets}")
    for p in model.parameters():
        p.requires_grad_(False)
    for path in paths:  # a tied lm_head keeps sharing the embedding: both are frozen, so that is harmless
        model.set_submodule(path, LoRALinear(model.get_submodule(path), r, alpha, dropout))
    return paths


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter weights, every A and B, for the optimizer."""
    return [p for _, m in _lora_layers(model) for p in (m.lora_A.weight, m.lora_B.weight)]


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: every adapter off inside the block, each one's previous state back after."""
    before = [(m, m.enabled) for _, m in _lora_layers(model)]
    for m, _ in before:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in before:
            m.enabled = was


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear with its merged nn.Linear (for export or faster inference). A merged
    lm_head that was tied to the embedding gets a weight of its own: W + BA is no longer the embedding."""
    for path, m in _lora_layers(model):
        model.set_submodule(path, m.merge())
    return model


def _peft_state_dict(model: nn.Module) -> dict[str, nn.Parameter]:
    return {f"{PEFT_PREFIX}{path}.{ab}.weight": getattr(m, ab).weight
            for path, m in _lora_layers(model) for ab in ("lora_A", "lora_B")}


def save_adapter(model: nn.Module, out_dir: str, base_model_name_or_path: str = "") -> None:
    """Write adapter_model.safetensors + adapter_config.json in PEFT's layout. Each file goes to a .tmp
    name, then os.replace (atomic on POSIX) puts it in place: a crash leaves each file whole, old or new."""
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


def _read_config(adapter_dir: str) -> dict:
    """adapter_config.json with every field we use checked, so a bad file fails before the model is touched."""
    path = os.path.join(adapter_dir, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise ValueError(f"load_adapter: cannot read {path}: {e}") from None
    unsupported = ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform")
    if not isinstance(config, dict) or config.get("peft_type") != "LORA" or any(config.get(k) for k in unsupported):
        raise ValueError(f"load_adapter: {path}: only plain LoRA is supported (peft_type LORA, "
                         f"none of {', '.join(unsupported)})")
    if missing := [k for k in ("r", "lora_alpha", "target_modules") if k not in config]:
        raise ValueError(f"load_adapter: {path} lacks {', '.join(missing)}")
    rules = {  # type(v) is int, not isinstance: JSON's true must not pass as 1
        "r": ("an integer >= 1", lambda v: type(v) is int and v >= 1),
        "lora_alpha": ("a positive number", lambda v: type(v) in (int, float) and 0 < v < math.inf),
        "lora_dropout": ("a number in [0, 1)", lambda v: type(v) in (int, float) and 0 <= v < 1),
        # PEFT reads a plain string as a regex over module paths, which we do not implement
        "target_modules": ("a list of module names, not a regex string",
                           lambda v: type(v) is list and all(type(t) is str for t in v)),
    }
    for field, (want, ok) in rules.items():
        value = config.get(field, 0.0)  # only lora_dropout may be absent; 0 is PEFT's default
        if not ok(value):
            raise ValueError(f"load_adapter: {path}: {field} must be {want}, not {value!r}")
    return config


def _some(keys: list[str], what: str) -> str:
    """'60 missing (a, b, c, ...)': a count and the first three keys, less PEFT's prefix, to keep one short line."""
    shown = [k.removeprefix(PEFT_PREFIX) for k in keys[:3]] + (["..."] if len(keys) > 3 else [])
    return f"{len(keys)} {what}" + (f" ({', '.join(shown)})" if keys else "")


def load_adapter(model: nn.Module, adapter_dir: str) -> dict:
    """Load a PEFT LoRA adapter (ours or PEFT's) into model, injecting it first if the model has none.
    Strict: config, keys and shapes are all checked before the model is touched, so a bad adapter
    raises a one-line ValueError and leaves the model as it was. Returns the config."""
    config = _read_config(adapter_dir)
    r, alpha, targets = config["r"], config["lora_alpha"], config["target_modules"]
    weights = os.path.join(adapter_dir, WEIGHTS_NAME)
    try:
        tensors = load_file(weights)
    except Exception as e:  # a missing file, or safetensors' own error for a truncated one
        raise ValueError(f"load_adapter: cannot read {weights}: {e}") from None
    layers = _lora_layers(model)
    if any(m.alpha != alpha for _, m in layers):
        raise ValueError(f"load_adapter: model's LoRA alpha differs from the adapter's {alpha}")
    want = {}  # key -> shape of each tensor the model has, or would have once injected
    for path, m in layers or [(path, model.get_submodule(path)) for path in _target_paths(model, targets)]:
        rank = m.r if isinstance(m, LoRALinear) else r
        want[f"{PEFT_PREFIX}{path}.lora_A.weight"] = (rank, m.in_features)  # A: (r, in)
        want[f"{PEFT_PREFIX}{path}.lora_B.weight"] = (m.out_features, rank)  # B: (out, r)
    missing, unexpected = sorted(want.keys() - tensors.keys()), sorted(tensors.keys() - want.keys())
    if missing or unexpected:
        raise ValueError(f"load_adapter: adapter keys do not match the model: "
                         f"{_some(missing, 'missing')}, {_some(unexpected, 'unexpected')}")
    for key, shape in want.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"load_adapter: {key} has shape {tuple(tensors[key].shape)}, model wants {shape}")
    if not layers:
        inject_lora(model, r, alpha, config.get("lora_dropout", 0.0), targets)
    with torch.no_grad():
        for key, p in _peft_state_dict(model).items():
            p.copy_(tensors[key])
    return config
