"""Read a GGUF file of a Llama-architecture model as a Hugging Face checkpoint.

load_gguf_model -> (config.json-style dict, state_dict with HF names, dequantized)
load_gguf_tokenizer -> (tokenizers.Tokenizer, tokenizer_config dict, generation_config dict)

Self-contained (gguf + numpy + torch + tokenizers) so model.py and data.py can both call it.
Anything wrong inside the file is a one-line ValueError that starts with the file's path.
"""
from functools import partial

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFValueType
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# The types tested against gguf's own quantizer; others (K-quants, IQ*) are refused, not guessed.
SUPPORTED = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1}

# llama.cpp tensor names -> HF names; "{i}" is the layer.
NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}
NAMES.update({f"blk.{{i}}.{gguf}.weight": f"model.layers.{{i}}.{hf}.weight" for gguf, hf in (
    ("attn_norm", "input_layernorm"), ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"))})

# Pre-tokenizer regexes exactly as llama.cpp's llm_tokenizer_bpe applies them: each one splits
# every piece left by the one before, keeping matches and gaps alike ("isolated").
GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", GPT2_RE, r"\p{N}+", "[0-9][0-9][0-9]"],
    "gpt-2": [GPT2_RE], "gpt2": [GPT2_RE],
    "smollm": [r"\p{N}", GPT2_RE], "starcoder": [r"\p{N}", GPT2_RE],
    "llama3": [LLAMA3_RE], "llama-v3": [LLAMA3_RE], "llama-bpe": [LLAMA3_RE],
}
LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe"}  # llama.cpp: whole-word vocab hits skip merges; add BOS


def _read(path):
    try:
        return GGUFReader(path)
    except OSError:
        raise
    except Exception as e:  # the reader fails in many ways on a short or garbled file; say which file
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})".replace("\n", " "))


def _meta(reader, path, key, default=KeyError):
    if (field := reader.fields.get(key)) is None:
        if default is KeyError:
            raise ValueError(f"{path}: missing GGUF metadata key {key!r}")
        return default
    # A float32 value: take the shortest decimal that round-trips, so 1e-5 stays 1e-5, not 9.9999997e-06.
    if field.types == [GGUFValueType.FLOAT32]:
        return float(str(np.float32(field.contents())))
    return field.contents()


def _unpermute(w, n_head):
    # convert_hf_to_gguf interleaves each head's rows (x0, x_half, x1, ...) for llama.cpp's
    # adjacent-pair RoPE; put them back in HF's rotate-half order (first half, second half).
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf_model(path, dtype=torch.float32):
    r, path = _read(path), str(path)
    meta = partial(_meta, r, path)
    if (arch := meta("general.architecture")) != "llama":
        raise ValueError(f"{path}: architecture {arch!r} is not supported, only 'llama'")
    n_layer, width = meta("llama.block_count"), meta("llama.embedding_length")
    n_head = meta("llama.attention.head_count")
    n_kv = meta("llama.attention.head_count_kv", n_head)
    head_dim = meta("llama.attention.key_length", width // n_head)
    theta = meta("llama.rope.freq_base", 10000.0)  # llama.cpp's default when absent
    if meta("llama.rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{path}: partial rotary embeddings are not supported")
    if meta("llama.rope.scaling.type", "none") != "none":
        raise ValueError(f"{path}: rope scaling {meta('llama.rope.scaling.type')!r} is not supported")
    tensors = {t.name: t for t in r.tensors}
    if "rope_freqs.weight" in tensors:  # Llama 3.1's rope scaling, which llama.cpp keeps as divisors only
        raise ValueError(f"{path}: rope_freqs.weight (Llama 3.1-style rope scaling) is not supported: "
                         f"load the Hugging Face checkpoint instead")

    hf_names = {k.format(i=i): v.format(i=i) for k, v in NAMES.items() for i in range(n_layer)}
    state_dict = {}
    for name, t in tensors.items():
        if name not in hf_names:
            raise ValueError(f"{path}: unexpected tensor {name!r} for a llama model")
        if t.tensor_type not in SUPPORTED:
            raise ValueError(f"{path}: tensor {name!r} has type {t.tensor_type.name}, not one of "
                             f"{sorted(q.name for q in SUPPORTED)}")
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest first: (in, out)
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if name.endswith("attn_q.weight") or name.endswith("attn_k.weight"):
            w = _unpermute(w, n_head if name.endswith("q.weight") else n_kv)
        state_dict[hf_names[name]] = torch.from_numpy(w).to(dtype)
    if missing := {v for k, v in hf_names.items() if k != "output.weight"} - state_dict.keys():
        raise ValueError(f"{path}: missing tensors, e.g. {sorted(missing)[0]!r}")

    return {  # config.json
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": state_dict["model.embed_tokens.weight"].shape[0],
        "hidden_size": width, "intermediate_size": meta("llama.feed_forward_length"),
        "num_hidden_layers": n_layer, "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "head_dim": head_dim, "rms_norm_eps": meta("llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": theta, "rope_scaling": None,
        "max_position_embeddings": meta("llama.context_length"),
        "tie_word_embeddings": "lm_head.weight" not in state_dict,
        "bos_token_id": meta("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": meta("tokenizer.ggml.eos_token_id", None),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    }, state_dict


def load_gguf_tokenizer(path):
    r, path = _read(path), str(path)
    meta = partial(_meta, r, path)
    if (kind := meta("tokenizer.ggml.model")) != "gpt2":
        raise ValueError(f"{path}: tokenizer model {kind!r} is not supported, only 'gpt2' (byte-level BPE)")
    if (pre := meta("tokenizer.ggml.pre", "default")) not in PRE_TOKENIZERS:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported, only {sorted(PRE_TOKENIZERS)}")
    tokens = meta("tokenizer.ggml.tokens")
    types = meta("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ")) for m in meta("tokenizer.ggml.merges")]

    # GGUF keeps tokens in the byte-level alphabet (Ġ for space), as tokenizer.json does.
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in LLAMA3_PRE))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in PRE_TOKENIZERS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # Token types: 3 = control (<|im_start|>) -> special; 4 = user-defined -> plain added token.
    # Either way it is matched whole in raw text before pre-tokenization, as llama.cpp does.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == 4])

    ids = {k: meta(f"tokenizer.ggml.{k}_token_id", None) for k in ("bos", "eos", "unknown", "padding")}
    name = {k: tokens[i] if i is not None else None for k, i in ids.items()}
    add_bos = meta("tokenizer.ggml.add_bos_token", pre in LLAMA3_PRE)
    add_eos = meta("tokenizer.ggml.add_eos_token", False)
    if (add_bos and name["bos"] is None) or (add_eos and name["eos"] is None):
        raise ValueError(f"{path}: add_bos/eos_token is set but the bos/eos token id is missing")
    if add_bos or add_eos:
        single = " ".join([name["bos"]] * add_bos + ["$A"] + [name["eos"]] * add_eos)
        used = [(name[k], ids[k]) for k, on in (("bos", add_bos), ("eos", add_eos)) if on]
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=used)

    tokenizer_config = {
        "chat_template": meta("tokenizer.chat_template", None),
        "bos_token": name["bos"], "eos_token": name["eos"],
        "pad_token": name["padding"], "unk_token": name["unknown"],
        "add_bos_token": add_bos, "add_eos_token": add_eos,
    }
    return tok, tokenizer_config, {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"]}
