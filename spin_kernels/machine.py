# What the machine is and the sizes that suit it, asked in one place by the plain code: its bf16 units
# (model.compute_dtype), free memory and the most rows to decode together (generate.pool_size), the tokens of
# a packed training row (spin.token_budget, spin.group_logprobs). Also the private torch APIs for a CPU's bf16
# units and a compiled step's static addresses: tests/test_kernels.py fails by name if a release changes one.
import os

import torch

CPU_POOL, CUDA_POOL = 64, 512  # most decode rows by default: on a CPU more stop paying (the cache reads grow)


def has_bf16_units(device):
    # CUDA from Ampere on; a CPU with AVX512-BF16 or AMX, where a bf16 GEMM is several times an fp32 one
    # (elsewhere bf16 is emulated, far slower than fp32)
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return device.type == "cpu" and (cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())


def free_memory(device):  # bytes the device has free (a CPU: the RAM)
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def max_pool(device):
    return CUDA_POOL if torch.device(device).type == "cuda" else CPU_POOL


def row_tokens(device):  # tokens of a packed training row by default: a GPU wants long rows
    return 16384 if torch.device(device).type == "cuda" else 4096


def padded_length(tokens, budget, device):
    # The length a packed row of `tokens` is padded to, None: not padded. On CUDA FlexAttention's kernels
    # are compiled per row length: rows go up to a multiple of a quarter of the budget, so at most four
    # lengths (x2: with and without gradients), and the padding costs under a quarter of a row.
    if torch.device(device).type != "cuda":
        return None
    quantum = max(128, budget // 4 // 128 * 128)
    return -(-tokens // quantum) * quantum


def mark_static(tensors):
    # A compiled step replayed as a CUDA graph ("reduce-overhead") may update tensors in place only at
    # addresses marked static (torch has no public API for it)
    for t in tensors:
        torch._dynamo.mark_static_address(t)
