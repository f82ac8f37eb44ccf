# PyTorch twin of logprobs.py: the same forward/backward signature, the CPU path and the tests' reference.
# Work goes in (token_chunk, vocab_chunk) tiles so only one tile of logits is alive at a time (16 MiB at the
# defaults), whatever N and V are. Vocab tiles also keep the CPU fast: each tile re-reads the small hidden
# chunk rather than the whole (V, D) head, and the tile stays in cache through the in-place exp.
import torch


def forward(hidden, weight, targets, ignore_index=-100, *, token_chunk=4096, vocab_chunk=1024):
    # hidden (N, D), weight (V, D), targets (N,) -> logp (N,) fp32, lse (N,) fp32 (saved for backward)
    N, V = hidden.shape[0], weight.shape[0]
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    zt = torch.empty_like(lse)
    for i in range(0, N, token_chunk):
        h = hidden[i:i + token_chunk].float()  # (n, D)
        parts = []
        for j in range(0, V, vocab_chunk):
            z = h @ weight[j:j + vocab_chunk].float().T  # (n, v) logits tile
            m = z.amax(1, keepdim=True)
            parts.append(z.sub_(m).exp_().sum(1).log_().add_(m[:, 0]))  # the tile's log-sum-exp, in place
        lse[i:i + token_chunk] = torch.logsumexp(torch.stack(parts, 1), 1)
        zt[i:i + token_chunk] = (h * weight[safe[i:i + token_chunk]].float()).sum(1)  # target logit
    return torch.where(valid, zt - lse, 0.0), lse


def backward(hidden, weight, targets, lse, grad, ignore_index=-100, need_dw=True, *,
             token_chunk=4096, vocab_chunk=1024):
    # grad (N,) upstream d loss / d logp -> d_hidden (N, D), d_weight (V, D) or None.
    # d logp_i / d z_ij = [j == t_i] - softmax_ij: the softmax part goes through the tiles, the one-hot part
    # is a row gather (d_hidden) and a scatter-add (d_weight) done once per token chunk.
    (N, D), V = hidden.shape, weight.shape[0]
    valid = targets != ignore_index
    g = torch.where(valid, grad.float(), 0.0)  # (N,) ignored rows get no gradient
    safe = torch.where(valid, targets, 0)
    dh = torch.empty(N, D, dtype=torch.float32, device=hidden.device)
    dw = torch.zeros(V, D, dtype=torch.float32, device=hidden.device) if need_dw else None
    for i in range(0, N, token_chunk):
        h, gi, dhi = hidden[i:i + token_chunk].float(), g[i:i + token_chunk, None], dh[i:i + token_chunk]
        torch.mul(weight[safe[i:i + token_chunk]].float(), gi, out=dhi)  # one-hot part
        if need_dw:
            dw.index_add_(0, safe[i:i + token_chunk], h * gi)
        for j in range(0, V, vocab_chunk):
            w = weight[j:j + vocab_chunk].float()  # (v, D)
            dz = (h @ w.T).sub_(lse[i:i + token_chunk, None]).exp_().mul_(-gi)  # (n, v) -g * softmax
            dhi.addmm_(dz, w)
            if need_dw:
                dw[j:j + vocab_chunk].addmm_(dz.T, h)
    return dh.to(hidden.dtype), dw.to(weight.dtype) if need_dw else None
