# kernels.fused_logprobs (Triton and PyTorch twin) against the plain reference
# log_softmax(h.float() @ W.float().T).gather(...): values and both gradients, over odd shapes and dtypes.
# Without a GPU the Triton kernels run in Triton's interpreter, which must be on (TRITON_INTERPRET=1) before
# triton is first imported. Setting it here would leak into every later test module of the session (their
# impl=None would pick the slow interpreter), so on CPU the Triton cases run in one child pytest that has
# the variable set (test_interpreter_child) and are skipped in this process.
import os
import subprocess
import sys
import types

import pytest
import torch

import kernels
from kernels import fused_logprobs, logprobs_torch, sequence_logprobs

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON_HERE = kernels.logprobs_triton is not None and (CUDA or kernels.TRITON_INTERPRET)
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_HERE, reason="no GPU: runs under the interpreter in test_interpreter_child"))]


def assert_close(name, got, want, atol, rtol):
    # verbose mismatch report: how many elements are off, the worst one and where, the scale of the data
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got - want).abs().nan_to_num(float("inf"))
    bad = ~((got - want).abs() <= atol + rtol * want.abs())  # ~(<=) also flags NaN
    if bad.any():
        worst = torch.unravel_index(torch.where(bad, diff, -1).argmax(), diff.shape)
        at = tuple(int(i) for i in worst)
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements off (atol {atol:.3g}, rtol {rtol:.3g}); "
            f"max abs diff {diff.max():.4g}; worst at {at}: got {got[worst]:.6g}, want {want[worst]:.6g}; "
            f"max |want| {want.abs().max():.4g}; first bad at {bad.nonzero()[:5].tolist()}")


def tolerances(dtype):
    # Values: every path upcasts the inputs exactly and sums in fp32, so only the summation order differs:
    # fp32 level (1e-5) whatever the input dtype. Gradients of 16-bit inputs come back in that dtype, so
    # ours and the reference's are each rounded once (1 ulp apart at most: eps relative; eps = 2^-7 bf16,
    # 2^-10 fp16), and on the GPU the tensor-core operand dz is rounded too (error <= eps/2 * sum_j
    # |dz_ij||W_jd|, of the order of eps/2 * max|grad|). Hence rtol = eps, atol = eps * max|grad|: bf16 0.8%,
    # fp16 0.1%, taken from the format's precision rather than loosened until the test passes.
    if dtype == torch.float32:
        return (1e-5, 1e-5), lambda want: (1e-5, 1e-5)
    eps = torch.finfo(dtype).eps
    return (1e-5, 1e-5), lambda want: (eps * float(want.abs().max()), eps)


def reference(h, w, t, ignore_index=-100):
    logp = torch.log_softmax(h.float() @ w.float().T, -1).gather(1, t.clamp(min=0)[:, None])[:, 0]
    return torch.where(t == ignore_index, 0.0, logp)


def make(n, d, v, dtype, ignore_every=0, ignore_index=-100, seed=0, device=DEV):
    g = torch.Generator(device).manual_seed(seed)
    h = torch.randn(n, d, generator=g, device=device)
    w = torch.randn(v, d, generator=g, device=device) * (3.0 / d ** 0.5)  # logits of a few units
    t = torch.randint(0, v, (n,), generator=g, device=device)
    if ignore_every:
        t[::ignore_every] = ignore_index
    grad = torch.randn(n, generator=g, device=device)  # upstream grad: different for every row
    h, w = (x.to(dtype).requires_grad_() for x in (h, w))
    return h, w, t, grad


def check(impl, n, d, v, dtype, ignore_every=0, ignore_index=-100, **kw):
    h, w, t, grad = make(n, d, v, dtype, ignore_every, ignore_index)
    want = reference(h, w, t, ignore_index)
    want_dh, want_dw = torch.autograd.grad((want * grad).sum(), (h, w))
    got = fused_logprobs(h, w, t, ignore_index=ignore_index, impl=impl, **kw)
    got_dh, got_dw = torch.autograd.grad((got * grad).sum(), (h, w))
    assert got.dtype == torch.float32 and got_dh.dtype == dtype and got_dw.dtype == dtype
    (atol, rtol), grad_tol = tolerances(dtype)
    tag = f"{impl} {dtype} N={n} D={d} V={v}"
    assert_close(f"logp [{tag}]", got, want, atol, rtol)
    assert_close(f"d_hidden [{tag}]", got_dh, want_dh.float(), *grad_tol(want_dh.float()))
    assert_close(f"d_weight [{tag}]", got_dw, want_dw.float(), *grad_tol(want_dw.float()))
    ignored = t == ignore_index
    assert (got[ignored] == 0).all() and (got_dh[ignored] == 0).all(), "ignored rows must give 0 and no grad"
    return got


# Tile sizes smaller than the problem, with remainders everywhere, so every loop and mask is exercised.
SMALL_TILES = {"torch": dict(token_chunk=16, vocab_chunk=100),
               "triton": dict(block_n=32, block_v=256, block_d=32, splits=3, group=2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", IMPLS)
def test_odd_shapes(impl, dtype):
    check(impl, 67, 48, 1003, dtype, ignore_every=5, **SMALL_TILES[impl])


@pytest.mark.parametrize("impl", IMPLS)
def test_default_tiles_and_other_ignore_index(impl):
    check(impl, 45, 40, 777, torch.float32, ignore_every=3, ignore_index=7)


@pytest.mark.parametrize("impl", IMPLS)
def test_large_vocab(impl):
    # V above 50k, far more than one vocab block; few rows so the interpreter stays quick
    if impl == "torch":
        check(impl, 33, 64, 50257, torch.float32, ignore_every=4)
    else:
        # the interpreter wants few, huge blocks; a GPU would run out of shared memory with them
        tiles = {} if CUDA else dict(block_n=16, block_v=8192, block_d=32)
        check(impl, 5, 32, 50257, torch.float32, **tiles)


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_head_and_all_ignored(impl):
    h, w, t, grad = make(20, 24, 301, torch.float32)
    w.requires_grad_(False)  # e.g. a tied or frozen LM head: d_weight is skipped
    dh, = torch.autograd.grad((fused_logprobs(h, w, t, impl=impl) * grad).sum(), h)
    want_dh, = torch.autograd.grad((reference(h, w, t) * grad).sum(), h)
    assert_close("d_hidden (frozen head)", dh, want_dh, 1e-5, 1e-5)
    t = torch.full_like(t, -100)
    logp = fused_logprobs(h, w, t, impl=impl)
    dh, = torch.autograd.grad(logp.sum(), h)
    assert (logp == 0).all() and (dh == 0).all()


@pytest.mark.skipif(not CUDA, reason="needs a GPU: realistic sizes")
@pytest.mark.parametrize("n,d,v,dtype", [
    (1024, 4096, 128256, torch.bfloat16),  # Llama-3-8B's head
    (2048, 576, 49152, torch.bfloat16),  # SmolLM2-135M's head
    (777, 576, 49152, torch.float32),
    (300, 2048, 128256, torch.float16)])
def test_cuda_realistic(n, d, v, dtype):
    check("triton", n, d, v, dtype, ignore_every=7)


@pytest.mark.skipif(CUDA or kernels.TRITON_INTERPRET or kernels.logprobs_triton is None,
                    reason="Triton cases run in this process")
def test_interpreter_child():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton", __file__]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    print(out.stdout[-20000:], out.stderr[-5000:])
    assert out.returncode == 0, "Triton (interpreter) cases failed:\n" + out.stdout[-20000:]
    assert " passed" in out.stdout and " skipped" not in out.stdout, out.stdout[-2000:]


def test_sequence_logprobs():
    token_logp = torch.tensor([[-1.0, -2.0, -0.5, -4.0], [-0.25, -3.0, -1.0, -2.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)  # prompt tokens are 0
    out = sequence_logprobs(token_logp, mask)
    assert out.dtype == torch.float32 and out.tolist() == [-2.5, -3.0]
    assert sequence_logprobs(token_logp.bfloat16(), mask.long()).tolist() == [-2.5, -3.0]


def test_dispatch(monkeypatch):
    # impl=None: Triton under the interpreter or for CUDA tensors, the PyTorch twin otherwise
    calls = []
    spy = types.SimpleNamespace(backward=logprobs_torch.backward,
                                forward=lambda *a, **k: calls.append(1) or logprobs_torch.forward(*a, **k))
    monkeypatch.setattr(kernels, "logprobs_triton", spy)
    cases = [(False, False, "cpu", 0), (False, True, "cpu", 0), (True, False, "cpu", 1)]
    cases += [(False, True, "cuda", 1)] if CUDA else []
    for interpret, cuda, device, want in cases:
        monkeypatch.setattr(kernels, "TRITON_INTERPRET", interpret)
        monkeypatch.setattr(kernels, "TRITON_CUDA", cuda)
        calls.clear()
        fused_logprobs(*make(4, 8, 11, torch.float32, device=device)[:3])
        assert len(calls) == want, (interpret, cuda, device)


def test_import_cpu_only():
    code = ("import sys; sys.modules['triton'] = None; import kernels, torch; "  # None: import fails
            "print(kernels.logprobs_triton, kernels.fused_logprobs("
            "torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 4, -100])).shape)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "torch.Size([3])"]


def test_mismatch_report_fires():
    # the checker itself must be able to fail, and say where
    want = torch.zeros(3, 4)
    got = want.clone()
    got[2, 1] = 1e-3
    with pytest.raises(AssertionError, match=r"1/12 elements off.*worst at \(2, 1\)"):
        assert_close("x", got, want, 1e-5, 1e-5)
    got[2, 1] = float("nan")
    with pytest.raises(AssertionError, match=r"worst at \(2, 1\)"):
        assert_close("x", got, want, 1e-5, 1e-5)
