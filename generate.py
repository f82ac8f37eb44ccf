"""Continuous batching for SPIN's opponent: a pool of KV-cache rows, each refilled as its answer ends.

A fixed pool of S cache rows decodes together, one token per live row per step (decode_one_token). When
a row stops (a stop id, or max_new_tokens), the next waiting prompt is prefilled into it between two
decode steps while the other rows keep their caches (static batching: refill only a drained pool). The
cache is as long as the longest live row needs, so a step reads no unused slots; between resizes the
device step sees fixed shapes at fixed addresses, as `torch.compile` and CUDA graphs want. Randomness is
counter-based: draw t of a prompt is a hash of (its key, t), so a prompt gets the same sample whatever the
pool, its neighbours or its rank, up to floating point (a GEMM rounds differently with the batch's shape,
which can flip a draw in the distribution's far tail: docs/running.md, "generate").

    python generate.py --model PATH --prompt "Tell me a joke" [--raw] [--temperature 0.7 --top_p 0.9]
                       [--min_p 0.1 --repetition_penalty 1.2]
"""
import argparse
import hashlib
import math
import sys
import time
from collections import deque

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import Tokenizer
from model import KVCache, Transformer, compute_dtype, resolve_model
from spin_kernels import packed_weights, speed_up
from spin_kernels.machine import free_memory, mark_static, max_pool

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
    return torch.tensor([[(s >> 32) & M32, s & M32] for s in seeds], dtype=torch.long).view(-1, 2)


def uniforms(keys, t):
    # keys (B, 2), t (B,) draw counters -> (B,) float64 in [0, 1): draw t of a row depends on its key
    # and t only.
    return hash32(keys[:, 0] ^ hash32(keys[:, 1] ^ hash32(t))).double() / 2.0 ** 32


# ----- sampling: repetition penalty, temperature, top-k, top-p, then min-p, as transformers does -----

def penalize(logits, seen, penalty):
    # logits (B, V), seen (B, V) bool: the tokens already in each row (its prompt and its answer so far).
    # transformers' repetition_penalty (Keskar et al., 2019): a seen token's logit is divided by penalty
    # where positive, multiplied where negative, so it always loses odds. A small model at temperature 1
    # otherwise falls into loops that never reach a stop id (docs/default_run.md).
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def running_sum(x, chunk=32):
    # x (B, V) >= 0 -> its cumulative sums along V (B, V). Compiled: two scans, within chunks of 32 (never
    # split), then over the chunks' totals (a plain buffer), since Inductor (torch 2.11) crashes generating
    # CUDA code for a long scan of a value computed per row, as (logits - top).exp() is (pytorch#180369;
    # tested on the step's Triton code, generated on a CPU). Eager: one pass over (B, V), not three.
    if not torch.compiler.is_compiling():
        return x.cumsum(-1)
    B, V = x.shape
    w = F.pad(x, (0, -V % chunk)).view(B, -1, chunk).cumsum(-1)                        # (B, C, chunk)
    before = F.pad(w[:, :-1, -1].cumsum(-1), (1, 0))                                   # (B, C)
    return before.repeat_interleave(chunk, 1)[:, :V] + w.flatten(1)[:, :V]  # not a view: searchsorted


def filter_logits(logits, top_k=0, top_p=1.0, min_p=0.0):
    # logits (B, V) -> the same with -inf where top-k / top-p / min-p remove a token.
    if top_k > 0:  # keep the k largest, and anything tied with the k-th
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]                 # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the smallest set of most likely tokens whose mass reaches top_p
        ascending, idx = logits.sort(-1)
        remove = running_sum(ascending.softmax(-1)) <= 1 - top_p  # the mass at or below each token
        remove[:, -1] = False                                   # the most likely token always stays
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    if min_p > 0:  # keep tokens at least min_p times as likely as the most likely one
        top = logits.amax(-1, keepdim=True)                                            # (B, 1)
        logits = logits.masked_fill(logits < top + math.log(min_p), float("-inf"))
    return logits


def sample(logits, u, temperature, top_k, top_p, min_p=0.0, penalty=1.0, seen=None):
    # logits (B, V) fp32, u (B,) float64 uniforms, seen (B, V) bool when penalty != 1 -> tokens (B,) and
    # their log-probs (B,) under the distribution sampled from (greedy: the penalised model's own, not the
    # point mass's 0). Inverse-CDF sampling needs one uniform per row, Gumbel-max one per vocabulary entry.
    # The CDF is a fp32 running sum (never decreasing, cheaper than float64); the target u * total is rounded
    # down to fp32, so it stays below the total and the first CDF entry above it has nonzero probability.
    if penalty != 1:
        logits = penalize(logits, seen, penalty)
    if temperature == 0:
        top, tok = logits.max(-1)
        return tok, top - logits.logsumexp(-1)
    if temperature != 1:
        logits = logits / temperature
    logits = filter_logits(logits, top_k, top_p, min_p)
    top = logits.amax(-1, keepdim=True)                                                 # (B, 1)
    cdf = running_sum((logits - top).exp_())                                            # (B, V)
    total = cdf[:, -1]
    target = u * total.double()
    below = target.float()
    below = torch.where(below.double() > target, below.nextafter(torch.zeros_like(below)), below)
    tok = torch.searchsorted(cdf, below[:, None], right=True)[:, 0]
    return tok, (logits.gather(-1, tok[:, None]) - top)[:, 0] - total.log()


def from_generation_config(config, source="generation_config.json"):
    # generation_config.json (a dict) -> generate()'s sampling arguments: what transformers' generate() does
    # with it and no arguments of its own (the reference's HF script), its defaults where a field is unset.
    unsupported = dict(num_beams=1, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, top_h=None,
                       no_repeat_ngram_size=0, encoder_repetition_penalty=1.0, penalty_alpha=None)
    for key, default in unsupported.items():
        if config.get(key) not in (None, default):
            raise ValueError(f"{source}: {key}={config[key]} is not supported by this sampler")
    g = {k: v if config.get(k) is None else config[k] for k, v in dict(
        do_sample=False, temperature=1.0, top_k=50, top_p=1.0, min_p=0.0, repetition_penalty=1.0).items()}
    return dict(temperature=g["temperature"] if g["do_sample"] else 0.0, top_k=g["top_k"] or 0,
                top_p=g["top_p"], min_p=g["min_p"], repetition_penalty=g["repetition_penalty"])


# ----- the device side: prefill into some rows, one decode step for the whole pool -----

def length_groups(lengths, budget):
    # Rows sorted by length; consecutive ones share a prefill forward while padding stays under a fifth
    # of it and its padded size under `budget` tokens (a longer prompt alone is prefilled in chunks).
    groups, real = [[]], 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        padded = (len(groups[-1]) + 1) * lengths[i]
        if groups[-1] and (padded > budget or padded > 1.25 * (real + lengths[i])):
            groups, real = groups + [[]], 0
        groups[-1].append(i)
        real += lengths[i]
    return groups


def prefill(model, cache, rows, prompts, budget):
    # Writes prompts (token lists) into cache rows `rows`, every other row untouched; returns their
    # next-token logits (n, V). A group of prompts goes through a cache of its own, then into its rows. A
    # forward covers at most `budget` tokens: a longer prompt goes through in chunks, each attending to
    # the ones before it in the group's cache.
    dev, lengths = cache.pos.device, [len(p) for p in prompts]
    last = torch.empty(len(prompts), model.config.hidden_size, dtype=cache.k[0].dtype, device=dev)  # (n, D)
    for group in length_groups(lengths, budget):
        T, n = max(lengths[i] for i in group), len(group)
        x = torch.tensor([prompts[i] + [0] * (T - lengths[i]) for i in group], device=dev)   # (g, T)
        own = KVCache(model.config, n, T, cache.k[0].dtype, dev)
        C = max(1, budget // n)
        for c in range(0, T, C):
            chunk = x[:, c:c + C]                                                            # (g, <=C)
            own.pos.fill_(c)
            own.length = c + chunk.shape[1]  # the slots this chunk's queries may see
            h = model(chunk, cache=own, hidden=True)                                         # (g, <=C, D)
            ends = [(j, i, lengths[i] - 1 - c) for j, i in enumerate(group) if c < lengths[i] <= c + C]
            if ends:
                j, i, e = (torch.tensor(v, device=dev) for v in zip(*ends))
                last[i] = h[j, e]                                                 # each row's last token
        at = torch.tensor([rows[i] for i in group], device=dev)
        for K, k in zip(cache.k + cache.v, own.k + own.v):
            K[at, :, :T] = k
    return model.logits(last).float()                                     # (n, V) fp32


def decode_one_token(model, cache, tok, keys, n, seen, temperature, top_k, top_p, min_p=0.0, penalty=1.0):
    # tok (S,) every row's last token, written at its position cache.pos; keys (S, 2), n (S,) each row's
    # draw counter; seen (S, V) bool, each row's prompt and answer tokens before tok (None without a penalty),
    # tok marked in it here -> the next tokens (S,) and their log-probs (S,). Rows not in use compute garbage.
    if seen is not None:
        seen.scatter_(1, tok[:, None], True)
    h = model(tok[:, None], cache=cache, hidden=True)[:, 0]                              # (S, D)
    return sample(model.logits(h).float(), uniforms(keys, n), temperature, top_k, top_p, min_p, penalty, seen)


# ----- the pool: its size from a memory budget, the span of keys a step reads -----

MEMORY_SHARE = 0.5  # of the free memory, for the cache and the step's logits (vLLM: 0.9 of all)


def pool_size(cfg, max_len, dtype, device, free=None):
    # Rows the memory budget holds: each one's keys and values at every layer, and a few fp32 vocab-sized
    # rows for sampling; at most what pays on the device. free: bytes available (default: the device's).
    free = free_memory(device) if free is None else free
    per_row = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * max_len * dtype.itemsize
               + 4 * cfg.vocab_size * 4)
    return max(1, min(max_pool(device), int(MEMORY_SHARE * free // per_row)))


def span(n, max_len, compiled):
    # Cache slots a decode step reads when its longest row holds n tokens: n rounded up to 64, or, under
    # compile, to a power of two (each distinct span is a graph of its own: a handful, not one per step).
    s = 1 << (n - 1).bit_length() if compiled else -(-n // 64) * 64
    return min(max(s, 64), max_len)


# ----- the scheduler -----

_compiled = {}  # one compiled step per sampling setting: the settings are graph constants


def fit(cache, slots, seen, compiled):
    # The cache resized to `slots` slots, in place; compiled, its tensors marked static for the CUDA graph
    # (mark_static). The pool's shape never changes, so refills replay the same graphs until the next resize.
    cache.resize(slots)
    if compiled:
        mark_static(cache.k + cache.v + [cache.pos, cache.rows] + ([seen] if seen is not None else []))


def make_step(sampling, compile):
    step = lambda m, c, t, k, n, s: decode_one_token(m, c, t, k, n, s, *sampling)  # noqa: E731
    if not compile:
        return step
    # fullgraph: one graph a step, or an error; a break would split the CUDA graph and cost launches.
    _compiled[sampling] = _compiled.get(sampling) or torch.compile(step, mode="reduce-overhead",
                                                                   fullgraph=True)
    return _compiled[sampling]


@torch.no_grad()
def generate(model, prompts, max_new_tokens, *, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
             repetition_penalty=1.0, stop_ids=(), seed=None, seeds=None, return_logprobs=False, pool=None,
             refill=1 / 8, compile=False, prefill_tokens=8192, on_token=None, progress=None):
    """prompts: token-id lists of any lengths. Returns, per prompt, its new tokens up to and including the
    first stop id; with return_logprobs, (tokens, log-probs) pairs: each token's log-prob under the
    sampling distribution (at temperature 1 with no filter, the model's own). temperature 0: greedy.
    repetition_penalty: transformers' (1: none), over each prompt's tokens and its answer so far.
    seeds: one int per prompt; by default derived from `seed` and the prompt's tokens (seed None: drawn
    from torch's generator). pool: cache rows decoded together (default: what pool_size's memory budget
    holds). refill: the share of the pool that must be free before waiting prompts are prefilled into it
    (1: static batching, new prompts only once the pool has drained). compile: the decode step through
    torch.compile and CUDA graphs (for a GPU: on a CPU the eager step is faster).
    prefill_tokens: tokens per prefill forward at most. on_token(i, token) sees each new token of prompt
    i as it comes (streaming); progress: a label for a progress bar over prompts.
    No collective: an FSDP-sharded model must be inside `spin.gathered(model)`, which every rank enters."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if repetition_penalty <= 0:
        raise ValueError(f"generate: repetition_penalty must be > 0 (got {repetition_penalty})")
    if any(hasattr(p, "to_local") for p in model.parameters()):  # a sharded DTensor
        raise ValueError("generate: the model is FSDP-sharded: call it inside `with spin.gathered(model):`")
    seed = int(torch.randint(2 ** 62, ()).item()) if seed is None else seed
    keys = prompt_keys(prompts, seed, seeds)                                              # (P, 2)
    toks, lps = [[] for _ in prompts], [[] for _ in prompts]
    if prompts and max_new_tokens > 0:
        run_pool(model, prompts, keys, max_new_tokens, (temperature, top_k, top_p, min_p, repetition_penalty),
                 set(stop_ids), pool, refill, compile, prefill_tokens, on_token, progress, toks, lps)
    return [(t, lp) for t, lp in zip(toks, lps)] if return_logprobs else toks


def run_pool(model, prompts, keys, max_new_tokens, sampling, stop, pool, refill, compiled, budget,
             on_token, progress, toks, lps):
    # Fills toks[i], lps[i] for every prompt. Every row's state lives on the host (its prompt, the tokens
    # its cache holds, its last token) and goes to the device once per step.
    w = model.lm_weight  # gathered: the full weight, in the dtype forwards compute in
    max_len = -(-(max(map(len, prompts)) + max_new_tokens) // 64) * 64
    S = min(len(prompts), pool or pool_size(model.config, max_len, w.dtype, w.device))
    cache = KVCache(model.config, S, span(1, max_len, compiled), w.dtype, w.device)  # grown as rows grow
    # seen: each row's tokens so far, prompt included, for the repetition penalty (None without one)
    seen = torch.zeros(S, model.config.vocab_size, dtype=torch.bool, device=w.device) \
        if sampling[-1] != 1 else None                                                    # (S, V)
    step = make_step(sampling, compiled)
    owner, held, last = [None] * S, [0] * S, [0] * S  # per row: its prompt, tokens in the cache, last token
    keys, waiting = keys.tolist(), deque(range(len(prompts)))
    bar = tqdm(total=len(prompts), desc=progress, disable=not progress)
    # A prefill forward reads every weight whatever its size: refilling rows one by one as they free up
    # costs more than letting a few wait.
    threshold = max(1, round(refill * S))

    def emit(r, t, lp):  # row r produced token t: record it, free the row if its answer is complete
        i = owner[r]
        toks[i].append(t)
        lps[i].append(lp)
        last[r] = t
        if on_token:
            on_token(i, t)
        if t in stop or len(toks[i]) == max_new_tokens:
            owner[r] = None
            bar.update()

    while waiting or any(o is not None for o in owner):
        free = [r for r in range(S) if owner[r] is None]
        if waiting and len(free) >= threshold:
            rows = free[:len(waiting)]
            idx = [waiting.popleft() for _ in rows]
            longest = span(max(len(prompts[i]) for i in idx), max_len, compiled)
            fit(cache, max(cache.length, longest), seen, compiled)  # room for the prompts' tokens
            logits = prefill(model, cache, rows, [prompts[i] for i in idx], budget)
            u = uniforms(torch.tensor([keys[i] for i in idx], device=w.device),
                         torch.zeros(len(idx), dtype=torch.long, device=w.device))        # draw 0
            if seen is not None:  # the prompts' tokens but never a stop id: a chat prompt holds them, and
                # penalised they keep answers from ending (transformers penalises them too)
                for r, i in zip(rows, idx):
                    seen[r] = False
                    seen[r, torch.tensor(sorted(set(prompts[i]) - stop), device=w.device).long()] = True
                seen_rows = seen[torch.tensor(rows, device=w.device)]
            new = sample(logits, u, *sampling, seen=seen_rows if seen is not None else None)
            for r, i, t, lp in zip(rows, idx, *(x.tolist() for x in new)):
                owner[r], held[r] = i, len(prompts[i])
                emit(r, t, lp)
            continue  # a row that stopped at its first token is refilled before the pool decodes
        live = [r for r in range(S) if owner[r] is not None]
        if not waiting and len(live) < S and not compiled:
            # Nothing left to refill: go on with the live rows only (a step's cost follows its rows; a
            # compiled step keeps its one shape). Live rows past the new end fill the free rows before it.
            movers = iter(r for r in live if r >= len(live))
            live = [r if owner[r] is not None else next(movers) for r in range(len(live))]
            cache = keep_rows(cache, live, max(held[r] for r in live))
            seen = seen[live] if seen is not None else None
            owner, held, last = ([x[r] for r in live] for x in (owner, held, last))
            S, live = len(live), range(len(live))
        fit(cache, span(max(held[r] for r in live) + 1, max_len, compiled), seen, compiled)  # slots it reads
        k = [keys[o] if o is not None else (0, 0) for o in owner]
        state = torch.tensor([last, held, [len(toks[o]) if o is not None else 0 for o in owner], *zip(*k)],
                             device=w.device)                  # (5, S): last token, position, draws, key
        cache.pos.copy_(state[1])
        tok, lp = (x.tolist() for x in step(model, cache, state[0], state[3:].T.contiguous(), state[2], seen))
        for r in live:
            held[r] += 1
            emit(r, tok[r], lp[r])
    bar.close()


def keep_rows(cache, rows, n):
    # The cache cut to `rows`, in place: row j of the result is row rows[j] (its first n slots), where
    # rows[j] is j (not copied) or a row past the result's end (never overwritten before it is read). The
    # pool is then the first len(rows) rows of the same storage: each layer's slice stays contiguous.
    for j, r in enumerate(rows):
        if r != j:
            for K in cache.k + cache.v:
                K[j, :, :n] = K[r, :, :n]
    m = len(rows)
    cache.k, cache.v = [K[:m] for K in cache.k], [V[:m] for V in cache.v]
    cache.pos, cache.rows = cache.pos[:m], cache.rows[:m]
    return cache


# ----- command line: stream one answer -----

def main():
    ap = argparse.ArgumentParser(description="Sample one answer from a checkpoint, streaming the text.")
    ap.add_argument("--model", required=True,
                    help="a Hugging Face checkpoint directory, a .gguf file or a hub id org/name[@revision]")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--min_p", type=float, default=0.0)
    ap.add_argument("--repetition_penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compute_dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="the weights' dtype (auto: bf16 where the device has bf16 units); sampling is fp32")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (pays on CUDA)")
    args = ap.parse_args()
    args.model = resolve_model(args.model)  # a hub id -> its snapshot folder in the hub's cache
    tok = Tokenizer.from_pretrained(args.model)
    dtype = compute_dtype(args.device, args.compute_dtype)
    model = speed_up(Transformer.from_pretrained(args.model, dtype, args.device)).eval()
    ids = tok.encode(args.prompt) if args.raw else \
        tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    new, shown = [], ""

    def show(i, t):  # decode all so far and print what is new: a token need not end on a character
        nonlocal shown
        new.append(t)
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
            print(text[len(shown):], end="", flush=True)
            shown = text

    t0 = time.perf_counter()
    with packed_weights(model, enabled=not args.compile):
        generate(model, [ids], args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                 top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                 stop_ids=tok.eos_ids, seed=args.seed, compile=args.compile, on_token=show)
    dt = time.perf_counter() - t0
    print(tok.decode(new)[len(shown):])  # whatever was held back, and the final newline
    print(f"[{len(new)} tokens in {dt:.2f} s: {len(new) / dt:.1f} tok/s]", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
