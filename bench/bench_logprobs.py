# Peak extra memory and time of forward + backward of per-token log-probs: the naive path (full fp32 logits,
# log_softmax, gather) against kernels.fused_logprobs (impl auto: Triton on CUDA, PyTorch twin on CPU).
# Default shape: 4096 tokens x SmolLM2-135M's head (D=576, V=49152). Peak memory: each path in a fresh
# subprocess, after a warm-up; on CPU its ru_maxrss minus the RSS before the step (torch's CPU allocations
# are invisible to tracemalloc), on CUDA torch.cuda.max_memory_allocated. Time: best of --repeats, paths
# alternated, in this process. Prints figures and ratios; asserts nothing.
# Usage: python bench/bench_logprobs.py [--device cuda] [--dtype bf16] [--dim 4096 --vocab 128256]
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import fused_logprobs  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def naive(h, w, t):
    # what a training loop usually does: (N, V) logits upcast to fp32, a full log_softmax, a gather
    return torch.log_softmax((h @ w.T).float(), -1).gather(1, t[:, None])[:, 0]


def twin(h, w, t):
    return fused_logprobs(h, w, t, impl="torch")


PATHS = {"naive": naive, "fused": fused_logprobs, "twin": twin}  # twin: the PyTorch twin, shown on CUDA


def setup(a):
    # inputs drawn directly in their dtype so setting up raises no memory peak of its own
    dev, dtype = torch.device(a.device), DTYPES[a.dtype]
    torch.manual_seed(0)
    h = torch.randn(a.tokens, a.dim, device=dev, dtype=dtype).requires_grad_()
    w = torch.randn(a.vocab, a.dim, device=dev, dtype=dtype).mul_(a.dim ** -0.5).requires_grad_()
    return h, w, torch.randint(0, a.vocab, (a.tokens,), device=dev)


def step(fn, h, w, t):
    h.grad = w.grad = None
    fn(h, w, t).sum().backward()
    if h.is_cuda:
        torch.cuda.synchronize()


def rss():  # current resident set size, bytes
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(a):
    # one fresh process per path: peak memory of one forward+backward above what the inputs already take
    h, w, t = setup(a)
    fn = PATHS[a.worker]
    if h.is_cuda:  # warm up (Triton compiles), then count from what is held now
        step(fn, h, w, t)
        h.grad = w.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, h, w, t)
        peak = torch.cuda.max_memory_allocated() - base
    else:  # ru_maxrss never goes down: warm up on a small problem (one-time costs such as MKL's buffers
        # and thread pools, as the CUDA warm-up does), then measure the first full-size step
        step(fn, *setup(argparse.Namespace(**{**vars(a), "tokens": 256, "vocab": 4096})))
        base = rss()
        step(fn, h, w, t)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"peak": peak}))


def timings(a, paths):
    # alternate the paths and keep each one's best time, so a busy machine penalises all alike
    h, w, t = setup(a)
    best = {name: float("inf") for name in paths}
    for name in paths if h.is_cuda else ():  # warm-up: compiles the Triton kernels
        step(PATHS[name], h, w, t)
    for _ in range(a.repeats):
        for name in paths:
            fn = PATHS[name]
            t0 = time.perf_counter()
            step(fn, h, w, t)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--repeats", type=int, default=None)  # default: 2 on CPU, 10 on CUDA
    p.add_argument("--worker", choices=list(PATHS))
    a = p.parse_args()
    if a.repeats is None:
        a.repeats = 10 if a.device.startswith("cuda") else 2
    if a.worker:
        return worker(a)
    print(f"forward+backward of log p(target): {a.tokens} tokens, D={a.dim}, V={a.vocab}, {a.dtype}, "
          f"{a.device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    paths = ["naive", "fused", "twin"] if a.device.startswith("cuda") else ["naive", "fused"]
    peak = {}
    for name in paths:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", name],
                             capture_output=True, text=True)
        peak[name] = float("nan")
        if out.returncode:  # e.g. out of memory: report it and go on with the other paths
            print(f"  {name}: worker failed\n{out.stderr[-3000:]}")
        else:
            peak[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    best = timings(a, paths)
    for name in paths:
        print(f"  {name:6s} peak extra memory {peak[name] / 2**20:8.1f} MiB   "
              f"best time {best[name] * 1e3:9.1f} ms")
    floor = a.vocab * a.dim * DTYPES[a.dtype].itemsize  # the weight gradient every path must hold
    for name in paths[1:]:
        print(f"  {name}/naive: memory {peak[name] / peak['naive']:.1%} (weight gradient alone: "
              f"{floor / peak['naive']:.1%}), time {best[name] / best['naive']:.2f}x")


if __name__ == "__main__":
    main()
