# model.py against transformers' own implementation, on tiny random checkpoints of each family.
import json
import os
import shutil

import pytest
import torch
import transformers

from conftest import KINDS, build_checkpoint
from model import Config, KVCache, Transformer
from spin_kernels import speed_up


def tokens(B=2, T=20, V=307, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf, x, **kw):
    with torch.no_grad():
        return hf(x, **kw).logits.float()


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_match_transformers(checkpoints, kind):
    path, hf = checkpoints[kind]
    ours = Transformer.from_pretrained(path)
    x = tokens(T=20)  # 20 > Mistral's sliding window of 8, so the window is exercised
    with torch.no_grad():
        diff = (ours(x).float() - hf_logits(hf, x)).abs().max().item()
    assert diff <= 1e-4, f"{kind}: max |logits diff| = {diff:.2e}"


def test_sliding_window_is_applied(checkpoints):
    # Same weights read as plain Llama (no window) must differ past the window: the test can fail.
    path, hf = checkpoints["mistral"]
    ours = Transformer.from_pretrained(path)
    x = tokens(T=20)
    ours.config.sliding_window = None
    with torch.no_grad():
        assert (ours(x) - hf_logits(hf, x)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_bf16_close_to_transformers(checkpoints, kind):
    path, hf = checkpoints[kind]
    ours = Transformer.from_pretrained(path, dtype=torch.bfloat16)
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    x = tokens(T=16)
    with torch.no_grad():
        a, b = ours(x).float(), hf_logits(hf16, x)
    # Same op order in the same dtype; allow a few bf16 ulps of the logit scale for kernel differences.
    assert ours.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert (a - b).abs().max().item() <= 0.02 * b.abs().max().item()


def padded(mask):
    # a padded batch as a packed layout: one document per row, padding (mask False) is doc -1
    m = mask.long()
    return (m.cumsum(-1) - 1).clamp(min=0), m - 1, torch.zeros_like(m)


@pytest.mark.parametrize("kind", ["mistral", "qwen3"])
def test_padding_left_and_right(checkpoints, kind):
    # A padded row must give the same logits as the row alone, padded on either side.
    path, _ = checkpoints[kind]
    ours = Transformer.from_pretrained(path)
    x, n, pad = tokens(B=1, T=14), 14, 5
    with torch.no_grad():
        alone = ours(x)[0]
        right = torch.cat([x, torch.zeros(1, pad, dtype=torch.long)], 1)
        left = torch.cat([torch.zeros(1, pad, dtype=torch.long), x], 1)
        out_r = ours(right, layout=padded(torch.arange(n + pad)[None] < n))[0, :n]
        out_l = ours(left, layout=padded(torch.arange(n + pad)[None] >= pad))
    assert (out_r - alone).abs().max() < 1e-4 and (out_l[0, pad:] - alone).abs().max() < 1e-4
    assert torch.isfinite(out_l).all()


def test_hidden_and_target_logprobs(checkpoints):
    path, hf = checkpoints["llama3_tied"]
    ours = Transformer.from_pretrained(path)
    x = tokens(T=12)
    with torch.no_grad():
        h = ours(x, hidden=True)
        ref = hf(x, output_hidden_states=True).hidden_states[-1]  # HF's last entry is after the norm
        y = x[:, 1:]
        logp = ours(x[:, :-1], targets=(torch.arange(y.numel()), y.flatten())).view(y.shape)
        full = torch.log_softmax(ours(x[:, :-1]).float(), -1).gather(-1, x[:, 1:, None])[..., 0]
    assert (h - ref).abs().max() < 1e-4
    assert logp.shape == (2, 11) and (logp - full).abs().max() < 1e-4


@pytest.mark.parametrize("attention", ["plain", "fast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["mistral", "qwen3"])
def test_kv_cache_matches_uncached(checkpoints, kind, dtype, attention):
    # Prefill 7 tokens then decode the rest one at a time (plain: SDPA with the cache's mask; fast: the
    # decode step's two matmuls): the same logits as one uncached pass; in bf16 within a few bf16 ulps of
    # the logit scale (scores rounded to bf16 there). The cache shrinks to the 7 tokens it holds, then
    # grows a slot a step: resizing keeps what it holds.
    path, _ = checkpoints[kind]
    ours = Transformer.from_pretrained(path, dtype=dtype)
    if attention == "fast":
        speed_up(ours)
    x = tokens(T=16)
    cache = KVCache(ours.config, batch=2, max_len=24, dtype=dtype)
    with torch.no_grad():
        full = ours(x)
        steps = [ours(x[:, :7], cache=cache)]
        cache.pos += 7
        cache.resize(7)
        for t in range(7, 16):
            cache.resize(t + 1)
            assert cache.k[0].shape[2] == cache.length == t + 1 and cache.k[0][:, :, t].eq(0).all()
            steps.append(ours(x[:, t:t + 1], cache=cache))
            cache.pos += 1
    err = (torch.cat(steps, 1).float() - full.float()).abs().max()
    assert err < (1e-4 if dtype == torch.float32 else 0.02 * full.float().abs().max()), err


@pytest.mark.parametrize("norm", ["plain", "fast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 17, 64), (2, 3, 5, 64)])  # a residual stream; Qwen3's per-head q/k
def test_rmsnorm_matches_transformers_forward_and_backward(dtype, shape, norm):
    # model.RMSNorm, plain (autograd over its ops) or with spin_kernels' own backward (use_fast_norm),
    # against transformers' LlamaRMSNorm under autograd: fp32 to rounding; bf16 outputs equal but for rare
    # one-ulp flips (the fast mean of squares sums in another order), gradients within bf16 rounding of the
    # gradients' scale.
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from model import RMSNorm
    from spin_kernels import use_fast_norm
    ours = RMSNorm(64, 1e-6) if norm == "plain" else use_fast_norm(RMSNorm(64, 1e-6))
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = (torch.rand(64, generator=g) + 0.5).to(dtype)
    gy = torch.randn(shape, generator=g).to(dtype)
    outs = []
    for layer in (ours, LlamaRMSNorm(64, eps=1e-6)):
        layer.weight.data = w.clone()
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(gy)
        outs.append((y.detach().float(), xi.grad.float(), layer.weight.grad.float()))
        assert y.dtype == xi.grad.dtype == layer.weight.grad.dtype == dtype
        with torch.no_grad():  # the fast one without gradients skips its autograd Function: the same numbers
            assert torch.equal(layer(x), y.detach())
    (y, dx, dw), (y_hf, dx_hf, dw_hf) = outs
    if dtype == torch.float32:
        assert (y - y_hf).abs().max() <= 1e-6 * y_hf.abs().max()
        assert (dx - dx_hf).abs().max() <= 1e-5 * dx_hf.abs().max()
        assert (dw - dw_hf).abs().max() <= 1e-5 * dw_hf.abs().max()
    else:
        assert (y != y_hf).float().mean() < 0.01 and ((y - y_hf).abs() <= y_hf.abs() / 128).all()
        assert (dx - dx_hf).abs().max() <= 1e-2 * dx_hf.abs().max()
        assert (dw - dw_hf).abs().max() <= 1e-2 * dw_hf.abs().max()


def test_grad_checkpointing_same_gradients(checkpoints):
    path, _ = checkpoints["qwen2"]
    x = tokens(T=10)
    grads = []
    for ckpt in (False, True):
        m = Transformer.from_pretrained(path)
        m.grad_checkpointing = ckpt
        m(x).float().logsumexp(-1).sum().backward()
        grads.append(m.model.layers[0].self_attn.q_proj.weight.grad)
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "llama3_tied", "qwen2", "qwen3"])
def test_save_pretrained_loads_in_transformers(checkpoints, tmp_path, kind):
    path, hf = checkpoints[kind]
    ours = Transformer.from_pretrained(path)
    for out, shard in ((tmp_path / "one", 4 << 30), (tmp_path / "sharded", 40_000)):
        ours.save_pretrained(out, max_shard_bytes=shard)
        again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        x = tokens(T=10)
        assert (hf_logits(again, x) - hf_logits(hf, x)).abs().max() < 1e-5
        with torch.no_grad():
            assert (Transformer.from_pretrained(out)(x) - hf_logits(hf, x)).abs().max() < 1e-4
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    assert not os.path.exists(tmp_path / "one.tmp")


def test_loads_hf_sharded_checkpoint(tmp_path):
    hf = build_checkpoint(tmp_path, "llama")
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    x = tokens(T=8)
    with torch.no_grad():
        assert (Transformer.from_pretrained(tmp_path)(x) - hf_logits(hf, x)).abs().max() < 1e-4


# ----- bad input: one line naming the file and the problem -----

def edit_config(path, **changes):
    file = os.path.join(path, "config.json")
    d = json.load(open(file))
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    json.dump(d, open(file, "w"))
    return file


def one_line_error(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        Transformer.from_pretrained(tmp_path / "nope")
    one_line_error(e, "nope: not found", "neither a checkpoint folder, a .gguf file nor a hub id")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError) as e:  # a folder, but not a checkpoint
        Transformer.from_pretrained(tmp_path / "empty")
    one_line_error(e, "empty/config.json: not found")


def test_truncated_safetensors(tmp_path):
    build_checkpoint(tmp_path, "llama")
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as e:
        Transformer.from_pretrained(tmp_path)
    one_line_error(e, "model.safetensors", "cannot read")


def test_no_safetensors_no_pickle(tmp_path):
    build_checkpoint(tmp_path, "llama")
    os.remove(tmp_path / "model.safetensors")
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError) as e:
        Transformer.from_pretrained(tmp_path)
    one_line_error(e, "no *.safetensors")


@pytest.mark.parametrize("change,needle", [
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(hidden_size=None), "missing key 'hidden_size'"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), "'yarn'"),
    (dict(intermediate_size=100), "shape"),
])
def test_bad_config(tmp_path, change, needle):
    build_checkpoint(tmp_path, "llama")
    edit_config(tmp_path, **change)
    with pytest.raises(ValueError) as e:
        Transformer.from_pretrained(tmp_path)
    one_line_error(e, str(tmp_path), needle)


def test_bad_json(tmp_path):
    build_checkpoint(tmp_path, "llama")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError) as e:
        Transformer.from_pretrained(tmp_path)
    one_line_error(e, "config.json", "invalid JSON")


def test_old_style_rope_keys():
    # Pre-transformers-5 checkpoints keep rope_theta / rope_scaling at the top level.
    d = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
             num_attention_heads=2, rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0})
    cfg = Config.from_dict(d)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling["rope_type"] == "linear" and cfg.head_dim == 4


# ----- Qwen3: what it adds (q/k norms, explicit head_dim, optional biases) and what it refuses -----

def test_qwen3_attention_bias_and_norm_weights(tmp_path):
    hf = build_checkpoint(tmp_path, "qwen3", attention_bias=True)
    ours = Transformer.from_pretrained(tmp_path)
    attn = ours.model.layers[1].self_attn
    assert attn.q_norm.weight.shape == (24,) and attn.o_proj.bias is not None  # HF's names and shapes
    x = tokens(T=12)
    with torch.no_grad():
        assert (ours(x) - hf_logits(hf, x)).abs().max() < 1e-4


@pytest.mark.parametrize("change,needle", [
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    (dict(head_dim=None), "missing key 'head_dim'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}), "'yarn'"),
    (dict(attention_dropout=0.1), "attention_dropout"),
])
def test_qwen3_refuses_what_it_would_mis_handle(checkpoints, tmp_path, change, needle):
    path = tmp_path / "q3"
    shutil.copytree(checkpoints["qwen3"][0], path)
    edit_config(path, **change)
    with pytest.raises(ValueError) as e:
        Transformer.from_pretrained(path)
    one_line_error(e, "q3/config.json", needle)
