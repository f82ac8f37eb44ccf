"""Batched, KV-cached sampling: where SPIN's opponent writes its answers, inside the training process.

prefill (ragged prompts, grouped by length so little compute goes to padding) -> decode_one_token (one
step for the whole batch) -> decode_n (the loop, until every row has produced a stop id). Randomness is
counter-based per prompt: the t-th draw of a prompt is a hash of (its seed, t), so a prompt gets the same
sample whether it is batched with others, alone, in another order, or on another rank.

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


def mul32(x, c):
    # x * c mod 2^32 for int64 tensors x < 2^32, in 16-bit halves so no int64 product overflows.
    return ((((x * (c >> 16)) & 0xFFFF) << 16) + x * (c & 0xFFFF)) & M32


def hash32(x):
    # Wellons' lowbias32: a cheap bijective 32-bit mixer, vectorised on any device.
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def prompt_keys(prompts, seed, seeds):
    # (B, 2) int64 32-bit halves of each prompt's key. Default key: (seed, prompt content), so grouping
    # and order never matter; identical prompts then sample identically unless `seeds` tells them apart.
    if seeds is None:
        seeds = [int.from_bytes(hashlib.blake2b(repr((seed, list(p))).encode(), digest_size=8).digest(),
                                "little") for p in prompts]
    return torch.tensor([[(s >> 32) & M32, s & M32] for s in seeds], dtype=torch.long)


def uniforms(keys, steps):
    # (B, steps) float64 in [0, 1): draw t of row b depends on keys[b] and t only.
    t = hash32(torch.arange(steps, dtype=torch.long, device=keys.device))[None]      # (1, steps)
    h = hash32(keys[:, :1] ^ hash32(keys[:, 1:] ^ t))                                # (B, steps)
    return h.double() / 2.0 ** 32


# ----- sampling: temperature, top-k, top-p as in transformers -----

def filter_logits(logits, top_k=0, top_p=1.0):
    # logits (B, V) -> the same with -inf where top-k / top-p remove a token (transformers' rules).
    if top_k > 0:  # keep the k largest, and anything tied with the k-th
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]             # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the smallest set of most likely tokens whose mass reaches top_p
        ascending, idx = logits.sort(-1)
        remove = ascending.softmax(-1).cumsum(-1) <= 1 - top_p  # mass of everything at or below it
        remove[:, -1] = False                                   # the most likely token always stays
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    return logits


def sample(logits, u, temperature, top_k, top_p):
    # logits (B, V), u (B,) uniforms -> tokens (B,), their log-probs (B,) under the distribution sampled.
    # Inverse-CDF sampling needs one uniform per row, not one per vocabulary entry (as Gumbel-max would);
    # the CDF is float64 so u * total < total, and a zero-probability token is never the first bin > x.
    # Greedy (temperature 0) reports the model's own log-prob, the point mass would say 0 for every token.
    logits = logits.float()
    if temperature == 0:
        tok = logits.argmax(-1)
    else:
        logits = filter_logits(logits / temperature, top_k, top_p)
        cdf = logits.softmax(-1).double().cumsum(-1)                                 # (B, V)
        tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
        tok = tok.clamp(max=logits.shape[-1] - 1)
    return tok, logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0]


# ----- the model: prefill, one decode step, the decode loop -----

def prefill(model, prompts, cache, group_tokens):
    # Writes B prompts into cache rows 0..B-1 and returns their next-token logits (B, V). One padded
    # forward over a ragged batch would spend up to half its compute on padding, so rows are sorted by
    # length and prefilled in groups of at most `group_tokens` padded tokens, each in a small cache of
    # its own length whose keys/values are then copied into `cache`.
    dev, B = cache.k.device, len(prompts)
    order = sorted(range(B), key=lambda i: len(prompts[i]))
    last = torch.empty(B, model.config.hidden_size, dtype=cache.k.dtype, device=dev)  # (B, D)
    start = 0
    while start < B:
        end = start + 1
        while end < B and (end + 1 - start) * len(prompts[order[end]]) <= group_tokens:
            end += 1
        rows, T = order[start:end], len(prompts[order[end - 1]])
        x = torch.tensor([prompts[i] + [0] * (T - len(prompts[i])) for i in rows], device=dev)  # (n, T)
        small = KVCache(model.config, len(rows), T, cache.k.dtype, dev)
        h = model(x, cache=small, hidden=True)                                       # (n, T, D)
        idx = torch.tensor(rows, device=dev)
        cache.k[:, idx, :, :T], cache.v[:, idx, :, :T] = small.k, small.v
        lengths = torch.tensor([len(prompts[i]) for i in rows], device=dev)
        last[idx] = h[torch.arange(len(rows), device=dev), lengths - 1]              # each row's last real
        start = end
    cache.pos.copy_(torch.tensor([len(p) for p in prompts], device=dev))
    return F.linear(last, model.lm_weight)                                           # (B, V)


def decode_one_token(model, cache, tok, u, temperature, top_k, top_p):
    # tok (B,) the last tokens -> the next ones (B,) and their log-probs; advances every row by one.
    logits = model(tok[:, None], cache=cache)[:, -1]                                 # (B, V)
    cache.pos += 1
    return sample(logits, u, temperature, top_k, top_p)


def all_done(done):
    # Every rank must run the same number of steps, so stop only when all ranks' rows are done.
    flag = done.all().int()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def decode_n(model, cache, tok, done, u, stop, step, check_every, on_token=None):
    # tok (B,) the first new tokens, done (B,) rows already stopped, u (B, N) uniforms -> tokens and
    # log-probs (B, n-1) of steps 1..n-1, n <= N. Rows that stopped keep feeding tokens (their outputs
    # are cut later); "all stopped" is checked every `check_every` steps, since each check is a host sync.
    B, N = u.shape
    out = torch.empty(B, N - 1, dtype=torch.long, device=tok.device)
    lps = torch.empty(B, N - 1, dtype=torch.float32, device=tok.device)
    n = 1
    while n < N and not (n % check_every == 0 and all_done(done)):
        tok, lp = step(model, cache, tok, u[:, n])
        out[:, n - 1], lps[:, n - 1] = tok, lp
        done |= torch.isin(tok, stop)
        if on_token:
            on_token(tok)
        n += 1
    return out[:, :n - 1], lps[:, :n - 1]


@contextmanager
def gathered(model):
    # FSDP2 all-gathers each block's parameters inside its forward and frees them after; generation runs
    # hundreds of small forwards, so gather everything once, keep it through generation, reshard after.
    # The unshard is collective: every rank enters together. Inside, forwards do no communication.
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not mods or getattr(model, "_gathered", False):
        yield model
        return
    # set_reshard_after_forward has no getter: save FSDP's own fields to restore them exactly
    # (the root's value is set by FSDP itself, not by the user).
    saved = [(s, s._auto_reshard_after_forward, [g.post_forward_mesh_info for g in s._fsdp_param_groups])
             for s in (m._get_fsdp_state() for m in mods)]
    model._gathered = True
    try:
        for m in mods:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        yield model
    finally:
        model._gathered = False
        for s, auto, infos in saved:
            s._auto_reshard_after_forward = auto
            for g, info in zip(s._fsdp_param_groups, infos):
                g.post_forward_mesh_info = info
        for m in mods:
            m.reshard()


# ----- the public entry point -----

_compiled = {}


@torch.no_grad()
def generate(model, prompts, max_new_tokens, *, temperature=1.0, top_p=1.0, top_k=0, stop_ids=(),
             seed=None, seeds=None, return_logprobs=False, compile=False, batch_size=None,
             group_tokens=512, check_every=8, on_token=None):
    """prompts: token-id lists of any lengths. Returns, per prompt, its new tokens up to and including the
    first stop id; with return_logprobs, (tokens, log-probs) pairs, each token's log-prob under the
    sampling distribution (at temperature 1, top-p 1, top-k 0: the model's own). temperature 0 = greedy.
    seeds: one int per prompt; by default derived from `seed` and the prompt's content (seed None draws
    one from torch's global generator). batch_size: prompts per batch (default all). group_tokens: the
    padded-token budget of one prefill forward. on_token(tok (B,)) sees each step's tokens (streaming).
    Under torch.distributed every rank calls this together, with any number of prompts: ranks with fewer
    batches run dummy ones, so every rank runs the same number of decode steps."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if seed is None:
        seed = int(torch.randint(2 ** 62, ()).item())
    keys = prompt_keys(prompts, seed, seeds)                                          # (P, 2)
    bs = batch_size or max(len(prompts), 1)
    batches = [list(range(i, min(i + bs, len(prompts)))) for i in range(0, len(prompts), bs)]
    if dist.is_available() and dist.is_initialized():
        n = torch.tensor(len(batches), device=model.lm_weight.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        batches += [[]] * (int(n) - len(batches))
    sampling = (temperature, top_k, top_p)
    step = lambda m, c, t, u: decode_one_token(m, c, t, u, *sampling)  # noqa: E731
    if compile:  # one compiled step per sampling setting: they are constants inside the graph
        step = _compiled.setdefault(sampling, torch.compile(step, dynamic=False))
    results = [None] * len(prompts)
    with gathered(model):
        for rows in batches:
            batch = [prompts[i] for i in rows] or [[0]]  # a dummy row, stopped from the start
            toks, lps = generate_batch(model, batch, keys[rows] if rows else torch.zeros(1, 2, dtype=torch.long),
                                       max_new_tokens, stop_ids, sampling, step, group_tokens, check_every,
                                       on_token, dummy=not rows)
            for i, t, lp in zip(rows, toks, lps):
                results[i] = (t, lp) if return_logprobs else t
    return results


def generate_batch(model, prompts, keys, max_new_tokens, stop_ids, sampling, step, group_tokens,
                   check_every, on_token, dummy=False):
    B, w = len(prompts), model.lm_weight
    if max_new_tokens <= 0:
        return [[]] * B, [[]] * B
    # Round the cache length up so the compiled decode step sees few distinct shapes.
    max_len = -(-(max(map(len, prompts)) + max_new_tokens) // 64) * 64
    cache = KVCache(model.config, B, max_len, w.dtype, w.device)
    u = uniforms(keys.to(w.device), max_new_tokens)                                  # (B, N)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=w.device)
    tok, lp = sample(prefill(model, prompts, cache, group_tokens), u[:, 0], *sampling)
    if on_token:
        on_token(tok)
    done = torch.isin(tok, stop) | dummy
    out, lps = decode_n(model, cache, tok, done, u, stop, step, check_every, on_token)
    out, lps = torch.cat([tok[:, None], out], 1), torch.cat([lp[:, None], lps], 1)  # (B, n)
    # Cut each row after its first stop id, on the host, once.
    is_stop = torch.isin(out, stop)
    ends = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, out.shape[1]).tolist()
    return [o[:e] for o, e in zip(out.tolist(), ends)], [p[:e] for p, e in zip(lps.tolist(), ends)]
