# spin_kernels.attention's fast paths against model.plain_attention (SDPA with the dense mask of the same
# rule), on random q, k, v: outputs and gradients, for every layout a forward meets. The model-level
# checks (packed == alone, cached == uncached, with either attention) are in test_packing and test_model.
import pytest
import torch

from data import pack
from model import Config, KVCache, plain_attention, visibility
from spin_kernels.attention import CPU_FP32_KEYS, fast_attention, sdpa, tiles

NH, NKV, HD = 4, 2, 8


def layouts():
    # (name, tokens, layout, window): packed rows as spin.py makes them (ragged, padded, several groups a
    # row), a left-padded batch, one row longer than a window, plain rows
    g = torch.Generator().manual_seed(3)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
    gs = [([1] * rand(1, 12), [[2] * rand(0, 15), [3] * rand(1, 9)]) for _ in range(7)]
    tokens, layout, _, _ = pack(gs, [[0, 1, 2], [3, 4], [5, 6]], 0)
    yield "packed", tokens, layout, None
    yield "packed_window", tokens, layout, 5
    mask = torch.tensor([[0] * 7 + [1] * 20, [1] * 27]).long()
    yield "left_padded", mask, ((mask.cumsum(-1) - 1).clamp(min=0), mask - 1, torch.zeros_like(mask)), None
    z = torch.zeros(1, 30, dtype=torch.long)
    yield "window", z, (torch.arange(30)[None], z, z), 8
    yield "causal", torch.zeros(2, 19, dtype=torch.long), None, None


def qkv(B, T, S=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, NH, T, HD, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(B, NKV, S or T, HD, generator=g).to(dtype).requires_grad_() for _ in range(2))
    return q, k, v


def run(plan, q, k, v, grad=True):
    # output and the gradients of one random loss of it (FlexAttention has no backward on a CPU: output)
    if not grad:
        return [plan(q.detach(), k.detach(), v.detach()).float()]
    for t in (q, k, v):
        t.grad = None
    y = plan(q, k, v)
    (y.float() * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    return [y.detach().float()] + [t.grad.float() for t in (q, k, v)]


@pytest.mark.parametrize("flex", [False, True])
@pytest.mark.parametrize("case", ["packed", "packed_window", "left_padded", "window", "causal"])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_fast_equals_plain(case, flex):
    # tiles (flex False) or FlexAttention with the BlockMask (True, eager on a CPU: forward only), fp32
    name, tokens, layout, window = next(x for x in layouts() if x[0] == case)
    rule = None if layout is None else visibility(*layout, window)
    q, k, v = qkv(*tokens.shape)
    want = run(plain_attention(tokens, layout, window, rule, None, None), q, k, v, grad=not flex)
    got = run(fast_attention(tokens, layout, window, rule, None, None, flex=flex), q, k, v, grad=not flex)
    for a, b, what in zip(got, want, ("output", "dq", "dk", "dv")):
        assert (a - b).abs().max() < 1e-5, f"{case}, flex={flex}: {what} differs by {(a - b).abs().max():.2e}"


def test_fast_catches_a_wrong_rule():
    # the comparison can fail: tiles of a rule under which the answers see each other are not the plain
    # attention of the right rule
    _, tokens, layout, _ = next(layouts())
    pos, doc, branch = layout
    q, k, v = qkv(*tokens.shape)
    want = run(plain_attention(tokens, layout, None, visibility(*layout), None, None), q, k, v)
    wrong = (pos, doc, torch.zeros_like(branch))
    got = run(fast_attention(tokens, wrong, None, visibility(*wrong), None, None), q, k, v)
    assert (got[0] - want[0]).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 5])
def test_fast_equals_plain_with_a_cache(dtype, T):
    # decoding (T = 1: the two-matmul step) and a prefill into a cache whose rows hold different lengths
    cfg = Config(num_hidden_layers=1, num_attention_heads=NH, num_key_value_heads=NKV, head_dim=HD,
                 sliding_window=6)
    cache = KVCache(cfg, batch=3, max_len=12, dtype=dtype)
    cache.pos = torch.tensor([0, 4, 7])
    pos = cache.pos[:, None] + torch.arange(T)
    q, k, v = qkv(3, T, 12, dtype)
    for window in (None, 6):
        want = run(plain_attention(torch.zeros(3, T), None, window, None, cache, pos), q, k, v)
        got = run(fast_attention(torch.zeros(3, T), None, window, None, cache, pos), q, k, v)
        tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: scores rounded to bf16 in the decode step
        for a, b in zip(got, want):
            assert (a - b).abs().max() < tol * max(1.0, b.abs().max().item()), (T, window, dtype)


def test_tiles_cover_each_row_in_order():
    _, tokens, layout, _ = next(layouts())
    cut = tiles(layout, visibility(*layout))
    for b in range(tokens.shape[0]):
        mine = [t for t in cut if t[0] == b]
        assert [t[1] for t in mine] == [0] + [t[2] for t in mine[:-1]] and mine[-1][2] == tokens.shape[1]


def test_cpu_bf16_attention_is_fp32_on_short_tiles():
    # sdpa: on a CPU, bf16 attention over at most CPU_FP32_KEYS keys is SDPA on fp32 upcasts, rounded back
    # to bf16, with bf16 gradients; over more keys, SDPA in bf16; fp32 inputs as they are.
    plain = torch.nn.functional.scaled_dot_product_attention
    g = torch.Generator().manual_seed(0)
    n = CPU_FP32_KEYS
    for S, T in ((n, n), (n, 100), (n + 1, n + 1)):  # keys, queries
        q = torch.randn(1, 4, T, 8, generator=g).bfloat16().requires_grad_()
        k, v = (torch.randn(1, 2, S, 8, generator=g).bfloat16() for _ in range(2))
        mask = None if S == T else torch.ones(T, S, dtype=torch.bool).tril(S - T)  # a later answer's tile
        kw = dict(attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        up, low = plain(q.float(), k.float(), v.float(), **kw).bfloat16(), plain(q, k, v, **kw)
        got = sdpa(q, k, v, mask)
        assert got.dtype == torch.bfloat16 and not torch.equal(up, low)  # the two ways differ here
        assert torch.equal(got, up if S <= CPU_FP32_KEYS else low), (S, T)
        got.float().sum().backward()
        assert q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0
    q32 = torch.randn(1, 4, 9, 8, generator=g)
    assert torch.equal(sdpa(q32, q32[:, :2], q32[:, 2:], None),
                       plain(q32, q32[:, :2], q32[:, 2:], is_causal=True, enable_gqa=True))
