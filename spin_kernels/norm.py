# RMSNorm with its own backward, applied from outside: `use_fast_norm(model)` runs every model.RMSNorm
# through `fast_rms_norm` (the same maths as its plain forward). Autograd over the plain forward's ops
# allocates 52 bytes per element for forward and backward in bf16, 48 in fp32 (an upcast, its square, the
# product, their gradients); this 28 in both. On a CPU, where fresh memory costs a page fault per 4 KB,
# the norms were a train step's largest elementwise cost (docs/benchmarks.md, bench/bench_norm.py).
from functools import partial

import torch


def use_fast_norm(model):
    from model import RMSNorm  # imported here: model.py imports this package
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.forward = partial(fast_rms_norm, m)
    return model


def fast_rms_norm(norm, x):  # without gradients (sampling, scoring) the same maths, no autograd Function
    return _RMSNorm.apply(x, norm.weight, norm.eps) if torch.is_grad_enabled() else \
        rms_norm(x, norm.weight, norm.eps)[0]


def rms_norm(x, w, eps):
    # x (..., D), w (D,) -> y = w * n (..., D), n = x / rms(x) in x's dtype, r = 1 / rms(x) (..., 1) fp32
    xf = x.to(torch.float32, copy=True)                                # the one fp32 copy, worked in place
    r = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
    r = r.square_().div_(x.shape[-1]).add_(eps).rsqrt_()
    n = xf.mul_(r).to(x.dtype)
    return w * n, n, r


class _RMSNorm(torch.autograd.Function):
    # y = w * n, n = x * r rounded to x's dtype, r = rsqrt(mean(x^2) + eps) in fp32: the plain forward's
    # order and rounding, so bf16 outputs match (r's sum of squares may differ in its last bit).
    @staticmethod
    def forward(ctx, x, w, eps):
        y, n, r = rms_norm(x, w, eps)
        ctx.save_for_backward(x, w, n, r)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w, n, r = ctx.saved_tensors
        dw = (gy * n).flatten(0, -2).sum(0)                           # (D,) as autograd: product in x's dtype
        dn = (gy * w).float()                                          # (..., D) fp32
        xh = x.to(torch.float32, copy=True).mul_(r)                    # x / rms(x)
        m = torch.linalg.vecdot(dn, xh)[..., None] / x.shape[-1]  # mean(dn * xh): dx = r * (dn - xh * m)
        return xh.mul_(m).neg_().add_(dn).mul_(r).to(x.dtype), dw, None
