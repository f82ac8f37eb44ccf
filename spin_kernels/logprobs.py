# Triton kernels for log p(target) straight from hidden states and the LM head, never holding (N, V) logits.
# Layout: @triton.jit kernels, then their launchers. The one autograd.Function lives in __init__.py, shared
# with the PyTorch twin (logprobs_torch.py), which has the same forward/backward signature. The backward's
# two gradient GEMMs are cuBLAS, through torch (backward() and README.md say why).
import os

import torch
import triton
import triton.language as tl

from . import logprobs_torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read at import, as @triton.jit reads it there


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
    # One program per row block and vocabulary split: it walks the split BLOCK_V columns at a time with an
    # online log-sum-exp (running max m, running sum s of exp(z - m)) and writes its partial lse and target
    # logit (0 unless the target is in its split). Splits give the GPU enough programs when N is small.
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
def _dz_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, g_ptr, dz_ptr, N, V, D, c0, cv, DOT: tl.constexpr,
               GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program = one (row block, vocab block) tile of dz = d loss / d logits for the vocabulary chunk
    # [c0, c0 + cv): recompute the logits tile as the forward did, dz = g * ([j == t] - exp(z - lse)), and
    # store it once, in the operand dtype, into the chunk's (N, cv) buffer, which two cuBLAS GEMMs then take
    # into d_hidden and d_weight (backward() below says why). The launch order is grouped as in Triton's
    # matmul tutorial, so the programs in flight share GROUP row blocks of h and their W tiles in L2.
    pid = tl.program_id(0)
    blocks_v = tl.cdiv(cv, BLOCK_V)
    first = (pid // (GROUP * blocks_v)) * GROUP
    size = tl.minimum(tl.cdiv(N, BLOCK_N) - first, GROUP)
    pid_n = first + (pid % (GROUP * blocks_v)) % size
    pid_v = (pid % (GROUP * blocks_v)) // size
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = (c0 + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    z = _logits(h_ptr, w_ptr, rows, cols, N, V, D, DOT, BLOCK_N, BLOCK_V, BLOCK_D)  # (BLOCK_N, BLOCK_V)
    lse = tl.load(lse_ptr + rows, rows < N, float("inf"))  # padding rows: p = 0, not exp(z - 0) = inf
    g = tl.load(g_ptr + rows, rows < N, 0.0)  # upstream grad, already 0 on ignored rows
    tgt = tl.load(t_ptr + rows, rows < N, -1)
    dz = g[:, None] * (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - tl.exp(z - lse[:, None]))
    at = rows[:, None] * cv + (cols - c0)[None, :]
    tl.store(dz_ptr + at, dz.to(dz_ptr.dtype.element_ty), (rows[:, None] < N) & (cols[None, :] < c0 + cv))


def _dot_dtype(hidden):
    # tl.dot takes bf16/fp16 as stored on the GPU (tensor cores multiply exactly, sum in fp32), fp32 as fp32.
    # The interpreter's 16-bit maths is wrong: it gets fp32, upcast at tl.load (exact, so the same numbers).
    if INTERPRET or hidden.dtype == torch.float32:
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[hidden.dtype]


def _blocks(hidden, block_n, block_v, block_d):
    # The interpreter pays ~ms per block iteration: few, large blocks. On a GPU: GEMM-like 128 x 128 tiles,
    # BLOCK_D 32 for fp32 so three pipelined stages of shared-memory tiles still fit.
    if INTERPRET:
        return block_n or 64, block_v or 256, block_d or 64
    return block_n or 128, block_v or 128, block_d or (64 if hidden.element_size() == 2 else 32)


def _plan(hidden, V, block_n, block_v, block_d, splits):
    # tile sizes, and the forward's vocabulary split: v_split columns (a multiple of BLOCK_V) per program
    bn, bv, bd = _blocks(hidden, block_n, block_v, block_d)
    row_blocks, v_blocks = triton.cdiv(hidden.shape[0], bn), triton.cdiv(V, bv)
    if splits is None:  # enough programs for ~4 waves on the GPU; 1 in the interpreter
        sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count if hidden.is_cuda else 0
        splits = max(1, min(v_blocks, triton.cdiv(4 * sms, row_blocks)))
    return bn, bv, bd, triton.cdiv(v_blocks, splits) * bv  # splits never share a block


def forward(hidden, weight, targets, ignore_index=-100, *, block_n=None, block_v=None, block_d=None,
            splits=None, group=None, chunk=None, num_warps=8, num_stages=3):
    # hidden (N, D), weight (V, D), targets (N,) -> logp (N,) fp32 and, saved for backward, lse (N,) fp32.
    # The keywords are shared with backward: splits is forward's, group/chunk are backward's.
    (N, D), V = hidden.shape, weight.shape[0]
    bn, bv, bd, v_split = _plan(hidden, V, block_n, block_v, block_d, splits)
    splits = triton.cdiv(V, v_split)
    part = torch.empty(splits, N, dtype=torch.float32, device=hidden.device)
    part_zt = torch.empty_like(part)
    _fwd_kernel[(triton.cdiv(N, bn), splits)](hidden, weight, targets, part, part_zt, N, V, D, v_split,
                                              _dot_dtype(hidden), bn, bv, bd,
                                              num_warps=num_warps, num_stages=num_stages)
    lse = torch.logsumexp(part, 0)  # (N,) the splits' partial log-sum-exps combined
    return torch.where(targets == ignore_index, 0.0, part_zt.sum(0) - lse), lse


DZ_BYTES = 2 ** 27  # 128 MiB dz chunks: 16k vocab columns of 4096 bf16 rows, 4% of Llama 3's 3 GiB logits


def backward(hidden, weight, targets, lse, grad, ignore_index=-100, need_dw=True, *, block_n=None,
             block_v=None, block_d=None, splits=None, group=8, chunk=None, num_warps=8, num_stages=3):
    # grad (N,) upstream d loss / d logp -> d_hidden (N, D), d_weight (V, D) or None, in the inputs' dtypes.
    # The vocabulary goes in chunks of C columns (whole forward splits; chunk=None: DZ_BYTES of dz). Per
    # chunk: _dz_kernel writes dz (N, C) in the operand dtype, then cuBLAS computes
    #   d_weight[chunk] = dz.T @ h    written once, in the weight's dtype (fp32 sums inside the GEMM)
    #   d_hidden += dz @ W[chunk]     summed in one fp32 (N, D) buffer, cast once at the end
    # No atomics, no fp32 (V, D) buffer, and the GEMMs' outputs stay on chip whatever D is (README: a
    # Triton program owning d_hidden rows would need BLOCK_N x D fp32 of them, 2 MiB at D = 4096).
    (N, D), V = hidden.shape, weight.shape[0]
    bn, bv, bd, v_split = _plan(hidden, V, block_n, block_v, block_d, splits)
    per = max(1, (chunk or DZ_BYTES // (N * hidden.element_size())) // v_split)  # forward splits per chunk
    C = min(per * v_split, triton.cdiv(V, v_split) * v_split)
    g = torch.where(targets != ignore_index, grad.float(), 0.0).contiguous()
    dh = torch.zeros(N, D, dtype=torch.float32, device=hidden.device)
    dw = torch.empty_like(weight) if need_dw else None
    dz = torch.empty(N * min(C, V), dtype=hidden.dtype, device=hidden.device)
    for c0 in range(0, V, C):
        cv = min(C, V - c0)
        d = dz[:N * cv].view(N, cv)
        _dz_kernel[(triton.cdiv(N, bn) * triton.cdiv(cv, bv),)](
            hidden, weight, targets, lse, g, d, N, V, D, c0, cv, _dot_dtype(hidden), group, bn, bv, bd,
            num_warps=num_warps, num_stages=num_stages)
        logprobs_torch.addmm(dh, d, weight[c0:c0 + cv])
        if need_dw:
            torch.mm(d.T, hidden, out=dw[c0:c0 + cv])
    return dh.to(hidden.dtype), dw
