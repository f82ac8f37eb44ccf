# PyTorch twin of logprobs.py: the same forward/backward signature; the CPU path and the tests' reference.
# Work goes in (token_chunk, vocab_chunk) tiles so one tile of fp32 logits is alive at a time (8 MiB at the
# defaults) whatever N and V are. Vocab tiles also keep the CPU fast: each re-reads a small hidden chunk,
# not the whole (V, D) head, and the tile lives in one reused buffer through the in-place exp.
import torch


def _logits(buf, h, w):
    # (n, v) = h @ w.T written into the front of the reused buffer: no allocation or page faults per tile
    return torch.mm(h, w.T, out=buf[:h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0]))


def forward(hidden, weight, targets, ignore_index=-100, *, token_chunk=2048, vocab_chunk=1024):
    # hidden (N, D), weight (V, D), targets (N,) -> logp (N,) fp32, lse (N,) fp32 (saved for backward)
    N, V = hidden.shape[0], weight.shape[0]
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    zt = torch.empty_like(lse)
    buf = torch.empty(min(N, token_chunk) * min(V, vocab_chunk), dtype=torch.float32, device=hidden.device)
    for i in range(0, N, token_chunk):
        h = hidden[i:i + token_chunk].float()  # (n, D)
        parts = []
        for j in range(0, V, vocab_chunk):
            z = _logits(buf, h, weight[j:j + vocab_chunk].float())  # (n, v) logits tile
            m = z.amax(1, keepdim=True)
            parts.append(z.sub_(m).exp_().sum(1).log_().add_(m[:, 0]))  # the tile's log-sum-exp
        lse[i:i + token_chunk] = torch.logsumexp(torch.stack(parts, 1), 1)
        zt[i:i + token_chunk] = (h * weight[safe[i:i + token_chunk]].float()).sum(1)  # target logit
    return torch.where(valid, zt - lse, 0.0), lse


def backward(hidden, weight, targets, lse, grad, ignore_index=-100, need_dw=True, *,
             token_chunk=2048, vocab_chunk=1024):
    # grad (N,) upstream d loss / d logp -> d_hidden (N, D), d_weight (V, D) or None.
    # d logp_i / d z_ij = [j == t_i] - p_ij (p = softmax), so with g the upstream grad:
    #   d_hidden = g * (W[t] - P @ W)        d_weight = onehot(t).T @ (g * h) - P.T @ (g * h)
    # P goes through the tiles unscaled (g is folded into h); the one-hot parts: a gather and an index_add.
    (N, D), V = hidden.shape, weight.shape[0]
    valid = targets != ignore_index
    g = torch.where(valid, grad.float(), 0.0)[:, None]  # (N, 1) ignored rows get no gradient
    safe = torch.where(valid, targets, 0)
    dh = torch.empty(N, D, dtype=torch.float32, device=hidden.device)
    dw = torch.zeros(V, D, dtype=torch.float32, device=hidden.device) if need_dw else None
    buf = torch.empty(min(N, token_chunk) * min(V, vocab_chunk), dtype=torch.float32, device=hidden.device)
    for i in range(0, N, token_chunk):
        rows = slice(i, i + token_chunk)
        h = hidden[rows].float()  # (n, D)
        gh = h * g[rows]  # (n, D)
        pw = torch.zeros_like(h)  # (n, D) P @ W, summed over the vocab tiles
        for j in range(0, V, vocab_chunk):
            w = weight[j:j + vocab_chunk].float()  # (v, D)
            p = _logits(buf, h, w).sub_(lse[rows, None]).exp_()  # (n, v) softmax tile
            pw.addmm_(p, w)
            if need_dw:
                dw[j:j + vocab_chunk].addmm_(p.T, gh, alpha=-1)
        torch.mul(weight[safe[rows]].float().sub_(pw), g[rows], out=dh[rows])
        if need_dw:
            dw.index_add_(0, safe[rows], gh)
    return dh.to(hidden.dtype), dw.to(weight.dtype) if need_dw else None
