# RMSNorm forward + backward: model.RMSNorm (its own backward) against transformers' LlamaRMSNorm under
# autograd, at a packed train row of SmolLM2-135M (2048 tokens x 576), 61 of which run per forward. Time (the
# median of interleaved repeats, fresh tensors each, as in a train step) and the bytes the ops allocate per
# element, per dtype; bf16 only where the CPU has bf16 units (elsewhere it is emulated). Fresh memory is
# what a CPU step pays for: on a VM each first touch of a 4 KB page costs a page fault, so run it also
# under MALLOC_MMAP_THRESHOLD_=1048576 (bench_train.py's setting: every freed MB goes back to the OS).
#   python bench/bench_norm.py [--tokens 2048] [--dim 576] [--repeats 30] [--threads 2]
import argparse
import os
import statistics
import sys
import time

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import RMSNorm, compute_dtype  # noqa: E402
from spin_kernels import use_fast_norm  # noqa: E402


def step(norm, x, gy):  # one forward and backward on fresh leaves, as autograd meets them in a train step
    x = x.clone().requires_grad_()
    norm.weight.grad = None
    norm(x).backward(gy)


def allocated(norm, x, gy):  # bytes the aten ops allocate, per element of x
    with torch.profiler.profile(profile_memory=True) as prof:
        step(norm, x, gy)
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages() if e.key.startswith("aten::")) \
        / x.numel()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtypes = [torch.float32] + ([torch.bfloat16] if compute_dtype("cpu") == torch.bfloat16 else [])
    print(f"RMSNorm fwd+bwd, ({a.tokens}, {a.dim}), {a.threads} threads, MALLOC_MMAP_THRESHOLD_="
          f"{os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}")
    for dtype in dtypes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, a.tokens, a.dim, generator=g).to(dtype)
        gy = torch.randn(1, a.tokens, a.dim, generator=g).to(dtype)
        sides = {"ours": use_fast_norm(RMSNorm(a.dim, 1e-5).to(dtype)),
                 "transformers": LlamaRMSNorm(a.dim, 1e-5).to(dtype)}
        times = {k: [] for k in sides}
        for _ in range(a.repeats):
            for k, norm in sides.items():
                t = time.perf_counter()
                step(norm, x, gy)
                times[k].append(time.perf_counter() - t)
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        mem = {k: allocated(norm, x, gy) for k, norm in sides.items()}
        print(f"  {str(dtype)[6:]:9s} ours {ms['ours']:6.2f} ms, {mem['ours']:4.1f} B/elem | transformers "
              f"{ms['transformers']:6.2f} ms, {mem['transformers']:4.1f} B/elem | ours "
              f"{ms['transformers'] / ms['ours']:.2f}x faster, {mem['ours'] / mem['transformers']:.2f}x the bytes")


if __name__ == "__main__":
    main()
