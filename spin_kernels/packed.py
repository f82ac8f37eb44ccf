# CPU generation with packed weights, applied from outside for the phase: `with packed_weights(model):`
# around generate. While a model generates its weights do not change, so on a CPU:
# - in bf16 every matrix product goes through oneDNN, which multiplies by a weight in its own blocked
#   layout and, given a plain weight, makes that copy again on every call: each weight is copied into that
#   layout once (the ops Inductor's CPU freezing uses), products of the same input as one, their weights
#   stacked: q|k|v (Attention.project) and gate|up (MLP.gate_up), so a layer runs 4 products, not 7; the
#   LM head too (Transformer.logits). A second copy of the weights for the phase.
# - in fp32 MKL runs the LM head as W @ h^T faster than h @ W^T for a vocabulary-sized W and a few rows
#   (the transposed copy costs less than the difference); fp32 products packed through oneDNN were not
#   faster everywhere, so the others stay as they are.
# Elsewhere (CUDA), or under torch.compile (Inductor packs its own), nothing changes. The instances'
# methods are replaced for the phase and restored after, even after an error. Figures: docs/benchmarks.md.
from contextlib import contextmanager

import torch

from .machine import CPU_POOL


def bf16_packing_available():
    ops = torch.ops.mkldnn  # private ops: tests/test_generate.py fails clearly if a torch release renames one
    names = ("_reorder_linear_weight", "_linear_pointwise", "_is_mkldnn_bf16_supported")
    return (torch.backends.mkldnn.is_available() and all(hasattr(ops, op) for op in names)
            and ops._is_mkldnn_bf16_supported())


@contextmanager
def packed_weights(model, enabled=True):
    from model import MLP, Attention  # imported here: model.py imports this package
    w, swaps = model.lm_weight, []  # swaps: (module, attribute, its replacement), set for the phase
    if enabled and w.device.type == "cpu" and w.dtype == torch.bfloat16 and bf16_packing_available():
        # the layout for a product of up to a CPU pool's rows, a decode step's (faster there than for 1 row)
        pack = lambda W: torch.ops.mkldnn._reorder_linear_weight(W.detach(), CPU_POOL)  # noqa: E731

        def product(*linears):  # linear layers of one input -> x -> their outputs (one: the output)
            P, sizes = pack(torch.cat([m.weight for m in linears])), [m.out_features for m in linears]
            b = None if linears[0].bias is None else torch.cat([m.bias for m in linears]).detach()

            def run(x):
                y = torch.ops.mkldnn._linear_pointwise(x, P, b, "none", [], "")
                return y.split(sizes, -1) if len(sizes) > 1 else y
            return run
        for m in model.modules():
            if isinstance(m, Attention):
                swaps += [(m, "project", product(m.q_proj, m.k_proj, m.v_proj)),
                          (m.o_proj, "forward", product(m.o_proj))]
            elif isinstance(m, MLP):
                swaps += [(m, "gate_up", product(m.gate_proj, m.up_proj)),
                          (m.down_proj, "forward", product(m.down_proj))]
        head, linear = pack(w), torch.ops.mkldnn._linear_pointwise
        swaps.append((model, "logits", lambda h: linear(h, head, None, "none", [], "")))
    elif enabled and w.device.type == "cpu":
        swaps.append((model, "logits", lambda h: (model.lm_weight @ h.T).T.contiguous()))
    try:
        for m, name, fn in swaps:
            setattr(m, name, fn)
        yield model
    finally:
        for m, name, _ in swaps:
            m.__dict__.pop(name, None)
