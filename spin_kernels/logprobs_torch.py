# PyTorch twin of logprobs.py: the same forward/backward signature; the CPU path and the tests' reference.
# Work goes in (token_chunk, vocab_chunk) tiles so one tile of fp32 logits is alive at a time (8 MiB at the
# defaults) whatever N and V are. Vocab tiles also keep the CPU fast: each re-reads a small hidden chunk,
# not the whole (V, D) head, and the tile lives in one reused buffer through the in-place exp.
# The backward walks the vocabulary in its outer loop, so each (vocab_chunk, D) slice of d_weight is summed
# in a small fp32 tile and written once, in the weight's dtype: no fp32 (V, D) buffer for 16-bit inputs.
# 16-bit inputs (bf16 compute): every GEMM takes the operands as stored (no fp32 copy of a weight tile);
# the log-sum-exp, the outputs and the d_hidden sums stay fp32 (_logits and addmm say how).
import torch


def _buffers(h, n, v):
    # the reused tiles: fp32 logits, and for 16-bit operands the GEMM's own 16-bit output (in the backward
    # then the 16-bit softmax tile); a fresh buffer per tile costs page faults every time
    f32 = torch.empty(n * v, dtype=torch.float32, device=h.device)
    return f32, (None if h.dtype == torch.float32 else torch.empty(n * v, dtype=h.dtype, device=h.device))


def tile(buf, rows, cols):  # the front of a reused flat buffer as a (rows, cols) tile
    return buf[:rows * cols].view(rows, cols)


def _logits(bufs, h, w, bias=None):
    # (n, v) fp32 tile of h @ w.T (+ bias) in the front of the reused fp32 buffer (fp32 operands: in place).
    # 16-bit operands: the GEMM multiplies them exactly and sums in fp32, but on a CPU rounds its output to
    # 16 bits (no fp32-output bf16 GEMM there): an error of u |z| (u = 2^-8 for bf16). bias (n, 1), added
    # inside the GEMM before that rounding, is minus a 16-bit number near the row's top logits, making the
    # error u |z + bias|: small on exactly the logits that carry probability. Then one (n, v) upcast pass,
    # instead of upcasting the (v, D) weight tile. CUDA has fp32-output 16-bit GEMMs (mm32): no 16-bit
    # rounding (its bf16 addmm was 0.63 off at a logit of ~128, over one rounding: the bias added after it).
    n, v = h.shape[0], w.shape[0]
    if h.is_cuda and h.dtype != torch.float32:
        z = mm32(h, w.T)
        return z if bias is None else z.add_(bias.float())
    z = tile(bufs[0], n, v)
    if h.dtype == torch.float32:  # (no bias: fp32 keeps the twin's earlier results bit for bit)
        return torch.mm(h, w.T, out=z)
    z16 = tile(bufs[1], n, v)
    return z.copy_(torch.mm(h, w.T, out=z16) if bias is None else torch.addmm(bias, h, w.T, out=z16))


def mm32(a, b, bufs=None):
    # a @ b summed in fp32 and returned in fp32. CUDA: 16-bit operands, fp32 output (out_dtype). CPU: the
    # GEMM's 16-bit output is upcast (one rounding per product; the tests' tolerance counts it), in the
    # reused buffers bufs (see _buffers) when given: fresh ones cost page faults on every call.
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except TypeError:  # torch before 2.8: no out_dtype; the CPU way then
            pass
    if bufs is None:
        return torch.mm(a, b).float()
    n, m = a.shape[0], b.shape[1]
    return tile(bufs[0], n, m).copy_(torch.mm(a, b, out=tile(bufs[1], n, m)))


def addmm(acc, a, b, alpha=1, bufs=None):
    # acc (fp32) += alpha * a @ b: fp32 operands in place (the GEMM's beta=1), 16-bit ones through mm32
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b, alpha=alpha)
    return acc.add_(mm32(a, b, bufs), alpha=alpha)


def forward(hidden, weight, targets, ignore_index=-100, *, token_chunk=2048, vocab_chunk=1024):
    # hidden (N, D), weight (V, D), targets (N,) -> logp (N,) fp32 and, saved for backward, lse (N,) fp32.
    # Each vocab tile's log-sum-exp goes into part (N, tiles), combined into lse once per token chunk.
    N, V = hidden.shape[0], weight.shape[0]
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    zt = torch.empty_like(lse)
    part = torch.empty(N, -(-V // vocab_chunk), dtype=torch.float32, device=hidden.device)
    bufs = _buffers(hidden, min(N, token_chunk), min(V, vocab_chunk))
    for i in range(0, N, token_chunk):
        rows = slice(i, i + token_chunk)
        h = hidden[rows]  # (n, D) the GEMM operand, as stored
        zt[rows] = (h.float() * weight[safe[rows]].float()).sum(1)  # target logit, fp32 products and sum
        # 16-bit: the target logit (rounded to 16 bits) as the offset inside the GEMMs, added back below
        bias = None if h.dtype == torch.float32 else (-zt[rows, None]).to(h.dtype)
        for k, j in enumerate(range(0, V, vocab_chunk)):
            z = _logits(bufs, h, weight[j:j + vocab_chunk], bias)  # (n, v) logits tile (minus the offset)
            m = z.amax(1, keepdim=True)
            part[rows, k] = z.sub_(m).exp_().sum(1).log_().add_(m[:, 0])  # the tile's log-sum-exp
        if bias is not None:
            part[rows] -= bias.float()
        lse[rows] = torch.logsumexp(part[rows], 1)
    return torch.where(valid, zt - lse, 0.0), lse


def backward(hidden, weight, targets, lse, grad, ignore_index=-100, need_dw=True, *,
             token_chunk=2048, vocab_chunk=1024):
    # grad (N,) upstream d loss / d logp -> d_hidden (N, D), d_weight (V, D) or None, in the inputs' dtypes.
    # d logp_i / d z_ij = [j == t_i] - p_ij (p = softmax), so with g the upstream grad:
    #   d_hidden = g * (W[t] - P @ W)        d_weight = onehot(t).T @ (g * h) - P.T @ (g * h)
    # P goes through the tiles unscaled (g is folded into h); the one-hot parts: a gather and an index_add.
    (N, D), V = hidden.shape, weight.shape[0]
    valid = targets != ignore_index
    g = torch.where(valid, grad.float(), 0.0)[:, None]  # (N, 1) ignored rows get no gradient
    safe = torch.where(valid, targets, 0)
    gh = hidden.float() * g  # (N, D) fp32, for the one-hot part
    gh_op = gh.to(hidden.dtype)  # (N, D) the GEMM operand (gh itself for fp32)
    # 16-bit: logits are computed minus bf16(lse) inside the GEMM (see _logits), so p = exp(z' - shift)
    bias = None if hidden.dtype == torch.float32 else (-lse[:, None]).to(hidden.dtype)
    shift = lse[:, None] if bias is None else lse[:, None] + bias.float()  # (N, 1)
    pw = torch.zeros(N, D, dtype=torch.float32, device=hidden.device)  # P @ W, summed over the vocab chunks
    dw = torch.empty_like(weight) if need_dw else None
    acc = torch.empty(min(V, vocab_chunk), D, dtype=torch.float32, device=hidden.device)  # d_weight slice
    bufs = _buffers(hidden, min(N, token_chunk), min(V, vocab_chunk))
    outs = _buffers(hidden, max(min(N, token_chunk), min(V, vocab_chunk)), D)  # (n, D) and (v, D) products
    for j in range(0, V, vocab_chunk):
        w = weight[j:j + vocab_chunk]  # (v, D) as stored
        a = acc[:w.shape[0]].zero_()
        for i in range(0, N, token_chunk):
            rows = slice(i, i + token_chunk)
            p = _logits(bufs, hidden[rows], w, None if bias is None else bias[rows])
            p = p.sub_(shift[rows]).exp_()  # (n, v) softmax tile; 16-bit: rounded, into the free 16-bit one
            p = p if bufs[1] is None else tile(bufs[1], *p.shape).copy_(p)
            addmm(pw[rows], p, w, bufs=outs)
            if need_dw:
                addmm(a, p.T, gh_op[rows], alpha=-1, bufs=outs)
                t = safe[rows] - j  # the one-hot part of the rows whose target is in this chunk
                hit = (t >= 0) & (t < w.shape[0])
                a.index_add_(0, t[hit], gh[rows][hit])
        if need_dw:
            dw[j:j + vocab_chunk] = a  # written once, in the weight's dtype
    return weight[safe].float().sub_(pw).mul_(g).to(hidden.dtype), dw
