# Training throughput and peak memory of one SPIN step, ours against the reference code's way, on the
# same model code, machine and batch:
#   reference: a frozen copy of the model runs a forward every step for log p_t(y), log p_t(y'), and the
#              policy computes full (B, T, V) fp32 logits and a full log_softmax (TRL's DPO trainer).
#   ours:      reference log-probs computed once per iteration (a no-grad pass, amortised here over the
#              epochs) and the policy's log-probs through kernels.fused_logprobs, never the full logits.
# Each path runs in a fresh subprocess; peak memory on CPU is ru_maxrss (torch's allocations are invisible
# to tracemalloc; large blocks are mmapped, so freed ones leave RSS), on CUDA max_memory_allocated, both
# above what the two paths share. Prints figures and ratios; asserts nothing.
# Usage: python bench/bench_spin.py [--layers 30] [--pairs 2] [--len 256] [--device cuda]
import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import collate  # noqa: E402
from kernels import sequence_logprobs  # noqa: E402
from model import Config, Transformer  # noqa: E402
from spin import spin_loss  # noqa: E402


def smollm2(layers):  # SmolLM2-135M's shape, random weights
    return Config(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)


def batch(a, dev):
    # Ragged pairs as SPIN sees them: a prompt (1/8 to 1/2 of --len), then a real and a generated answer of
    # different lengths, each row right-padded to the longest (data.collate), the real rows first.
    g = torch.Generator().manual_seed(0)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
    ids = lambda n: torch.randint(0, 49152, (n,), generator=g).tolist()  # noqa: E731
    real, gen = [], []
    for _ in range(a.pairs):
        p = ids(rand(a.len // 8, a.len // 2))
        real.append((p, ids(rand(a.len // 8, a.len - len(p)))))
        gen.append((p, ids(rand(a.len // 8, a.len - len(p)))))
    return collate(real + gen, 0, dev)


def naive_seq_logp(model, tokens, targets):
    logits = model(tokens).float()                                          # (2B, T, V) in fp32
    logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return sequence_logprobs(logp, targets != -100)


def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(a):
    dev = torch.device(a.device)
    torch.manual_seed(0)
    model = Transformer(smollm2(a.layers)).to(dev, getattr(torch, a.dtype))
    model.grad_checkpointing = a.grad_checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7, weight_decay=0.0)
    for p in model.parameters():  # materialise the optimizer state now (a zero step changes nothing)
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    tokens, targets = batch(a, dev)
    B = a.pairs
    # Baseline: what both paths hold (policy weights, optimizer state). Above it: the reference path's
    # frozen model copy, activations, logits and gradients: the memory each way of doing the step costs.
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if dev.type == "cuda" else rss_now()
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if a.worker == "reference" else None

    def ref_logps():
        with torch.no_grad():
            if ref_model is not None:
                return naive_seq_logp(ref_model, tokens, targets)
            return sequence_logprobs(model(tokens, targets=targets), targets != -100)

    def step(ref):
        if ref_model is not None:
            ref = ref_logps()                                               # every step, as TRL does
            seq = naive_seq_logp(model, tokens, targets)
        else:
            seq = sequence_logprobs(model(tokens, targets=targets), targets != -100)
        loss, _, _ = spin_loss(seq[:B], seq[B:], ref[:B], ref[B:], 0.1, "sigmoid")
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    ref = ref_logps()
    step(ref)                                       # warm-up: allocations, kernels
    sync()
    t0 = time.perf_counter()
    t_score = 0.0
    for _ in range(a.steps):
        if ref_model is None:                                               # ours: the once-per-iteration
            s0 = time.perf_counter()                                        # scoring pass, amortised over
            ref = ref_logps()                                               # the epochs below
            sync()
            t_score += time.perf_counter() - s0
        step(ref)
    sync()
    total = time.perf_counter() - t0
    seconds = total - t_score + t_score / a.epochs
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    tok = int((targets != -100).sum()) * a.steps
    print(json.dumps({"seconds": seconds, "tokens_per_s": tok / seconds, "peak_bytes": peak}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2, help="epochs the once-per-iteration scoring is shared by")
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--worker", default="")
    a = p.parse_args()
    if a.worker:
        return worker(a)
    print(f"SPIN step: SmolLM2-135M shape ({a.layers} layers, V=49152), {a.pairs} ragged pairs of up to "
          f"{a.len} tokens, {a.steps} steps, {a.device}, {a.dtype}")
    res = {}
    for name in ("reference", "ours"):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}  # RSS then follows what is alive
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", name],
                             capture_output=True, text=True, check=True, env=env)
        res[name] = json.loads(out.stdout.strip().splitlines()[-1])
        r = res[name]
        print(f"  {name:9s}  {r['tokens_per_s']:9.1f} train tokens/s   "
              f"peak extra memory {r['peak_bytes'] / 2**30:6.2f} GiB")
    print(f"  ratio: {res['ours']['tokens_per_s'] / res['reference']['tokens_per_s']:.2f}x throughput, "
          f"{res['ours']['peak_bytes'] / res['reference']['peak_bytes']:.2f}x peak extra memory")


if __name__ == "__main__":
    main()
