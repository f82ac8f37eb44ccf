# Packed pairs ([prompt | real | generated], whole pairs per row) against each sequence alone: the same
# log p(answer | prompt) and the same gradients, for every family; answers never see each other.
import time

import pytest
import torch

from data import pack
from model import Transformer, visibility
from spin import micro_batches
from spin_kernels import speed_up
from spin_kernels.attention import block_mask, fast_attention, tiles

# Mistral's window is 8 positions: every group below is longer, so the window must count positions of the
# pair (an answer continues from its prompt's end), not slots of the packed row.
SIZES = [(5, [7, 3]), (12, [1, 9]), (3, [14, 6]), (9, [4, 4]), (1, [2, 11])]  # prompt, answer lengths


def groups(seed=0, V=307):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(0, V, (n,), generator=g).tolist()  # noqa: E731
    return [(ids(p), [ids(a) for a in answers]) for p, answers in SIZES]


def alone(model, groups):
    # (G, A) log p(answer | prompt), each sequence in its own plain forward with the full logits
    out = []
    for p, answers in groups:
        row = []
        for r in answers:
            x = torch.tensor([p + r])
            logp = torch.log_softmax(model(x).float(), -1)[0, len(p) - 1:-1]
            row.append(logp.gather(-1, torch.tensor(r)[:, None]).sum())
        out.append(torch.stack(row))
    return torch.stack(out)


def packed(model, groups, rows):
    tokens, layout, targets, owner = pack(groups, rows, pad_id=0)
    logp = model(tokens, layout=layout, targets=targets)
    A = len(groups[0][1])
    return torch.zeros(len(groups) * A).index_add(0, owner, logp).view(-1, A)


ROWS = [[2, 0], [1], [4, 3]]  # three rows, two of them holding two groups, ragged: padding at the ends


@pytest.mark.parametrize("attention", ["plain", "fast"])
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "llama3_tied"])
def test_packed_equals_alone_with_gradients(checkpoints, kind, attention):
    # fp32; sums of up to 20 token log-probs agree to ~1e-6 (summation order only): 1e-4 is loose. The
    # packed side attends with the model's plain dense-mask attention, or with spin_kernels' tiles.
    gs = groups()
    m1, m2 = (Transformer.from_pretrained(checkpoints[kind][0]) for _ in range(2))
    if attention == "fast":
        speed_up(m2)
    ref, ours = alone(m1, gs), packed(m2, gs, ROWS)
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))  # any loss of the sums
    (ref * w).sum().backward()
    (ours * w).sum().backward()
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        err = (a.grad - b.grad).abs().max() / a.grad.abs().max()
        assert err < 1e-4, f"{kind} {name}: relative gradient difference {err:.2e}"


def test_cpu_cutskip_the_pairs_no_one_sees():
    # Off CUDA each [prompt | answer 1 | answer 2] is tiled [prompt | answer 1] (plain causal) and [answer 2]
    # with the prompt's keys before its own: the tiles cover each row once, in order, and attend fewer
    # (query, key) pairs than whole documents would; padding is a tile of its own.
    gs = groups()
    tokens, layout, _, _ = pack(gs, ROWS, pad_id=0)
    cut = tiles(layout, visibility(*layout))
    for b in range(len(ROWS)):
        mine = [t for t in cut if t[0] == b]
        assert [t[1] for t in mine] == [0] + [t[2] for t in mine[:-1]] and mine[-1][2] == tokens.shape[1]
    answers = [t for t in cut if t[3]]
    assert [(t[2] - t[1], t[3]) for t in answers[:2]] == [(SIZES[g][1][1], SIZES[g][0]) for g in ROWS[0]]
    assert all(t[4] is None for t in cut if not t[3] and layout[1][t[0], t[1]] >= 0)  # plain causal
    docs = [(doc == d).sum().item() for doc in layout[1] for d in doc.unique() if d >= 0]
    pairs = sum((e - s) * (e - s + P) for b, s, e, P, m in cut if layout[1][b, s] >= 0)
    assert pairs < 0.8 * sum(L * L for L in docs), (pairs, sum(L * L for L in docs))


@pytest.mark.parametrize("attention", ["plain", "fast"])
def test_generated_answer_never_sees_the_real_one(checkpoints, attention):
    model, gs = Transformer.from_pretrained(checkpoints["mistral"][0]), groups()
    if attention == "fast":
        speed_up(model)
    with torch.no_grad():
        before = packed(model, gs, ROWS)
        changed = [(p, [[(t + 1) % 307 for t in r], g]) for p, (r, g) in gs]  # other real answers
        after = packed(model, changed, ROWS)
    assert (after[:, 1] - before[:, 1]).abs().max() < 1e-6   # the generated side did not move
    assert (after[:, 0] - before[:, 0]).abs().min() > 1e-3   # the real side did (the test can fail)


def test_row_composition_does_not_matter(checkpoints):
    # One group per row, all in one row, or mixed: the same numbers (no pair attends to another).
    model, gs = speed_up(Transformer.from_pretrained(checkpoints["qwen2"][0])), groups()
    with torch.no_grad():
        a = packed(model, gs, [[i] for i in range(len(gs))])
        b = packed(model, gs, [list(range(len(gs)))])
        c = packed(model, gs, ROWS)
    assert (a - b).abs().max() < 1e-4 and (a - c).abs().max() < 1e-4


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_path_equals_dense(checkpoints):
    # The CUDA path (FlexAttention + BlockMask from the same rule) run eagerly on CPU.
    model, gs = Transformer.from_pretrained(checkpoints["mistral"][0]), groups()
    with torch.no_grad():
        dense = packed(model, gs, ROWS)
        model.attention = lambda *args: fast_attention(*args, flex=True)
        flex = packed(model, gs, ROWS)
    assert (dense - flex).abs().max() < 1e-4


def test_pack_layout_by_hand():
    tokens, (pos, doc, branch), (index, ids), owner = pack([([1, 2], [[3, 4], [5]]), ([6], [[7], [8, 9]])],
                                                           [[0], [1]], pad_id=0)
    assert tokens.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert pos.tolist()[0] == [0, 1, 2, 3, 2]             # the second answer restarts after the prompt
    assert branch.tolist() == [[0, 0, 1, 1, 2], [0, 1, 2, 2, 0]]
    assert doc[0].tolist() == [1] * 5 and doc[1, :4].tolist() == [1] * 4 and doc[1, 4] < 0  # padding
    # answer [3, 4] predicted at positions 1, 2; [5] at 1 (the prompt's last, shared); [7] at 5 + 0, ...
    assert index.tolist() == [1, 2, 1, 5, 5, 7] and ids.tolist() == [3, 4, 5, 7, 8, 9]
    assert owner.tolist() == [0, 0, 1, 2, 3, 3]


def test_micro_batches_hold_every_group_once_within_budget():
    lengths = [30, 7, 19, 25, 3, 12, 30, 8, 41]
    rows = micro_batches(lengths, range(len(lengths)), budget=30)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    # first-fit decreasing: 41 alone (longer than the budget), 30 | 30 | 25 + 3 | 19 + 8 | 12 + 7
    assert rows == [[8], [0], [6], [3, 4], [2, 7], [5, 1]]


def block_sets(bm):
    # a BlockMask's lists -> its partial and full block pairs, (B, nq, nk) bool each: the first counts[q]
    # entries of indices[q] are the key blocks listed for query block q
    out = []
    for counts, indices in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices)):
        first = torch.arange(indices.shape[-1]) < counts[:, 0, :, None].long()               # (B, nq, nk)
        out.append(torch.zeros_like(first).scatter(-1, indices[:, 0].long(), first))
    return out


def dense_blocks(layout, window, block):
    # per block pair, from the dense rule itself: (B, nq, nk) count of visible (query, key) pairs
    B, T = layout[0].shape
    i = torch.arange(T)
    seen = visibility(*layout, window)(torch.arange(B)[:, None, None], None, i[None, :, None], i[None, None, :])
    nb = -(-T // block)
    seen = torch.nn.functional.pad(seen, (0, nb * block - T, 0, nb * block - T))
    return seen.view(B, nb, block, nb, block).sum((2, 4))


def layouts():
    # packed rows (ragged, padded, several groups a row, empty-prompt-free), as spin.py makes them;
    # a left-padded batch; one long sequence (a window without a layout)
    g = torch.Generator().manual_seed(3)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
    gs = [([1] * rand(1, 30), [[2] * rand(0, 40), [3] * rand(1, 25)]) for _ in range(12)]
    yield pack(gs, [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10, 11]], 0)[1]
    yield pack(gs, [[5, 1], [2]], 0, length=200)[1]
    mask = torch.tensor([[0] * 37 + [1] * 80, [1] * 117, [0] * 100 + [1] * 17]).long()
    yield ((mask.cumsum(-1) - 1).clamp(min=0), mask - 1, torch.zeros_like(mask))
    z = torch.zeros(1, 150, dtype=torch.long)
    yield torch.arange(150)[None], z, z


@pytest.mark.parametrize("window", [None, 8, 33])
@pytest.mark.parametrize("block", [8, 16, 128])
def test_block_mask_equals_the_dense_rule(window, block):
    # Every block pair is listed exactly as the dense rule says: full iff all of its (query, key) pairs
    # are visible (the kernel skips the mask there), partial iff some are, absent iff none.
    for layout in layouts():
        rule = visibility(*layout, window)
        partial, full = block_sets(block_mask(layout, rule, window, block))
        seen = dense_blocks(layout, window, block)
        assert torch.equal(full, seen == block * block)
        assert torch.equal(partial, (seen > 0) & (seen < block * block))


def test_block_mask_catches_a_wrong_rule():
    # the comparison can fail: the mask of a layout whose generated answers could see the real ones
    layout = next(layouts())
    pos, doc, branch = layout
    partial, full = block_sets(block_mask(layout, visibility(*layout), None, 8))
    seen = dense_blocks((pos, doc, torch.zeros_like(branch)), None, 8)  # one branch: answers see each other
    assert not torch.equal(partial | full, seen > 0)


def test_block_mask_of_a_long_row_is_quick():
    # The packed row of a GPU micro-batch (16,384 tokens, ~30 pairs) takes milliseconds to mask (the
    # compiled create_block_mask this replaced spent minutes on a GPU). A guard against that, not a bench.
    g = torch.Generator().manual_seed(0)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
    gs = [([1] * rand(20, 256), [[2] * rand(32, 512), [3] * rand(64, 256)]) for _ in range(32)]
    row, n = [], 0
    for i, (p, answers) in enumerate(gs):
        if n + len(p) + sum(map(len, answers)) <= 16384:
            row, n = row + [i], n + len(p) + sum(map(len, answers))
    layout = pack(gs, [row], 0, length=16384)[1]
    rule = visibility(*layout, 4096)
    block_mask(layout, rule, 4096)  # warm-up: first calls load kernels
    t0 = time.perf_counter()
    bm = block_mask(layout, rule, 4096)
    assert time.perf_counter() - t0 < 1.0
    assert bm.shape[-2:] == (16384, 16384)
