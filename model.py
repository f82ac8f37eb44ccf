"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) that loads and saves Hugging Face checkpoints.

Module and tensor names are Hugging Face's own (`model.layers.0.self_attn.q_proj.weight`, ...) and RoPE
uses HF's rotate-half layout, so a checkpoint loads with a strict `load_state_dict`: no renaming table,
no q/k permutation. The model holds no generation state: a KVCache is passed into forward.
"""
import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from spin_kernels import fused_logprobs
from spin_kernels.machine import has_bf16_units

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}


@dataclass
class Config:
    model_type: str = "llama"          # "llama", "mistral", "qwen2" or "qwen3": the families done here
    vocab_size: int = 32000            # V, rows of the embedding and the LM head
    hidden_size: int = 4096            # D, width of the residual stream
    intermediate_size: int = 11008     # hidden width of the SwiGLU MLP
    num_hidden_layers: int = 32        # L, number of transformer blocks
    num_attention_heads: int = 32      # query heads
    num_key_value_heads: int = 32      # key/value heads; fewer than query heads = grouped-query attention
    head_dim: int = 128                # width of one head (usually D / heads, but Mistral-Nemo differs)
    rms_norm_eps: float = 1e-6         # epsilon inside RMSNorm
    rope_theta: float = 10000.0        # RoPE base wavelength
    rope_scaling: dict | None = None   # None, or {"rope_type": "linear" | "llama3", "factor": ..., ...}
    max_position_embeddings: int = 4096  # context length the checkpoint was trained for (kept for saving)
    tie_word_embeddings: bool = False  # LM head reuses the embedding matrix (no lm_head.weight stored)
    sliding_window: int | None = None  # Mistral: a query sees only the last `sliding_window` positions
    qkv_bias: bool = False             # biases on q/k/v projections (Qwen2; Llama's attention_bias)
    o_bias: bool = False               # bias on o_proj (Llama's attention_bias only)
    mlp_bias: bool = False             # biases on the MLP projections (Llama's mlp_bias)
    qk_norm: bool = False              # RMSNorm over each head of q and k before RoPE (Qwen3)
    raw: dict = field(default_factory=dict, repr=False)  # config.json as read, written back on save

    @classmethod
    def from_dict(cls, d, source="config.json"):
        def refuse(why):
            raise ValueError(f"{source}: {why}")
        mt = d.get("model_type")
        if mt not in ARCHITECTURES:
            refuse(f"model_type {mt!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in d:
                refuse(f"missing key {key!r}")
        # Keys that change the maths in ways this file does not implement are refused, never ignored.
        if d.get("hidden_act", "silu") != "silu":
            refuse(f"hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
        if d.get("quantization_config"):
            refuse("quantized checkpoints (quantization_config) are not supported")
        if mt in ("qwen2", "qwen3") and d.get("use_sliding_window"):
            refuse(f"{mt} use_sliding_window=true (per-layer windows) is not supported")
        if mt == "qwen3" and not d.get("head_dim"):  # transformers would take 128, not hidden / heads
            refuse("missing key 'head_dim' (Qwen3 checkpoints state it)")
        if d.get("attention_dropout", 0.0):  # training would differ from transformers'
            refuse("attention_dropout > 0 is not supported")
        kinds = set(d.get("layer_types") or ["full_attention"])
        if kinds != {"full_attention"} and not (mt == "mistral" and kinds == {"sliding_attention"}):
            refuse(f"layer_types {sorted(kinds)} are not supported (only full attention in every layer)")
        # transformers 5 writes rope_parameters; older checkpoints have rope_theta / rope_scaling.
        rp = d.get("rope_parameters") or {}
        theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("default", "linear", "llama3"):
                refuse(f"rope scaling type {kind!r} is not supported (default, linear, llama3)")
            scaling = None if kind == "default" else {**scaling, "rope_type": kind}
        if rp.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
            refuse("partial_rotary_factor != 1 is not supported")
        heads = d["num_attention_heads"]
        bias = bool(d.get("attention_bias", False))
        return cls(
            model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=d.get("sliding_window") if mt == "mistral" else None,
            qkv_bias=bias or mt == "qwen2", o_bias=bias and mt in ("llama", "qwen3"), qk_norm=mt == "qwen3",
            mlp_bias=bool(d.get("mlp_bias", False)) and mt == "llama", raw=dict(d))

    def to_dict(self):
        d = dict(self.raw)
        d.pop("rope_parameters", None)  # rewritten below in the old, widely readable form
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name not in
                  ("raw", "qkv_bias", "o_bias", "mlp_bias", "sliding_window", "qk_norm")})
        d.update(architectures=[ARCHITECTURES[self.model_type]], hidden_act="silu")
        if self.model_type in ("llama", "qwen3"):
            d["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        return d


def compute_dtype(device, choice="auto"):
    # The precision policy, the one place it is decided: forwards compute in bf16 where the device has bf16
    # units (spin_kernels.machine), else in fp32. Master weights, gradient reduction, the optimizer
    # and saved checkpoints stay fp32 whatever this says.
    if choice == "auto":
        return torch.bfloat16 if has_bf16_units(device) else torch.float32
    return getattr(torch, choice)


def rope_frequencies(cfg):
    # (head_dim/2,) fp32 inverse frequencies, with the checkpoint's context-extension rule applied.
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    s = cfg.rope_scaling or {}
    if s.get("rope_type") == "linear":
        inv_freq = inv_freq / s["factor"]
    elif s.get("rope_type") == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the middle band blended.
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        middle = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv_freq = torch.where(middle, blended, scaled)
    return inv_freq


def apply_rope(x, cos, sin):
    # x (B, H, T, hd); cos, sin (B, 1, T, hd). HF's rotate-half pairs dimension i with i + hd/2.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def visibility(pos, doc, branch, window=None):
    # The attention rule of packed rows as a FlexAttention mask_mod (b, h, q, k index tensors -> bool);
    # called on broadcast index grids it also builds dense masks. pos, doc, branch (B, T): see forward.
    def visible(b, h, q, k):
        ok = (k <= q) & (doc[b, k] == doc[b, q]) & ((branch[b, k] == 0) | (branch[b, k] == branch[b, q]))
        ok = ok & ((doc[b, q] >= 0) | (k == q))  # padding (doc < 0) sees itself only: no empty softmax row
        if window:  # Mistral: the window counts positions within the sequence, not slots of the row
            ok = ok & (pos[b, q] - pos[b, k] < window)
        return ok
    return visible


def plain_attention(tokens, layout, window, rule, cache, pos):
    # How a forward's tokens attend, the reference way: -> attend(q, k, v), q (B, nh, T, hd), k, v
    # (B, nkv, S, hd) -> (B, nh, T, hd): SDPA with a dense bool mask, the cache's when decoding, the rule's
    # over every (query, key) pair for packed rows (rule: visibility of the layout), none (causal) for
    # plain ones. spin_kernels.speed_up(model) puts a faster plan with the same maths in its place.
    if cache is not None:
        mask = cache.mask(pos, window)                                          # (B, 1, T, S)
    elif rule is not None:
        (B, T), dev = tokens.shape, tokens.device
        i = torch.arange(T, device=dev)
        mask = rule(torch.arange(B, device=dev)[:, None, None, None], None, i[:, None], i[None, :])
    else:
        mask = None
    return lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=k.shape[1] != q.shape[1])


class RMSNorm(nn.Module):
    # y = w * (x / rms(x)): the normalisation in fp32, rounded to x's dtype before the weight, as transformers
    # computes it (bf16 outputs match). spin_kernels.speed_up(model): the same with its own backward.
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class KVCache:
    """Keys and values of every layer for a pool of B rows, owned by the sampler. Row b holds pos[b]
    tokens; a forward writes its T new tokens at positions pos[b] .. pos[b]+T-1 of each row, so prompts of
    different lengths share a batch. Attention reads the first `length` slots, one contiguous block a layer:
    the sampler resizes the cache to what its longest row needs, so a decode step neither scans unused
    slots nor copies them out of a longer allocation. The caller advances pos, never the model."""

    def __init__(self, cfg, batch, max_len, dtype=torch.float32, device=None):
        # one tensor (B, Hkv, max_len, hd) per layer: a resize holds one layer twice, not the whole cache
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) tokens held per row
        self.length = max_len                                           # slots attention reads
        self.rows = torch.arange(batch, device=device)[:, None]        # (B, 1) row indices, for update

    def resize(self, slots):
        # In place: every row gets `slots` slots, its first min(slots, old) kept, the rest zero (keys no
        # query sees: zero, not garbage, since a masked-out score times a NaN value is still a NaN).
        for kv in (self.k, self.v):
            for i, old in enumerate(kv):
                if old.shape[2] != slots:
                    kv[i] = F.pad(old[:, :, :slots], (0, 0, 0, max(0, slots - old.shape[2])))
        self.length = slots

    def update(self, layer, k, v, pos):
        # k, v (B, Hkv, T, hd) written at per-row positions pos (B, T) -> every row's keys and values in
        # slots 0..length-1, (B, Hkv, length, hd), views of the cache
        K, V = self.k[layer], self.v[layer]                                          # (B, Hkv, slots, hd)
        K[self.rows, :, pos] = k.transpose(1, 2)  # advanced indices first: (B, T, Hkv, hd)
        V[self.rows, :, pos] = v.transpose(1, 2)
        return K[:, :, :self.length], V[:, :, :self.length]

    def mask(self, pos, window=None):
        # (n, 1, T, length) bool, True = may attend, for queries at positions pos (n, T): keys are
        # slots 0..length-1, slot j holds position j of its row.
        kpos = torch.arange(self.length, device=pos.device)
        allowed = kpos <= pos[..., None]                                       # (n, T, length)
        if window:
            allowed &= kpos > pos[..., None] - window
        return allowed[:, None]


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx, self.nh, self.nkv, self.hd = layer_idx, cfg.num_attention_heads, \
            cfg.num_key_value_heads, cfg.head_dim
        D = cfg.hidden_size
        self.q_proj = nn.Linear(D, self.nh * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, D, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # Qwen3: weights (hd,), one scale per head dimension shared by all heads
            self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps), RMSNorm(self.hd, cfg.rms_norm_eps)

    def project(self, x):  # x (B, T, D) -> q (B, T, nh*hd), k, v; spin_kernels.packed_weights fuses them
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, attend, cache, pos):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.nh, self.hd).transpose(1, 2)                # (B, nh, T, hd)
        k = k.view(B, T, self.nkv, self.hd).transpose(1, 2)               # (B, nkv, T, hd)
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
        if self.qk_norm:  # Qwen3: each head of q and k RMS-normalised over its hd dims, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, pos)                # (B, nkv, S, hd)
        y = attend(q, k, v)  # plain_attention's plan, or a faster one                     # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, H, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj, self.up_proj = nn.Linear(D, H, bias=b), nn.Linear(D, H, bias=b)
        self.down_proj = nn.Linear(H, D, bias=b)

    def gate_up(self, x):  # x (B, T, D) -> two (B, T, H); spin_kernels.packed_weights fuses them
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x):
        gate, up = self.gate_up(x)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attend, cache, pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend, cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):  # HF's "model." prefix: embeddings, blocks, final norm
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        if not cfg.tie_word_embeddings:  # tied checkpoints store no lm_head.weight, so we make none
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.grad_checkpointing = False  # recompute each block's activations in backward (saves memory)
        self.attention = plain_attention  # how a forward attends (spin_kernels.speed_up: a faster plan)
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)

    @property
    def lm_weight(self):  # (V, D)
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def logits(self, h):  # (..., D) -> (..., V); spin_kernels.packed_weights runs it packed in generation
        return F.linear(h, self.lm_weight)

    def forward(self, tokens, *, layout=None, cache=None, targets=None, hidden=False):
        # tokens (B, T). How tokens see each other, one of:
        #   nothing: one sequence per row, positions 0..T-1, causal;
        #   layout (pos, doc, branch), each (B, T) long, built by data.pack: rows that pack several
        #     sequences. Token i sees token j iff j <= i, doc[j] == doc[i] and branch[j] is 0 or
        #     branch[i]: a prompt (branch 0) shared by its answers (branches 1, 2, ...), which never see
        #     each other. pos is the RoPE position: every answer continues from its prompt's end;
        #   cache: a KVCache to decode with (it knows each row's positions).
        # Returns logits (B, T, V); with targets = (index (n,), ids (n,)), the fp32 log-prob of ids[k]
        # after flattened position index[k] of the (B * T) rows, through the fused kernel, never the full
        # logits; with hidden=True, the final normed hidden states (B, T, D).
        B, T = tokens.shape
        if cache is not None:
            pos = cache.pos[:, None] + torch.arange(T, device=tokens.device)   # (B, T)
        elif layout is not None:
            pos = layout[0]
        else:
            pos = torch.arange(T, device=tokens.device).expand(B, T)
        freqs = pos[..., None].float() * self.inv_freq.float()                # (B, T, hd/2) fp32
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                      # (B, 1, T, hd)
        x = self.model.embed_tokens(tokens)                                   # (B, T, D)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        w = self.config.sliding_window
        if layout is None and cache is None and w and T > w:  # rows longer than the window: one document
            layout = (pos, torch.zeros_like(tokens), torch.zeros_like(tokens))
        rule = None if layout is None or cache is not None else visibility(*layout, w)
        attend = self.attention(tokens, layout, w, rule, cache, pos)
        for layer in self.model.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, attend, cache, pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attend, cache, pos)
        h = self.model.norm(x)
        if hidden:
            return h
        if targets is not None:  # only positions with a target go through the LM head
            index, ids = targets
            return fused_logprobs(h.flatten(0, 1)[index], self.lm_weight, ids)  # (n,)
        return self.logits(h)

    # ----- checkpoint I/O -----

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        path = resolve_model(path)
        if path.endswith(".gguf"):
            from from_gguf import load_gguf_model
            raw, state = load_gguf_model(path)
            cfg = Config.from_dict(raw, source=str(path))
        else:
            cfg = Config.from_dict(read_json(os.path.join(path, "config.json")),
                                   source=os.path.join(path, "config.json"))
            state = read_safetensors(path)
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # some tied checkpoints store a copy anyway
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match config.json: missing {missing[:3]}"
                             f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}")
        for k, shape in expected.items():
            if state[k].shape != shape:
                raise ValueError(f"{path}: {k} has shape {tuple(state[k].shape)}, config says {tuple(shape)}")
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        model.inv_freq = rope_frequencies(cfg)  # buffers were built on meta
        return model.to(device) if device is not None else model

    def save_pretrained(self, path, max_shard_bytes=4 << 30):
        with atomic_dir(path) as tmp:
            write_checkpoint(tmp, self.config, self.state_dict(), max_shard_bytes)


# A hub id: "org/name" or "org/name@revision" (a branch, tag or commit).
HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*(@[\w./-]+)?")
# What a model id fetches: the files this code reads, never pickles or code. Weights are HF's own
# model*.safetensors names (Mistral repos also hold consolidated.safetensors, the same weights again).
MODEL_FILES = ["config.json", "model*.safetensors", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
               "chat_template.jinja"]


def resolve_model(path):
    # --model -> a local path: a checkpoint folder or a .gguf file as given, or a hub id's snapshot folder.
    path = str(path)
    if os.path.isdir(path) or (path.endswith(".gguf") and os.path.isfile(path)):
        return path
    if os.path.exists(path) or not HUB_ID.fullmatch(path):
        found = "" if os.path.exists(path) else "not found: "
        raise FileNotFoundError(f"{path}: {found}neither a checkpoint folder, a .gguf file nor a hub id "
                                f"(org/name or org/name@revision)")
    return hub_snapshot(path, "model", MODEL_FILES)


def hub_snapshot(spec, repo_type, patterns):
    # "org/name[@revision]" -> its snapshot folder in the hub's cache, holding the repo's files that match
    # `patterns` (fetched if missing). huggingface_hub reads its own environment: HF_HOME / HF_HUB_CACHE,
    # HF_HUB_OFFLINE=1 (use the cache only), HF_TOKEN or `hf auth login` for private and gated repos.
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise ImportError(f"{spec}: hub ids need huggingface_hub: pip install huggingface_hub") from None
    repo, _, revision = spec.partition("@")
    try:
        return snapshot_download(repo, repo_type=repo_type, revision=revision or None,
                                 allow_patterns=patterns)
    except Exception as e:  # one line saying why, whatever the hub library raised
        kinds, first = {c.__name__ for c in type(e).__mro__}, (str(e).strip().splitlines() or [""])[0]
        if "RevisionNotFoundError" in kinds:
            why = f"the hub has no revision {revision!r} of this {repo_type}"
        elif "RepositoryNotFoundError" in kinds:  # also gated and private repos without a token
            why = f"no such {repo_type} on the hub, or it needs a token (HF_TOKEN or `hf auth login`)"
        elif "LocalEntryNotFoundError" in kinds:
            why = f"not in the hub cache ({constants.HF_HUB_CACHE}) and " + ("HF_HUB_OFFLINE is set"
                  if constants.HF_HUB_OFFLINE else f"the hub cannot be reached ({first})")
        else:
            why = f"{type(e).__name__}: {first}"
        raise ValueError(f"{spec}: no such local path, and as a hub id: {why}") from None


def read_json(file):
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: not found (expected a Hugging Face checkpoint directory "
                                f"with config.json, or a .gguf file)")
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None


def read_safetensors(path):
    from safetensors import safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted(set(read_json(index)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:  # pickle (.bin / .pt) checkpoints are never loaded: unpickling runs arbitrary code
        raise FileNotFoundError(f"{path}: no *.safetensors weights found (pickle checkpoints are not loaded)")
    state = {}
    for name in files:
        file = os.path.join(path, name)
        try:
            with safe_open(file, framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})
        except Exception as e:  # truncated or corrupt: one line naming the file
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{file}: cannot read safetensors file ({msg})") from None
    return state


def write_checkpoint(path, cfg, state, max_shard_bytes=4 << 30):
    # config.json + model.safetensors, or numbered shards + an index above max_shard_bytes, as HF does.
    from safetensors.torch import save_file
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items() if k != "inv_freq"}
    shards, size = [{}], 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards, size = shards + [{}], 0
        shards[-1][k], size = v, size + nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    d = cfg.to_dict()
    d["torch_dtype"] = d["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f, indent=2)


@contextmanager
def atomic_dir(path):
    # Yields a temporary directory to fill; only when the block completes does it replace `path`,
    # so a crash mid-write never leaves a half-written checkpoint under the real name.
    path = str(path).rstrip("/")
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    yield tmp
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
