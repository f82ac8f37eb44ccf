# Fast attention for the model's layouts, applied from outside: `use_fast_attention(model)` replaces the
# model's plan (model.plain_attention: SDPA with a dense mask from the layout's rule) by `fast_attention`,
# same signature, same maths (figures: docs/benchmarks.md). What it does instead, by layout:
#   packed rows on CUDA: FlexAttention with a BlockMask built from the rows' spans (only the blocks that
#     hold visible pairs are computed; no T x T mask, no compile to build it);
#   packed rows elsewhere: tiles, each document (or answer) attended on its own, no work across pairs;
#   one decoded token a row: two batched matmuls (SDPA's CPU kernel is slow on one-token queries);
#   on a CPU in bf16, attention over at most CPU_FP32_KEYS keys in fp32 (its bf16 kernel is slower there).
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

_flex = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
CPU_FP32_KEYS = 512  # on a CPU, bf16 attention over at most this many keys computes in fp32


def use_fast_attention(model):
    model.attention = fast_attention
    return model


def fast_attention(tokens, layout, window, rule, cache, pos, flex=None):
    # As model.plain_attention: tokens (B, T), layout (pos, doc, branch) or None, rule the layout's
    # visibility (None: plain causal), cache a KVCache and pos (B, T) when decoding -> attend(q, k, v).
    # flex: FlexAttention for packed rows (None: on CUDA only; eager FlexAttention elsewhere is slow).
    if cache is not None:
        mask, attend = cache.mask(pos, window), (decode if tokens.shape[1] == 1 else sdpa)
        return lambda q, k, v: attend(q, k, v, mask)
    if rule is None:
        return lambda q, k, v: sdpa(q, k, v, None)
    if flex if flex is not None else tokens.is_cuda:
        bm = block_mask(layout, rule, window)
        return lambda q, k, v: _flex(q, k, v, block_mask=bm, enable_gqa=k.shape[1] != q.shape[1])
    pieces = tiles(layout, rule)
    return lambda q, k, v: tiled(q, k, v, pieces)


def sdpa(q, k, v, mask):
    # q (B, nh, T, hd), k, v (B, nkv, S, hd), mask None (causal) or bool (.., T, S) -> (B, nh, T, hd). On a
    # CPU, up to CPU_FP32_KEYS keys go in fp32: bf16 is slower on short tiles (as a packed row's mostly are).
    up = q.dtype == torch.bfloat16 and q.device.type == "cpu" and k.shape[-2] <= CPU_FP32_KEYS
    y = F.scaled_dot_product_attention(*((t.float() for t in (q, k, v)) if up else (q, k, v)), attn_mask=mask,
                                       is_causal=mask is None, enable_gqa=k.shape[1] != q.shape[1])
    return y.to(q.dtype)


def decode(q, k, v, mask):
    # q (B, nh, 1, hd), k, v (B, nkv, S, hd), mask (B, 1, 1, S) -> (B, nh, 1, hd), each group of query heads
    # on its key/value head; as transformers' eager attention: scores in the compute dtype, softmax in fp32.
    (B, nh, _, hd), nkv = q.shape, k.shape[1]
    k, v = k.contiguous(), v.contiguous()  # no-ops on the sampler's cache; a bf16 bmm on a view is slow
    s = (q.view(B, nkv, nh // nkv, hd) * hd ** -0.5) @ k.transpose(-1, -2)                # (B, nkv, G, S)
    p = s.float().masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype)
    return (p @ v).view(B, nh, 1, hd)


def tiles(layout, rule):
    # Tiles that cover the rows in order, each attended on its own, so no work goes to pairs that cannot
    # see each other: [(row, start, end, P, mask)], queries [start, end) and keys the same, or with P > 0
    # the P tokens of its document's prompt, then the same. A document laid out as data.pack does,
    # [prompt | answer 1 | answer 2 | ...], is tiled [prompt | answer 1], [answer 2], ...: every later
    # answer sees the prompt and itself, never the answers between (attended as one tile, its mask would
    # cost their pairs too); any other document is one tile. mask: (queries, keys) bool, or None for causal.
    T, dev, out = layout[1].shape[1], layout[1].device, []
    for b, (doc, branch) in enumerate(zip(layout[1].tolist(), layout[2].tolist())):
        runs = [j for j in range(T) if j == 0 or (doc[j], branch[j]) != (doc[j - 1], branch[j - 1])]
        runs = [(s, e, doc[s], branch[s]) for s, e in zip(runs, runs[1:] + [T])]  # equal (doc, branch)
        while runs:
            n = next((i for i, r in enumerate(runs) if r[2] != runs[0][2]), len(runs))  # one document
            d, runs = runs[:n], runs[n:]
            kinds = [r[3] for r in d]
            if d[0][2] >= 0 and kinds[0] == 0 and len(set(kinds)) == n:  # a prompt, distinct answers
                P = d[0][1] - d[0][0]
                cut = [(d[0][0], d[min(1, n - 1)][1], 0)] + [(s, e, P) for s, e, _, _ in d[2:]]
            else:
                cut = [(d[0][0], d[-1][1], 0)]
            for s, e, P in cut:
                qi = torch.arange(s, e, device=dev)
                ki = torch.cat((torch.arange(d[0][0], d[0][0] + P, device=dev), qi))
                m = rule(b, None, qi[:, None], ki[None, :])                                 # (L, P + L)
                out.append((b, s, e, P, None if not P and torch.equal(m, torch.ones_like(m).tril()) else m))
    return out


def tiled(q, k, v, pieces):
    # q (B, nh, T, hd), k, v (B, nkv, T, hd) -> (B, nh, T, hd), tile by tile. The tiles are cut out by
    # split, whose backward is one cat (slicing each out cost a zero-filled row-sized gradient per tile).
    (B, _, T, _), sizes = q.shape, [e - s for _, s, e, _, _ in pieces]
    parts = (t.transpose(0, 1).flatten(1, 2).split(sizes, 1) for t in (q, k, v))  # (H, L, hd) each
    ys, k0, v0 = [], None, None
    for qt, kt, vt, (_, _, _, P, m) in zip(*parts, pieces):
        if P:  # a later answer: its document's prompt (the first tile's start), then itself
            kt, vt = torch.cat((k0[:, :P], kt), 1), torch.cat((v0[:, :P], vt), 1)
        else:
            k0, v0 = kt, vt
        ys.append(sdpa(qt[None], kt[None], vt[None], m))
    return torch.cat(ys, 2).unflatten(2, (B, T))[0].transpose(0, 1)                    # (B, nh, T, hd)


def block_mask(layout, rule, window=None, block=128):
    # The packed layout's FlexAttention BlockMask, built from its spans in a few vectorised ops: no per-shape
    # compile (create_block_mask compiles a kernel for every row length) and no T x T work. The layout of
    # data.pack and forward: each document one contiguous span, its prompt (branch 0, positions 0..P-1) first,
    # then each answer contiguous (positions from P on), padding doc -1. So a query sees at most two runs of
    # keys: its own segment up to itself (the prompt or its answer so far), and for an answer token the whole
    # prompt; a window cuts the start of both. Counting, per query and key block, the keys in those runs says
    # per block pair: none, some (partial: the rule decides per pair) or all (full: computed unmasked).
    pos, doc, branch = layout                                                    # (B, T) each
    (B, T), dev = doc.shape, doc.device
    idx = torch.arange(T, device=dev).expand(B, T)
    first = torch.ones(B, 1, dtype=torch.bool, device=dev)
    new_doc = torch.cat((first, doc[:, 1:] != doc[:, :-1]), 1)
    new_seg = new_doc | torch.cat((first, branch[:, 1:] != branch[:, :-1]), 1)
    seg_start = torch.where(new_seg, idx, 0).cummax(1).values                   # (B, T)
    doc_start = torch.where(new_doc, idx, 0).cummax(1).values
    last = torch.cat((new_seg[:, 1:], first), 1)                                 # a segment's last token
    seg_end = torch.where(last, idx + 1, T).flip(1).cummin(1).values.flip(1)     # (B, T) exclusive
    # run 1: own segment up to q (padding: a segment of its own tokens, each seeing only itself)
    lo1 = torch.where(doc < 0, idx, seg_start)
    # run 2, answers only: the document's prompt, [doc_start, end of its first segment)
    answer = (branch > 0) & (doc >= 0)
    lo2 = torch.where(answer, doc_start, 0)
    hi2 = torch.where(answer, seg_end.gather(1, doc_start), 0)
    if window:  # keys with pos[q] - pos[k] < window; in a run, positions step by one with the index
        lo1 = torch.maximum(lo1, idx - window + 1)
        lo2 = torch.maximum(lo2, doc_start + pos - window + 1)
    nb = -(-T // block)
    k0 = torch.arange(nb, device=dev) * block                                   # (nb,) block starts
    k1 = (k0 + block).clamp(max=T)

    def overlap(lo, hi):  # (B, T) runs [lo, hi) -> (B, T, nb) keys of each run in each key block
        return (torch.minimum(hi[..., None], k1) - torch.maximum(lo[..., None], k0)).clamp(min=0)
    per_query = overlap(lo1, idx + 1) + overlap(lo2, torch.maximum(hi2, lo2))    # (B, T, nb)
    per_query = F.pad(per_query, (0, 0, 0, nb * block - T))                       # whole query blocks
    seen = per_query.view(B, nb, block, nb).sum(2)                               # (B, nq, nk) pairs seen
    full = seen == block * block  # a block pair that runs past T is never full: its mask is applied
    partial = (seen > 0) & ~full

    def blocks(keep):  # (B, nq, nk) bool -> (B, 1, nq) counts, (B, 1, nq, nk) indices, kept ones first
        order = keep.int().argsort(dim=-1, descending=True, stable=True)
        return keep.sum(-1, dtype=torch.int32)[:, None], order.int()[:, None]
    return BlockMask.from_kv_blocks(*blocks(partial), *blocks(full), BLOCK_SIZE=block, mask_mod=rule,
                                    seq_lengths=(T, T))
