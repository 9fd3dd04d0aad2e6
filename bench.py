"""
Speed and memory of our model.py + lora.py against the reference (transformers + peft), in one run.

    python bench.py                 # the default model, on the CPU (or GPU if present)
    python bench.py --model DIR
    python bench.py --bf16-autocast  # both sides under torch.autocast(bfloat16), as prompt_distill.py
                                     # trains (it generates in float32)

Each measurement runs in a fresh process, so its peak memory is its own. Times are medians.
Run it alone: anything else on the machine makes every number wrong.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

TASKS = ("prefill", "decode", "train")


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load(impl: str, path: str, device: str):
    """A model with the interface ours has: model(ids) -> logits, plus a one-token cached step."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if impl == "ours":
        import model as m
        net, _, _ = m.load(path, device=device, dtype=dtype)
        return net
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def logits_of(impl: str, net, ids, **kw):
    return net(ids, **kw) if impl == "ours" else net(ids, **kw).logits


def bench_prefill(impl, net, device, args) -> float:
    ids = torch.randint(100, 10000, (1, args.prompt_tokens), device=device)
    with torch.no_grad():
        seconds = timed(lambda: logits_of(impl, net, ids), args.repeats)
    return args.prompt_tokens / seconds


def bench_decode(impl, net, device, args) -> float:
    """Tokens/s of one-token steps with a KV cache, after a 64-token prompt (greedy, batch 1)."""
    import model as m
    prompt = torch.randint(100, 10000, (1, 64), device=device)

    def run():
        if impl == "ours":
            cache = m.KVCache(net.config, 1, 64 + args.new_tokens, device, net.lm_head.weight.dtype)
            token = net(prompt, cache=cache)[:, -1].argmax(-1, keepdim=True)
            for _ in range(args.new_tokens):
                token = net(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
        else:
            out = net(prompt, use_cache=True)
            for _ in range(args.new_tokens):
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                out = net(token, past_key_values=out.past_key_values, use_cache=True)

    with torch.no_grad():
        seconds = timed(run, max(1, args.repeats // 2))
    return args.new_tokens / seconds


def bench_train(impl, net, device, args) -> float:
    """Tokens/s of LoRA training steps (r=16, all seven projections): forward, KL loss, backward, AdamW."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if impl == "ours":
        import lora
        lora.inject_lora(net, r=16, alpha=32, targets=targets)
        params = lora.lora_parameters(net)
    else:
        import peft
        net = peft.get_peft_model(net, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        params = [p for p in net.parameters() if p.requires_grad]
    net.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(100, 10000, (args.batch, args.train_tokens), device=device)
    target = torch.randn(args.batch, args.train_tokens, net.config.vocab_size, device=device).log_softmax(-1)

    def step():
        logits = logits_of(impl, net, ids).float()
        loss = torch.nn.functional.kl_div(logits.log_softmax(-1), target, log_target=True, reduction="batchmean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, args.repeats)
    return args.batch * args.train_tokens / seconds


def worker(args) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = load(args.impl, args.model, device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16_autocast, cache_enabled=False):
        tokens_per_s = globals()[f"bench_{args.task}"](args.impl, net, device, args)
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: kilobytes
    print(json.dumps({"tokens_per_s": tokens_per_s, "peak_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hugging Face-style folder (default: the default model)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--train-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--bf16-autocast", action="store_true", help="run both sides under bfloat16 autocast")
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        return worker(args)

    import gguf_model
    args.model = args.model or gguf_model.default_model_dir()
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"model {args.model}, device {device}, torch {torch.__version__}"
          f"{', bf16 autocast' if args.bf16_autocast else ''}")
    print(f"{'task':<34} {'ours tok/s':>11} {'ref tok/s':>11} {'speed':>7} {'ours MB':>9} {'ref MB':>9}")
    labels = {"prefill": f"prefill {args.prompt_tokens} tokens",
              "decode": f"decode {args.new_tokens} tokens, KV cache",
              "train": f"LoRA train, {args.batch}x{args.train_tokens} tokens"}
    for task in args.tasks.split(","):
        result = {}
        for impl in ("ours", "reference"):
            cmd = [sys.executable, os.path.abspath(__file__), "--impl", impl, "--task", task]
            for flag in ("model", "prompt_tokens", "new_tokens", "train_tokens", "batch", "repeats"):
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            cmd += ["--bf16-autocast"] if args.bf16_autocast else []
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"error: {impl} {task} failed: {out.stderr.strip().splitlines()[-1]}")
            result[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        ours, ref = result["ours"], result["reference"]
        print(f"{labels[task]:<34} {ours['tokens_per_s']:>11.1f} {ref['tokens_per_s']:>11.1f} "
              f"{ours['tokens_per_s'] / ref['tokens_per_s']:>6.2f}x {ours['peak_mb']:>9.0f} {ref['peak_mb']:>9.0f}")


if __name__ == "__main__":
    main()
