# spin_kernels.fused_logprobs (Triton and PyTorch twin) against the plain reference
# log_softmax(h.float() @ W.float().T).gather(...): values and both gradients, over odd shapes and dtypes,
# within per-element tolerances derived from each path's arithmetic (tolerances).
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

import spin_kernels
from spin_kernels import fused_logprobs, logprobs_torch
from spin_kernels.machine import has_bf16_units

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON_HERE = spin_kernels.logprobs_triton is not None and (CUDA or spin_kernels.TRITON_INTERPRET)
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_HERE, reason="no GPU: runs under the interpreter in test_interpreter_child"))]


def assert_close(name, got, want, atol, rtol):
    # verbose mismatch report: how many elements are off, the worst one and where, the scale of the data.
    # atol: a number or a per-element tensor of bounds (see tolerances)
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    atol = torch.as_tensor(atol, dtype=torch.float32).cpu().expand_as(want)
    diff = (got - want).abs().nan_to_num(float("inf"))
    bad = ~((got - want).abs() <= atol + rtol * want.abs())  # ~(<=) also flags NaN
    if bad.any():
        worst = torch.unravel_index(torch.where(bad, diff, -1).argmax(), diff.shape)
        at = tuple(int(i) for i in worst)
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements off (atol {atol[worst]:.3g} there, max "
            f"{atol.max():.3g}; rtol {rtol:.3g}); max abs diff {diff.max():.4g}; worst at {at}: got "
            f"{got[worst]:.6g}, want {want[worst]:.6g}; max |want| {want.abs().max():.4g}; "
            f"first bad at {bad.nonzero()[:5].tolist()}")


def tolerances(h, w, t, grad, ignore_index, impl):
    # -> atol of logp (N,), d_hidden (N, D), d_weight (V, D), and the gradients' rtol: per-element bounds
    # from each path's arithmetic (spin_kernels/README.md, "Precision"), not loosened until tests pass.
    # Every path sums in fp32 (16-bit inputs are exact there). We take an fp32 sum to be within
    # c32 = 1e-6 (16 u32: blocked summation of these sizes) of its sum of absolute values: the logits
    # within e_ij = c32 (|h| @ |w|.T)_ij, so lse within max_j e_ij, logp within e_it + max_j e_ij, and each
    # p_ij within a factor exp(+-E_ij), E_ij = e_ij + max_k e_ik. With Y the one-hot targets and
    # S the sums of absolute terms of each gradient element (S_dh = |g| |Y - P| @ |W|,
    # S_dw = |Y - P|.T @ |g h|), the gradients are within c32 S + (|g| P (e^E - 1)) @ |W| (d_hidden) and
    # c32 S + (P (e^E - 1)).T @ |g h| (d_weight), and rtol 1e-5.
    # 16-bit inputs, rounding x to them costing u |x| + eta (u = eps/2: 2^-8 bf16, 2^-11 fp16; eta: half
    # the smallest subnormal), add:
    #   - every path rounds dz (or P and g h) to 16 bits for its GEMMs, and a CPU GEMM also rounds its
    #     output per chunk: at most 3 roundings per term, 3u S (+ eta per term); the result is rounded
    #     once more: rtol u.
    #   - the twin's logits are 16-bit GEMM outputs (logprobs_torch._logits): z - c rounded, error
    #     u |z - c|, with c the 16-bit target logit zt in the forward and lse in the backward. So its lse,
    #     and logp, are off by L_i = u (max_j |z_ij - zt_i| + u |zt_i|) more, and E_ij grows by
    #     u (|z_ij - lse_i| + u |lse_i|) + L_i. Triton sums its logits in fp32.
    c32, dtype = 1e-6, h.dtype
    h, w = h.detach().double(), w.detach().double()  # on the inputs' device: (N, V) fp64 temporaries
    valid = t != ignore_index
    safe = torch.where(valid, t, 0)[:, None]
    g = torch.where(valid, grad.double(), 0.0).abs()[:, None]  # (N, 1) |g|
    z = h @ w.T
    lse = z.logsumexp(1, keepdim=True)
    P = (z - lse).exp()
    Y = torch.zeros_like(P).scatter_(1, safe, 1.0) * valid[:, None]
    gh = g * h.abs()
    S_dh, S_dw = g * ((Y - P).abs() @ w.abs()), (Y - P).abs().T @ gh
    e = c32 * (h.abs() @ w.abs().T)
    L = e.gather(1, safe) + e.amax(1, keepdim=True)  # (N, 1)
    E = e + e.amax(1, keepdim=True)  # (N, V)
    dh, dw, rtol = c32 * S_dh, c32 * S_dw, 1e-5
    if dtype != torch.float32:
        u, eta = torch.finfo(dtype).eps / 2, torch.finfo(dtype).tiny * torch.finfo(dtype).eps / 2
        dh = dh + 3 * u * S_dh + eta * g * w.abs().sum(0)
        dw = dw + 3 * u * S_dw + eta * gh.sum(0)
        rtol = u
        if impl == "torch":
            zt = z.gather(1, safe)
            L16 = u * ((z - zt).abs().amax(1, keepdim=True) + u * zt.abs())
            L, E = L + L16, E + u * ((z - lse).abs() + u * lse.abs()) + L16
    PE = P * E.expm1()
    return L[:, 0] + 1e-6, dh + g * (PE @ w.abs()) + 1e-6, dw + PE.T @ gh + 1e-6, rtol


def reference(h, w, t, ignore_index=-100):
    logp = torch.log_softmax(h.float() @ w.float().T, -1).gather(1, t.clamp(min=0)[:, None])[:, 0]
    return torch.where(t == ignore_index, 0.0, logp)


def make(n, d, v, dtype, ignore_every=0, ignore_index=-100, seed=0, device=DEV, scale=3.0):
    g = torch.Generator(device).manual_seed(seed)
    h = torch.randn(n, d, generator=g, device=device)
    w = torch.randn(v, d, generator=g, device=device) * (scale / d ** 0.5)  # logits of ~scale units
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
    tol_logp, tol_dh, tol_dw, rtol = tolerances(h, w, t, grad, ignore_index, impl)
    tag = f"{impl} {dtype} N={n} D={d} V={v}"
    assert_close(f"logp [{tag}]", got, want, tol_logp, 1e-5)
    assert_close(f"d_hidden [{tag}]", got_dh, want_dh, tol_dh, rtol)
    assert_close(f"d_weight [{tag}]", got_dw, want_dw, tol_dw, rtol)
    ignored = t == ignore_index
    assert (got[ignored] == 0).all() and (got_dh[ignored] == 0).all(), "ignored rows must give 0 and no grad"
    return got


# Tile sizes smaller than the problem, with remainders everywhere, so every loop and mask is exercised
# (Triton: 2 forward splits of 512 columns, and backward chunks of one split, the last one 491 wide).
SMALL_TILES = {"torch": dict(token_chunk=16, vocab_chunk=100),
               "triton": dict(block_n=32, block_v=256, block_d=32, splits=3, group=2, chunk=512)}


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


def test_mixed_dtypes():
    # bf16 hidden states and an fp32 head (no cast policy): computed in the wider dtype, each gradient in
    # its input's dtype
    h, w, t, grad = make(20, 24, 301, torch.float32)
    h16 = h.detach().bfloat16().requires_grad_()
    got = fused_logprobs(h16, w, t, impl="torch")
    assert torch.equal(got, fused_logprobs(h16.detach().float(), w.detach(), t, impl="torch"))
    dh, dw = torch.autograd.grad((got * grad).sum(), (h16, w))
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.float32


def test_bf16_logprobs_vs_fp32():
    # What bf16 compute changes in the log-probs a model scores (issue 9): hidden states and head rounded
    # to bf16 by the precision policy, then the twin's bf16 GEMMs, against fp32 inputs and fp32 maths.
    # Rounding both inputs moves each logit by at most A_ij = (2u + u^2) sum_d |h_id| |w_jd|, so
    # logp = z_t - lse moves by at most A_it + max_j A_ij (lse is 1-Lipschitz in the max norm), plus the
    # twin's own bf16 error on the rounded inputs (tolerances: L_i).
    h, w, t, grad = make(67, 48, 1003, torch.float32, ignore_every=5)
    want = fused_logprobs(h, w, t, impl="torch")
    h16, w16 = h.detach().bfloat16(), w.detach().bfloat16()
    got = fused_logprobs(h16, w16, t, impl="torch")
    u = 2.0 ** -8
    A = (2 * u + u * u) * (h.detach().abs().double() @ w.detach().abs().double().T)
    bound = A.gather(1, t.clamp(min=0)[:, None])[:, 0] + A.amax(1) + tolerances(h16, w16, t, grad, -100,
                                                                                "torch")[0]
    assert_close("logp bf16 vs fp32", got, want, torch.where(t == -100, 0.0, bound), 0.0)
    assert (got - want).abs().max() > 1e-4  # the inputs did change: the bound is what is tested


@pytest.mark.skipif(not CUDA, reason="needs a GPU: realistic sizes")
@pytest.mark.parametrize("n,d,v,dtype", [
    (1024, 4096, 128256, torch.bfloat16),  # Llama-3-8B's head
    (2048, 576, 49152, torch.bfloat16),  # SmolLM2-135M's head
    (777, 576, 49152, torch.float32),
    (300, 2048, 128256, torch.float16)])
def test_cuda_realistic(n, d, v, dtype):
    check("triton", n, d, v, dtype, ignore_every=7)


@pytest.mark.skipif(CUDA or spin_kernels.TRITON_INTERPRET or spin_kernels.logprobs_triton is None,
                    reason="Triton cases run in this process")
def test_interpreter_child():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton", __file__]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    print(out.stdout[-20000:], out.stderr[-5000:])
    assert out.returncode == 0, "Triton (interpreter) cases failed:\n" + out.stdout[-20000:]
    assert " passed" in out.stdout and " skipped" not in out.stdout, out.stdout[-2000:]


def test_machine_private_apis():
    # spin_kernels/machine.py asks for a CPU's bf16 units and marks a compiled step's static addresses
    # through torch's private APIs (no public ones): a release that renames one fails here, by name
    for module, name, user in [(torch.cpu, "_is_avx512_bf16_supported", "has_bf16_units"),
                               (torch.cpu, "_is_amx_tile_supported", "has_bf16_units"),
                               (torch._dynamo, "mark_static_address", "mark_static")]:
        assert callable(getattr(module, name, None)), \
            f"torch {torch.__version__} has no {module.__name__}.{name}: update spin_kernels.machine.{user}"
    flags = open("/proc/cpuinfo").read().split() if os.path.isfile("/proc/cpuinfo") else None
    if flags is not None:  # on Linux, what /proc/cpuinfo says the CPU has
        assert has_bf16_units("cpu") == ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert has_bf16_units("meta") is False


def test_machine_row_sizes():
    # Packed training rows: padded on CUDA only (FlexAttention compiles per length) to a multiple of a
    # quarter of the budget, so at most four lengths; elsewhere left as they are.
    from spin_kernels.machine import padded_length, row_tokens
    assert (row_tokens("cpu"), row_tokens("cuda")) == (4096, 16384)
    assert [padded_length(n, 16384, "cuda") for n in (1, 4096, 4097, 16384)] == [4096, 4096, 8192, 16384]
    assert {padded_length(n, 16384, "cuda") for n in range(1, 16385, 97)} == {4096, 8192, 12288, 16384}
    assert padded_length(300, 200, "cuda") == 384  # a small budget: multiples of 128
    assert padded_length(4097, 16384, "cpu") is None


def test_dispatch(monkeypatch):
    # impl=None: Triton under the interpreter or for CUDA tensors, the PyTorch twin otherwise
    calls = []
    spy = types.SimpleNamespace(backward=logprobs_torch.backward,
                                forward=lambda *a, **k: calls.append(1) or logprobs_torch.forward(*a, **k))
    monkeypatch.setattr(spin_kernels, "logprobs_triton", spy)
    cases = [(False, False, "cpu", 0), (False, True, "cpu", 0), (True, False, "cpu", 1)]
    cases += [(False, True, "cuda", 1)] if CUDA else []
    for interpret, cuda, device, want in cases:
        monkeypatch.setattr(spin_kernels, "TRITON_INTERPRET", interpret)
        monkeypatch.setattr(spin_kernels, "TRITON_CUDA", cuda)
        calls.clear()
        fused_logprobs(*make(4, 8, 11, torch.float32, device=device)[:3])
        assert len(calls) == want, (interpret, cuda, device)


def test_import_cpu_only():
    code = ("import sys; sys.modules['triton'] = None; import spin_kernels, torch; "  # None: import fails
            "print(spin_kernels.logprobs_triton, spin_kernels.fused_logprobs("
            "torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 4, -100])).shape)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "torch.Size([3])"]


OURS = ("import model, spin_kernels, torch; m = model.Transformer(model.Config(vocab_size=11, hidden_size=8, "
        "intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4)); "
        "print(spin_kernels.fused_logprobs(torch.randn(3, 8), m.lm_head.weight, torch.tensor([0, 4, 10])).shape)")
THEIRS = ("import transformers; print(transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=11, "
          "hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)).num_parameters())")


@pytest.mark.parametrize("order", ["transformers first", "ours first"])
def test_no_shadowing_from_repo_root(order):
    # transformers >= 5.25 imports Hugging Face's `kernels` package when it builds a model; run from the
    # repository root (pytest, python -c, a notebook) a top-level `kernels/` of ours would shadow it. One
    # process builds a transformers model and ours and runs the fused kernel, in either order.
    code = "; ".join([THEIRS, OURS] if order == "transformers first" else [OURS, THEIRS])
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([3])" in out.stdout


def test_top_level_names_are_ours_alone():
    # No top-level module of this repository may share its name with an installed package (the
    # dependencies and the dev ones): any of them could import it and get ours. Looked up from outside
    # the repository, so only site-packages answer.
    names = sorted({f.removesuffix(".py") for f in os.listdir(ROOT) if f.endswith(".py")} |
                   {d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py"))})
    code = f"import importlib.util as u; print([n for n in {names!r} if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"installed packages shadowed by ours: {out.stdout.strip()}"


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
