# FSDP2's gradient reduce-scatter over one CPU process, without fresh memory. FSDP packs a block's gradients
# into a fresh buffer, then copies it into a second fresh buffer as the "scattered" output; on a CPU the first
# touch of fresh memory costs a page fault per 4 KB, a large share of a bf16 train step (docs/benchmarks.md).
# `use_one_process_reduce(model)` gives every FSDP module of such a run a reduce (FSDP's Comm interface:
# allocate, then call) whose output is the packed buffer itself (FSDP's copy becomes a self-copy, a no-op)
# and, for a gradient in another dtype than the fp32 master weights (bf16 compute), one buffer per size for
# every block and step: the gradient is then cast into a tensor of its own, so no view of the buffer is kept.
import torch
import torch.distributed as dist


def use_one_process_reduce(model):
    fsdp = [m for m in model.modules() if hasattr(m, "set_custom_reduce_scatter")]  # torch >= 2.12
    if fsdp and dist.get_world_size() == 1 and next(model.parameters()).device.type == "cpu":
        comm = OneProcessReduce()  # one for all: a CPU reduces one block at a time
        for m in fsdp:
            m.set_custom_reduce_scatter(comm)
    return model


class OneProcessReduce:
    def __init__(self):
        self.buffers, self.packed = {}, None

    def allocate(self, size, *, dtype, device):
        if self.packed is not None:  # the second request of a reduce: its output
            out, self.packed = self.packed, None
            return out
        self.packed = self.buffers.get((tuple(size), dtype))
        if self.packed is None:
            self.packed = torch.empty(size, dtype=dtype, device=device)
            if dtype != torch.float32:  # not the master weights' dtype: the gradient is cast to a copy
                self.buffers[(tuple(size), dtype)] = self.packed
        return self.packed

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        if output_tensor is not input_tensor:  # a reduce over one process is a copy
            output_tensor.copy_(input_tensor)
