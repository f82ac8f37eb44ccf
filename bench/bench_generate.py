# Our generate() against transformers' generate(): same machine, model, prompts and settings, one run.
#   python bench/bench_generate.py [--threads 1] [--device cpu|cuda] [--compile] [--batch 8] [--new 64]
# A SmolLM2-135M-shaped Llama with random weights, a ragged batch (prompts of 20..120 tokens), greedy,
# fp32, exactly `new` tokens per row on both sides (min_new_tokens there, no stop ids here).
import argparse
import os
import sys
import tempfile
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from generate import generate  # noqa: E402
from model import Transformer  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                    rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192)


def timed(fn, repeats, device):
    # Best of `repeats` wall-clock runs (a shared machine only ever adds time), and that run's CPU time.
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - w, time.process_time() - c))
    return best, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    # One thread by default: on a shared CPU, OpenMP threads waiting on each other at every op turn a
    # 0.3 ms matmul into 15 ms and the figures into noise. Both sides always get the same setting.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true",
                    help="also time our compiled decode step (pays on CUDA; on CPU minutes to build, slower)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype, dev = getattr(torch, args.dtype), args.device
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_135M)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = Transformer.from_pretrained(d, dtype, dev).eval()
    hf = hf.to(dev, dtype)
    B, N = args.batch, args.new
    lengths = torch.linspace(20, 120, B).long().tolist()
    prompts = [torch.randint(0, 49152, (n,)).tolist() for n in lengths]
    T = max(lengths)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=dev)  # transformers: left padding
    mask = (torch.arange(T)[None] >= torch.tensor([T - n for n in lengths])[:, None]).long().to(dev)

    def run_hf(n=N):
        with torch.no_grad():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0)[:, T:].tolist()

    def run_ours(compile=False):
        return generate(ours, prompts, N, temperature=0, compile=compile)

    print(f"{dev} ({torch.get_num_threads()} threads), {args.dtype}: batch {B}, prompts {lengths[0]}.."
          f"{lengths[-1]} tokens, {N} new tokens each, greedy, SmolLM2-135M shape (random weights)")
    generate(ours, prompts[:2], 4, temperature=0)  # warm-up both
    run_hf(4)
    (w_hf, c_hf), out_hf = timed(run_hf, args.repeats, dev)
    (w, c), out = timed(run_ours, args.repeats, dev)
    assert all(len(o) == N for o in out) and all(len(o) == N for o in out_hf)
    agree = sum(a == b for x, y in zip(out, out_hf) for a, b in zip(x, y)) / (B * N)
    print(f"transformers generate(): {B * N / w_hf:8.1f} tok/s  ({w_hf:.2f} s wall, {c_hf:.2f} s CPU)")
    print(f"ours:                    {B * N / w:8.1f} tok/s  ({w:.2f} s wall, {c:.2f} s CPU)  "
          f"x{w_hf / w:.2f} (greedy tokens equal to transformers': {agree:.0%})")
    if args.compile:
        t0 = time.perf_counter()
        run_ours(compile=True)
        print(f"  compiling and a first run: {time.perf_counter() - t0:.1f} s")
        (wc, cc), out_c = timed(lambda: run_ours(compile=True), args.repeats, dev)
        same = sum(a == b for x, y in zip(out_c, out) for a, b in zip(x, y)) / (B * N)
        print(f"ours, compiled step:     {B * N / wc:8.1f} tok/s  ({wc:.2f} s wall, {cc:.2f} s CPU)  "
              f"x{w_hf / wc:.2f} (tokens equal to eager: {same:.0%})")


if __name__ == "__main__":
    main()
