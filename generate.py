"""Batched, KV-cached sampling: where SPIN's opponent writes its answers, inside the training process.

prefill (ragged prompts, grouped by length so little compute goes to padding) -> decode_one_token (one
step for the whole batch) -> decode_n (the loop, until every row has produced a stop id). Randomness is
counter-based per prompt: draw t of a prompt is a hash of (its key, t), so a prompt gets the same sample
whether it is batched with others, alone, in another order, or on another rank.

    python generate.py --model PATH --prompt "Tell me a joke" [--raw] [--temperature 0.7 --top_p 0.9]
"""
import argparse
import hashlib
import sys
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import KVCache, Transformer

# ----- randomness: one counter-based stream per prompt -----

M32 = 0xFFFFFFFF


def hash32(x):
    # Wellons' lowbias32, a bijective 32-bit mixer, on int64 tensors < 2^32. Each multiply is done in
    # 16-bit halves, so no int64 product overflows on any device or under torch.compile.
    def mul(x, c):
        return ((((x * (c >> 16)) & 0xFFFF) << 16) + x * (c & 0xFFFF)) & M32
    x = mul(x ^ (x >> 16), 0x7FEB352D)
    x = mul(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def prompt_keys(prompts, seed, seeds=None):
    # (P, 2) int64, the two 32-bit halves of each prompt's 64-bit key. By default the key is a hash of
    # (seed, the prompt's tokens): grouping and order cannot matter, and identical prompts sample alike.
    if seeds is None:
        seeds = [int.from_bytes(hashlib.blake2b(repr((seed, list(p))).encode(), digest_size=8).digest(),
                                "little") for p in prompts]
    return torch.tensor([[(s >> 32) & M32, s & M32] for s in seeds], dtype=torch.long)


def uniforms(keys, steps):
    # keys (B, 2) -> (B, steps) float64 in [0, 1): draw t of row b depends on keys[b] and t only.
    t = hash32(torch.arange(steps, device=keys.device))[None]                           # (1, steps)
    return hash32(keys[:, :1] ^ hash32(keys[:, 1:] ^ t)).double() / 2.0 ** 32


# ----- sampling: temperature, then top-k, then top-p, as transformers does -----

def filter_logits(logits, top_k=0, top_p=1.0):
    # logits (B, V) -> the same with -inf where top-k / top-p remove a token.
    if top_k > 0:  # keep the k largest, and anything tied with the k-th
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]                 # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the smallest set of most likely tokens whose mass reaches top_p
        ascending, idx = logits.sort(-1)
        remove = ascending.softmax(-1).cumsum(-1) <= 1 - top_p  # the mass at or below each token
        remove[:, -1] = False                                   # the most likely token always stays
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    return logits


def sample(logits, u, temperature, top_k, top_p):
    # logits (B, V), u (B,) uniforms -> tokens (B,) and their log-probs (B,) under the distribution
    # sampled from; greedy reports the model's own (the point mass would say 0 for every token).
    # Inverse-CDF sampling needs one uniform per row where Gumbel-max needs one per vocabulary entry
    # (3x slower here). In float64, u * total < total, and a zero-probability token is never the first
    # CDF entry above it.
    logits = logits.float()
    if temperature == 0:
        tok = logits.argmax(-1)
    else:
        logits = filter_logits(logits / temperature, top_k, top_p)
        cdf = logits.softmax(-1).double().cumsum(-1)                                     # (B, V)
        tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
        tok = tok.clamp(max=logits.shape[-1] - 1)
    return tok, logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0]


# ----- the model: prefill, one decode step, the decode loop -----

def length_groups(lengths, budget):
    # Rows sorted by length; consecutive ones share a prefill forward while padding stays under a fifth
    # of it and its padded size under `budget` tokens.
    groups, real = [[]], 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        padded = (len(groups[-1]) + 1) * lengths[i]
        if groups[-1] and (padded > budget or padded > 1.25 * (real + lengths[i])):
            groups, real = groups + [[]], 0
        groups[-1].append(i)
        real += lengths[i]
    return groups


def prefill(model, prompts, cache, budget):
    # Writes B prompts into cache rows 0..B-1; returns their next-token logits (B, V). One padded forward
    # over a ragged batch can spend half its compute on padding, so rows of similar length go together,
    # each group through a small cache of its own length that is then copied into `cache`.
    dev, lengths = cache.k.device, [len(p) for p in prompts]
    last = torch.empty(len(prompts), model.config.hidden_size, dtype=cache.k.dtype, device=dev)  # (B, D)
    for rows in length_groups(lengths, budget):
        T = max(lengths[i] for i in rows)
        x = torch.tensor([prompts[i] + [0] * (T - lengths[i]) for i in rows], device=dev)     # (n, T)
        small = KVCache(model.config, len(rows), T, cache.k.dtype, dev)
        h = model(x, cache=small, hidden=True)                                           # (n, T, D)
        idx = torch.tensor(rows, device=dev)
        cache.k[:, idx, :, :T], cache.v[:, idx, :, :T] = small.k, small.v
        ends = torch.tensor([lengths[i] - 1 for i in rows], device=dev)
        last[idx] = h[torch.arange(len(rows), device=dev), ends]                         # last real token
    cache.pos.copy_(torch.tensor(lengths, device=dev))
    return F.linear(last, model.lm_weight)  # the LM head on B rows, not B * T


def decode_one_token(model, cache, tok, u, temperature, top_k, top_p):
    # tok (B,) the last tokens -> the next ones (B,) and their log-probs (B,); every row advances by one.
    logits = model(tok[:, None], cache=cache)[:, -1]                                     # (B, V)
    cache.pos += 1
    return sample(logits, u, temperature, top_k, top_p)


def all_done(done):
    # Ranks must run the same number of steps (and of all_reduces), so stop only when all are done.
    flag = done.all().int()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def decode_n(model, cache, tok, lp, done, u, stop, step, check_every, on_token=None):
    # tok, lp (B,) first new tokens and log-probs, done (B,) rows stopped, u (B, N) -> (B, n<=N) of both.
    # Stopped rows keep feeding tokens (cut later); "all stopped?" waits for the device, so it is asked
    # every `check_every` steps only.
    B, N = u.shape
    out = torch.empty(B, N, dtype=torch.long, device=tok.device)
    lps = torch.empty(B, N, dtype=torch.float32, device=tok.device)
    out[:, 0], lps[:, 0] = tok, lp
    n = 1
    while n < N and not (n % check_every == 0 and all_done(done)):
        tok, lp = (x.clone() for x in step(model, cache, tok, u[:, n]))  # a CUDA graph reuses its outputs
        out[:, n], lps[:, n] = tok, lp
        done |= torch.isin(tok, stop)
        if on_token:
            on_token(tok)
        n += 1
    return out[:, :n], lps[:, :n]


@contextmanager
def gathered(model):
    # FSDP2 all-gathers each block inside its forward and frees it after: hundreds of all-gathers per
    # answer. Instead gather everything once for the whole generation and reshard after. The unshard is
    # collective (every rank enters together); inside, forwards do no communication at all.
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not mods or getattr(model, "_gathered", False):  # not sharded, or already inside
        yield model
        return
    # set_reshard_after_forward has no getter: keep FSDP's own fields to restore them exactly.
    states = [m._get_fsdp_state() for m in mods]
    saved = [(getattr(s, "_auto_reshard_after_forward", None), [g.post_forward_mesh_info for g in groups(s)])
             for s in states]
    model._gathered = True
    try:
        for m in mods:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        yield model
    finally:
        model._gathered = False
        for s, (auto, infos) in zip(states, saved):
            if auto is not None:
                s._auto_reshard_after_forward = auto
            if auto is not False and s._is_root:  # FSDP's rule for the root at its lazy init (maybe in here)
                infos = [None] * len(infos)
            for g, info in zip(groups(s), infos):
                g.post_forward_mesh_info = info
        for m in mods:
            m.reshard()


def groups(state):  # a module's FSDP parameter groups: one in torch <= 2.11, a list in later versions
    gs = getattr(state, "_fsdp_param_groups", None)
    return list(gs) if gs is not None else [g for g in [state._fsdp_param_group] if g is not None]


# ----- the entry point -----

_compiled = {}  # one compiled step per (sampling setting, device type): the settings are graph constants


def make_step(sampling, cache, compile):
    step = lambda m, c, t, u: decode_one_token(m, c, t, u, *sampling)  # noqa: E731
    if not compile:
        return step
    # On CUDA "reduce-overhead" replays the step as a CUDA graph, which may update the cache in place
    # only at addresses marked static. On CPU compiling did not pay: measured 2.4x slower, 3 min to build.
    cuda = cache.k.device.type == "cuda"
    for t in (cache.k, cache.v, cache.pos):
        torch._dynamo.mark_static_address(t)
    key = (sampling, cuda)
    _compiled[key] = _compiled.get(key) or torch.compile(step, mode="reduce-overhead" if cuda else None)
    return _compiled[key]


@torch.no_grad()
def generate(model, prompts, max_new_tokens, *, temperature=1.0, top_p=1.0, top_k=0, stop_ids=(),
             seed=None, seeds=None, return_logprobs=False, compile=False, batch_size=None,
             prefill_tokens=8192, check_every=8, on_token=None):
    """prompts: token-id lists of any lengths. Returns, per prompt, its new tokens up to and including the
    first stop id; with return_logprobs, (tokens, log-probs) pairs: each token's log-prob under the
    sampling distribution (at temperature 1, top-p 1, top-k 0, the model's own). temperature 0: greedy.
    seeds: one int per prompt; by default derived from `seed` and the prompt's tokens (seed None: drawn
    from torch's generator). batch_size: rows decoded together (default all). prefill_tokens: padded
    tokens per prefill forward at most. on_token(tok (B,)) sees every step's tokens (streaming).
    Under torch.distributed every rank calls this together, each with any number of prompts: a rank with
    fewer batches runs dummy ones, so that all ranks run the same steps."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    seed = int(torch.randint(2 ** 62, ()).item()) if seed is None else seed
    keys = prompt_keys(prompts, seed, seeds)                                              # (P, 2)
    bs = batch_size or max(len(prompts), 1)
    batches = [list(range(i, min(i + bs, len(prompts)))) for i in range(0, len(prompts), bs)]
    results, cache = [None] * len(prompts), None
    # One cache length for all batches, rounded up; under compile also one batch size (the last batch
    # filled with dummy rows): the compiled step then sees one shape at one address.
    max_len = -(-(max(map(len, prompts), default=1) + max_new_tokens) // 128) * 128
    with gathered(model):
        w = model.lm_weight  # gathered: the full weight, in the dtype forwards compute in
        if dist.is_available() and dist.is_initialized():
            n = torch.tensor(len(batches), device=w.device)
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            batches += [[]] * (int(n) - len(batches))
        for rows in batches:
            rows = rows + [None] * ((bs if compile else 1) - len(rows))  # None: a dummy row, stopped
            if cache is None or cache.k.shape[1] != len(rows):
                cache = KVCache(model.config, len(rows), max_len, w.dtype, w.device)
                step = make_step((temperature, top_k, top_p), cache, compile)
            batch = [prompts[i] if i is not None else [0] for i in rows]
            k = torch.stack([keys[i] if i is not None else keys.new_zeros(2) for i in rows])
            dummy = torch.tensor([i is None for i in rows], device=w.device)
            out = generate_batch(model, cache, batch, k, dummy, max_new_tokens, stop_ids, step,
                                 (temperature, top_k, top_p), prefill_tokens, check_every, on_token)
            for i, toks, lps in zip(rows, *out):
                if i is not None:
                    results[i] = (toks, lps) if return_logprobs else toks
    return results


def generate_batch(model, cache, prompts, keys, dummy, max_new_tokens, stop_ids, step, sampling,
                   prefill_tokens, check_every, on_token):
    # One batch, B = cache rows: prefill, first token, decode loop; each row cut at its first stop id.
    if max_new_tokens <= 0:
        return [[] for _ in prompts], [[] for _ in prompts]
    u = uniforms(keys.to(cache.k.device), max_new_tokens)                               # (B, N)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=cache.k.device)
    tok, lp = sample(prefill(model, prompts, cache, prefill_tokens), u[:, 0], *sampling)
    if on_token:
        on_token(tok)
    out, lps = decode_n(model, cache, tok, lp, torch.isin(tok, stop) | dummy, u, stop, step, check_every,
                        on_token)
    is_stop = torch.isin(out, stop)
    ends = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, out.shape[1]).tolist()
    return [o[:e] for o, e in zip(out.tolist(), ends)], [p[:e] for p, e in zip(lps.tolist(), ends)]


# ----- command line: stream one answer -----

def main():
    ap = argparse.ArgumentParser(description="Sample one answer from a checkpoint, streaming the text.")
    ap.add_argument("--model", required=True, help="a Hugging Face checkpoint directory or a .gguf file")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (pays on CUDA)")
    args = ap.parse_args()
    from data import Tokenizer
    tok = Tokenizer.from_pretrained(args.model)
    model = Transformer.from_pretrained(args.model, getattr(torch, args.dtype), args.device).eval()
    ids = tok.encode(args.prompt) if args.raw else \
        tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    new, shown = [], ""

    def show(t):  # decode all so far and print what is new: a token need not end on a character
        nonlocal shown
        if new and new[-1] in tok.eos_ids:
            return  # stopped; the loop runs on until its next check
        new.append(int(t[0]))
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
            print(text[len(shown):], end="", flush=True)
            shown = text

    t0 = time.perf_counter()
    generate(model, [ids], args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
             top_k=args.top_k, stop_ids=tok.eos_ids, seed=args.seed, compile=args.compile, on_token=show)
    dt = time.perf_counter() - t0
    print(tok.decode(new)[len(shown):])  # whatever was held back, and the final newline
    print(f"[{len(new)} tokens in {dt:.2f} s: {len(new) / dt:.1f} tok/s]", file=sys.stderr)


if __name__ == "__main__":
    main()
