# Hardware-specific speed, each path beside its plain twin (same maths); machine.py: what the machine is.
# speed_up(model): use_fast_attention (attention.py), use_fast_norm (norm.py) and, once FSDP2 has sharded
# the model over one CPU process, use_one_process_reduce (reduce.py); `with packed_weights(model):` around a
# CPU generation (packed.py). fused_logprobs: log_softmax(hidden @ weight.T)[i, targets[i]] without the
# (N, V) logits, by Triton (logprobs.py) or its PyTorch twin (logprobs_torch.py), as the machine allows.
__all__ = ["fused_logprobs", "packed_weights", "speed_up"]

import torch

from . import logprobs_torch
from .attention import use_fast_attention
from .norm import use_fast_norm
from .packed import packed_weights
from .reduce import use_one_process_reduce


def speed_up(model):
    return use_one_process_reduce(use_fast_norm(use_fast_attention(model)))


try:
    from . import logprobs as logprobs_triton
except ImportError:  # no triton installed: CPU-only machines still get the twin
    logprobs_triton = None

# Triton runs on CUDA tensors, or on CPU tensors under the interpreter (TRITON_INTERPRET=1, read at import).
TRITON_CUDA = logprobs_triton is not None and torch.cuda.is_available()
TRITON_INTERPRET = logprobs_triton is not None and logprobs_triton.INTERPRET


class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, impl, kw):
        logp, lse = impl.forward(hidden, weight, targets, ignore_index, **kw)
        ctx.save_for_backward(hidden, weight, targets, lse)  # lse (N,): all the backward needs to recompute
        ctx.impl, ctx.ignore_index, ctx.kw = impl, ignore_index, kw
        return logp

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        dh, dw = ctx.impl.backward(hidden, weight, targets, lse, grad.contiguous(), ctx.ignore_index,
                                   ctx.needs_input_grad[1], **ctx.kw)
        return dh, dw, None, None, None, None


def fused_logprobs(hidden, weight, targets, *, ignore_index=-100, impl=None, **kw):
    # hidden (N, D) any float dtype, weight (V, D), targets (N,) int -> (N,) fp32 log-probs, 0 where ignored;
    # kw: the chosen impl's tile sizes (block_n/block_v/block_d/splits/group/chunk or token_chunk/vocab_chunk)
    if impl is None:
        impl = "triton" if TRITON_INTERPRET or (TRITON_CUDA and hidden.is_cuda) else "torch"
    mod = {"triton": logprobs_triton, "torch": logprobs_torch}[impl]
    assert mod is not None, "impl='triton' needs triton installed"
    assert hidden.shape[1] == weight.shape[1] and targets.shape == hidden.shape[:1]
    dtype = torch.promote_types(hidden.dtype, weight.dtype)  # one GEMM operand dtype (mixed inputs: a cast)
    return _FusedLogprobs.apply(hidden.to(dtype).contiguous(), weight.to(dtype).contiguous(),
                                targets.contiguous(), ignore_index, mod, kw)

