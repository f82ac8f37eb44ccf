# The GPU issues' workload, shared by bench_train.py and bench_generate.py: a random checkpoint of a named
# Llama shape with SmolLM2's tokenizer, and the ShareGPT first turns bench/gpu_prepare.py put in .gpu/.
# Throughput does not depend on the weights' values; a random model almost never draws its stop id, so its
# answers run to the cap. Shapes:
#   1b    Llama-3.2-1B: hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, untied head, SmolLM2's
#         vocabulary (49152) so the carried tokenizer fits it
#   7b    Llama-2-7B: hidden 4096, 32 layers, 32 heads, 32 KV heads, MLP 11008, its own vocabulary (32000);
#         the SmolLM2-tokenized pairs are mapped into it (ids mod 32000: same lengths, other ids)
#   tiny  2 layers, width 64, 4 heads, 2 KV heads, SmolLM2's vocabulary: the CPU smoke runs
#   python bench/workload.py make --shape 1b --out DIR [--tokenizer .gpu/tokenizer]   (a checkpoint, bf16)
import argparse
import json
import os
import shutil
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GPU = os.path.join(ROOT, ".gpu")
TOKENIZER, CHAT = os.path.join(GPU, "tokenizer"), os.path.join(GPU, "chat.jsonl")
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, rope_theta=500000.0, vocab_size=49152),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, rope_theta=10000.0, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152),
}


def llama_config(shape):
    from transformers import LlamaConfig
    return LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2, **SHAPES[shape])


def make_checkpoint(path, shape, tokenizer=TOKENIZER, device=None):
    # transformers' own LlamaForCausalLM with its initialisation (normal, std 0.02), saved in bf16, and the
    # tokenizer files beside it. Kept when a checkpoint of the same shape is already there.
    cfg = llama_config(shape)
    done = os.path.join(path, "config.json")
    if os.path.isfile(done):
        with open(done) as f:
            old = json.load(f)
        if all(old.get(k) == v for k, v in SHAPES[shape].items()):
            return path
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    for f in os.listdir(tokenizer):
        shutil.copy(os.path.join(tokenizer, f), path)
    return path


def random_model(shape, device, dtype=torch.float32):
    # Our Transformer of the shape built in place on the device, weights as transformers initialises them:
    # for the 7B fit check, where writing and reading a 13 GB checkpoint would cost more than the check.
    from model import Config, Transformer
    cfg = Config.from_dict(llama_config(shape).to_dict())
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02)
    return model


def chat_rows(n, file=CHAT):
    # -> the first n (prompt messages, real answer text) of the prepared first turns
    with open(file, encoding="utf-8") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(n))]
    if len(rows) < n:
        raise ValueError(f"{file}: {len(rows)} rows, fewer than the {n} asked for")
    return [(r["messages"][:-1], r["messages"][-1]["content"]) for r in rows]


def with_random_answers(tok, rows, seed=0):
    # (prompt, real, "generated"): the generated answer is 64-256 random vocabulary tokens, decoded to text
    # (ids 100-48999: no special token of SmolLM2's), as the issues' figures were measured.
    g = torch.Generator().manual_seed(seed)
    out = []
    for prompt, real in rows:
        k = int(torch.randint(64, 257, (), generator=g))
        out.append((prompt, real, tok.decode(torch.randint(100, 49000, (k,), generator=g).tolist())))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["make"])
    ap.add_argument("--shape", choices=list(SHAPES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", default=TOKENIZER)
    a = ap.parse_args()
    make_checkpoint(a.out, a.shape, a.tokenizer)
    print(f"{a.shape}: {a.out}")


if __name__ == "__main__":
    main()
