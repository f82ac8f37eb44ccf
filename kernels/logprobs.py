# Triton kernels for log p(target) straight from hidden states and the LM head, never holding (N, V) logits.
# Layout: @triton.jit kernels, then their launchers. The one autograd.Function lives in __init__.py, shared
# with the PyTorch twin (logprobs_torch.py), which has the same forward/backward signature.
import os

import torch
import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when @triton.jit runs (at import), so we read it at the same moment.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _logits(h_ptr, w_ptr, rows, cols, N, V, D, DOT: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    # (BLOCK_N, BLOCK_V) fp32 tile of hidden @ weight.T, reduced over D one BLOCK_D slice at a time.
    # Operands are cast to DOT right after the load (see _dot_dtype); accumulation is always fp32.
    # input_precision="ieee" keeps fp32 x fp32 exact (no tf32); 16-bit operands ignore it.
    z = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        h = tl.load(h_ptr + rows[:, None] * D + ds[None, :], (rows[:, None] < N) & (ds[None, :] < D), 0.0)
        w = tl.load(w_ptr + cols[:, None] * D + ds[None, :], (cols[:, None] < V) & (ds[None, :] < D), 0.0)
        z = tl.dot(h.to(DOT), tl.trans(w.to(DOT)), z, input_precision="ieee")
    return z


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, zt_ptr, N, V, D, v_per_split, DOT: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program = one row block x one split of the vocabulary. It walks its split BLOCK_V columns at a
    # time keeping a running max m and a running sum s of exp(z - m) (online log-sum-exp), then writes its
    # partial lse and the target logit (0 unless the target falls in its split). Splits only exist to
    # give the GPU enough programs when N is small; the launcher combines them.
    split = tl.program_id(1)
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    tgt = tl.load(t_ptr + rows, rows < N, -1)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(split * v_per_split, tl.minimum(V, (split + 1) * v_per_split), BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        z = _logits(h_ptr, w_ptr, rows, cols, N, V, D, DOT, BLOCK_N, BLOCK_V, BLOCK_D)
        z = tl.where(cols[None, :] < V, z, float("-inf"))  # padded vocab columns take no probability
        m_new = tl.maximum(m, tl.max(z, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
    tl.store(lse_ptr + split * N + rows, m + tl.log(s), rows < N)
    tl.store(zt_ptr + split * N + rows, zt, rows < N)


@triton.jit
def _bwd_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, N, V, D, DOT: tl.constexpr,
                NEED_DW: tl.constexpr, GROUP: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program = one (row block, vocab block) tile, as in a GEMM: recompute the logits tile, turn it into
    # dz = d loss / d logits, and add its shares of d_hidden = dz @ W and d_weight = dz.T @ h into fp32
    # buffers with atomics. Why atomics: exclusive accumulators would need one program per row block
    # walking all of V (32 programs for 4096 tokens: most of an H100 idle) plus a second kernel that
    # recomputes the logits once more for d_weight. Contention stays low with the grouped launch order of
    # Triton's matmul tutorial: the ~132 programs in flight on an H100 cover GROUP=8 row blocks x ~16 vocab
    # blocks, so an address sees ~16 (d_hidden) or ~8 (d_weight) concurrent adds, and the h and W tiles
    # they share stay in L2. The costs: nondeterministic last bits, and (BLOCK_N + BLOCK_V) * D fp32 adds
    # per tile, which bound the backward (README: roofline).
    pid = tl.program_id(0)
    blocks_v = tl.cdiv(V, BLOCK_V)
    first = (pid // (GROUP * blocks_v)) * GROUP
    size = tl.minimum(tl.cdiv(N, BLOCK_N) - first, GROUP)
    pid_n = first + (pid % (GROUP * blocks_v)) % size
    pid_v = (pid % (GROUP * blocks_v)) // size
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    z = _logits(h_ptr, w_ptr, rows, cols, N, V, D, DOT, BLOCK_N, BLOCK_V, BLOCK_D)  # (BLOCK_N, BLOCK_V)
    lse = tl.load(lse_ptr + rows, rows < N, 0.0)
    g = tl.load(g_ptr + rows, rows < N, 0.0)  # upstream grad, already 0 on ignored rows
    tgt = tl.load(t_ptr + rows, rows < N, -1)
    # d logp_i / d z_ij = [j == t_i] - softmax_ij. Padded columns get junk here but meet zero-padded
    # weight rows in dz @ W and masked adds in d_weight, so it never reaches memory.
    dz = g[:, None] * (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - tl.exp(z - lse[:, None]))
    dz = dz.to(DOT)  # a 16-bit tensor-core operand on the GPU, as flash attention does with P
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        h_at = rows[:, None] * D + ds[None, :]  # (BLOCK_N, BLOCK_D) offsets
        w_at = cols[:, None] * D + ds[None, :]  # (BLOCK_V, BLOCK_D) offsets
        h_in = (rows[:, None] < N) & (ds[None, :] < D)
        w_in = (cols[:, None] < V) & (ds[None, :] < D)
        w = tl.load(w_ptr + w_at, w_in, 0.0).to(DOT)
        dh = tl.dot(dz, w, input_precision="ieee")  # (BLOCK_N, BLOCK_D)
        tl.atomic_add(dh_ptr + h_at, dh, h_in, sem="relaxed")
        if NEED_DW:
            h = tl.load(h_ptr + h_at, h_in, 0.0).to(DOT)
            dw = tl.dot(tl.trans(dz), h, input_precision="ieee")  # (BLOCK_V, BLOCK_D)
            tl.atomic_add(dw_ptr + w_at, dw, w_in, sem="relaxed")


def _dot_dtype(hidden, weight):
    # On the GPU, tl.dot takes bf16/fp16 operands as stored (tensor cores multiply them exactly and sum in
    # fp32). fp32 inputs stay fp32. The interpreter's 16-bit maths is wrong, so there we upcast right after
    # tl.load; it computes the same numbers, as the 16-bit values are exact in fp32.
    if INTERPRET or hidden.dtype != weight.dtype or hidden.dtype == torch.float32:
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[hidden.dtype]


def _blocks(hidden, block_n, block_v, block_d):
    # The interpreter pays ~ms per block iteration: few, large blocks. On a GPU: GEMM-like 128 x 128 tiles,
    # BLOCK_D 32 for fp32 so three pipelined stages of shared-memory tiles still fit.
    if INTERPRET:
        return block_n or 64, block_v or 256, block_d or 64
    return block_n or 128, block_v or 128, block_d or (64 if hidden.element_size() == 2 else 32)


def forward(hidden, weight, targets, ignore_index=-100, *, block_n=None, block_v=None, block_d=None,
            splits=None, group=None, num_warps=8, num_stages=3):
    # hidden (N, D), weight (V, D), targets (N,) -> logp (N,) fp32, lse (N,) fp32 (saved for backward).
    # The keywords are shared with backward: group is backward's, splits is forward's.
    (N, D), V = hidden.shape, weight.shape[0]
    bn, bv, bd = _blocks(hidden, block_n, block_v, block_d)
    row_blocks, v_blocks = triton.cdiv(N, bn), triton.cdiv(V, bv)
    if splits is None:  # enough programs for ~4 waves on the GPU; 1 in the interpreter
        sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count if hidden.is_cuda else 0
        splits = max(1, min(v_blocks, triton.cdiv(4 * sms, row_blocks)))
    v_per_split = triton.cdiv(v_blocks, splits) * bv  # a multiple of BLOCK_V: splits never share a block
    splits = triton.cdiv(V, v_per_split)  # drop empty splits
    part_lse = torch.empty(splits, N, dtype=torch.float32, device=hidden.device)
    part_zt = torch.empty_like(part_lse)
    _fwd_kernel[(row_blocks, splits)](hidden, weight, targets, part_lse, part_zt, N, V, D, v_per_split,
                                      _dot_dtype(hidden, weight), bn, bv, bd,
                                      num_warps=num_warps, num_stages=num_stages)
    lse = torch.logsumexp(part_lse, 0)  # (N,) the splits' partial log-sum-exps combined
    return torch.where(targets == ignore_index, 0.0, part_zt.sum(0) - lse), lse


def backward(hidden, weight, targets, lse, grad, ignore_index=-100, need_dw=True, *, block_n=None,
             block_v=None, block_d=None, splits=None, group=8, num_warps=8, num_stages=3):
    # grad (N,) upstream d loss / d logp -> d_hidden (N, D), d_weight (V, D) or None; fp32 sums, then cast
    (N, D), V = hidden.shape, weight.shape[0]
    bn, bv, bd = _blocks(hidden, block_n, block_v, block_d)
    g = torch.where(targets == ignore_index, 0.0, grad.float()).contiguous()
    dh = torch.zeros(N, D, dtype=torch.float32, device=hidden.device)
    dw = torch.zeros(V, D, dtype=torch.float32, device=hidden.device) if need_dw else dh  # dh: never used
    grid = (triton.cdiv(N, bn) * triton.cdiv(V, bv),)
    _bwd_kernel[grid](hidden, weight, targets, lse, g, dh, dw, N, V, D, _dot_dtype(hidden, weight), need_dw,
                      group, bn, bv, bd, num_warps=num_warps, num_stages=num_stages)
    return dh.to(hidden.dtype), dw.to(weight.dtype) if need_dw else None
