"""Does SPIN do what the paper claims? A run where p_data is known exactly (issues 24, 37).

The paper (arXiv 2401.01335, Theorem 5.2, Figure 3): SPIN's only fixed point is p_model = p_data, and
iterating it on the SFT data improves a model past where more SFT epochs on the same data stop helping.
Here p_data is a teacher whose log-probs are exact: a small random Transformer of this project's model,
sampled at temperature 1 (prompts of 2-4 random tokens, answers of at most 32 tokens, most ending in the
stop id; a cut answer is the 32-token prefix, for teacher and student alike, so every distribution below
is over the same set of answers). Per seed and student (a job):
  1. SFT data: N teacher pairs (x, y), one fixed set, as the paper's SFT data. The student is trained on
     them by plain SFT until its held-out NLL (teacher answers to other prompts) stops improving, at lrs
     dropped by 10 at each plateau; its best epoch is the SFT checkpoint. Two students: half the teacher's
     width (22.7k parameters), and the teacher's own shape, which can represent p_data exactly (Theorem
     5.2's assumption): its gap to p_data is then one of data and optimisation, not capacity.
  2. From that checkpoint, on the same N pairs, per SPIN setting (lr, beta, epochs) three arms with the
     same optimizer steps and lr schedule (spin.train's: warmup, then linear decay, per iteration):
     - SPIN as spin.py runs it (spin.generate_answers, spin.score, spin.train; keep_previous as the paper);
     - continued SFT at equal answer tokens: a step trains real answers until it holds as many answer
       tokens as SPIN's step did (real and generated; the last answer cut to fit): ~2x SPIN's real answers;
     - continued SFT at equal real answers: a step trains as many whole real answers as SPIN's step had
       pairs: the same real-answer passes as SPIN, ~half its tokens.
     Tokens are counted by a hook on each model, not computed. SPIN also samples N answers and scores its
     pairs once per iteration (forward only); continued SFT does neither. Continued SFT runs at SFT's
     last lr (cont_lr), where SFT had stopped helping.
  3. Measures at the end of every iteration, in nats: the forward KL(p_data || p_model) = E_x E_{y ~
     teacher}[log p_T(y|x) - log p_model(y|x)] per answer over a fixed test set of fresh teacher answers
     (never trained on nor used for any choice); the reverse KL(p_model || p_data) = E_x E_{y ~ student}[
     log p_model(y|x) - log p_T(y|x)] per answer: the student's own samples on the test prompts scored by
     the teacher (what a judge of its answers sees), drawn from one fixed random stream at every
     evaluation, so changes are paired; the NLL per token of the validation answers (held-out, the set
     SFT's early stopping watched) and of the N training answers (memorisation); and after every epoch
     SPIN's margin and accuracy as spin.train logs them (means over the epoch's steps). Changes are
     paired per test prompt (s.e. over the 1024 prompts); the tables' s.e. are over seeds (teacher, data
     and student change with the seed).
The teacher's log-probs are the sampler's own (generate's return_logprobs at temperature 1); a check per
seed scores them again through the training layout: KL(teacher || teacher) must be ~0. Every sampler key
is stream(seed, use) + index, with seed and use in their own bit fields, so the teacher's train, validation
and test answers, the student's test-prompt samples and each SPIN iteration's samples never share a
random stream (inverse-CDF sampling would make answers drawn from one stream correlated).

Settings chosen on the validation seed 0, before any reported seed (1, 2, 3) ran:
  sizes: a 2-layer width-64 teacher (vocabulary 64, per-token entropy 1.6 nats, answers of 14 tokens on
    average, 20% cut at 32), N = 1024: the half-width student's SFT KL was 18.2 nats per answer at N =
    256, 12.6 at N = 1024, 8.05 at N = 4096 (issue 24's scan). SFT: lr 3e-3, dropped to 3e-4 and 3e-5.
  SPIN where its loss bites: the criterion, an accuracy >= 0.9 and a mean margin >= 1 in the last epoch of
    every iteration, for both students; of the settings tried that met it, the one with the lowest forward
    KL after 4 iterations. Tried (accuracy and margin in the last iteration's last epoch, then the KL
    change after 4 iterations; width 64 / width 32; * = missed the criterion in some iteration):
      lr 3e-3, beta 1, 2 epochs*: acc 0.89 / 0.87, margin 27 / 11, KL +21.8 / +7.7
      lr 1e-3, beta 1, 3 epochs:  acc 0.91 / 0.91, margin 13 / 4.6, KL +13.3 / +4.5
      lr 1e-3, beta 5, 3 epochs*: acc 0.92 / 0.88, margin 53 / 16,  KL +9.2 / +2.7
      lr 3e-4, beta 5, 3 epochs*: acc 0.90 / 0.88, margin 12 / 4.1, KL +2.17 / +0.65
      lr 1e-4, beta 10, 3 epochs*: acc 0.91 / 0.89, margin 7.0 / 2.8, KL +0.42 / +0.18
      lr 1e-4, beta 20, 3 epochs*: acc 0.91 / 0.88, margin 13 / 4.6, KL +0.38 / +0.12
      lr 1e-4, beta 10, 4 epochs: acc 0.92 / 0.92, margin 9.1 / 3.5, KL +0.61 / +0.22
      lr 3e-5, beta 30, 4 epochs: acc 0.925 / 0.917, margin 8.1 / 3.1, KL +0.09 / +0.04   <- chosen
    With the paper's beta 0.1, lr 1e-3 for 6 epochs bit from iteration 1 (the half-width student, with
    the former overlapping streams: acc 0.90 / 0.93, margin 0.96 / 2.7, KL +6.2 / +20.5 after iteration 0 /
    1); at 2 epochs no lr up to 1e-3 reached an accuracy of 0.9. A large beta bites with a small move: a
    pair's loss saturates once its log-ratio gap is a few / beta nats.
  SPIN at SFT's last lr (3e-5) with the paper's beta 0.1 and 2 epochs, as the earlier version of this
    experiment ran it: its loss barely moves (margins ~0.02); and continued SFT at that lr too.

    python experiments/known_pdata.py [--seeds=1,2,3] [--processes=2] [--lr=...]   (every Settings field)
"""
import json
import math
import os
import sys
import time
from contextlib import redirect_stderr
from dataclasses import dataclass, fields
from functools import partial
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import spin  # noqa: E402
from generate import generate  # noqa: E402
from model import Config, Transformer  # noqa: E402
from spin_kernels import packed_weights, speed_up  # noqa: E402


@dataclass
class Settings:
    seeds: tuple = (1, 2, 3)        # reported seeds; each has its own teacher, data, student init, samples
    vocab: int = 64                 # V, token 0 is the stop id
    teacher_width: int = 64         # the teacher: 2 layers, width 64, 4 heads (2 key/value heads)
    teacher_layers: int = 2
    teacher_gain: float = 3.0       # LM head scale: per-token entropy ~1.6-1.8 nats (uniform: log 64 = 4.2)
    stop_gain: float = 2.0          # the stop id's row of the LM head, scaled: answers of ~10-14 tokens
    student_widths: tuple = (32, 64)  # students: the teacher's shape at half its width, and at its width
    student_layers: int = 2
    max_new_tokens: int = 32        # longest answer (teacher and student)
    num_train: int = 1024           # N, the SFT data: teacher pairs (x, y)
    answers_per_prompt: int = 1     # K: the N pairs are N / K prompts with K teacher answers each
    num_val: int = 256              # held-out teacher pairs: SFT's early stopping and the NLL column
    num_test: int = 1024            # fresh teacher pairs for the KLs, touched by nothing else
    sft_lr: float = 3e-3            # SFT: AdamW, linear warmup over sft_warmup steps, then constant until
                                    # a plateau divides it by 10
    sft_batch: int = 16             # pairs per SFT step
    sft_warmup: int = 16
    sft_patience: int = 2           # epochs without a better held-out NLL before the lr drops (/10)
    sft_drops: int = 2              # lr drops before SFT stops (3e-3, 3e-4, 3e-5)
    sft_max_epochs: int = 80
    iterations: int = 4             # SPIN iterations (each with spin.py's warmup and linear decay)
    batch_size: int = 8             # pairs per SPIN step
    lr: tuple = (3e-5, 3e-5)        # SPIN settings, zipped with beta and epochs: one SPIN arm (and its two
    beta: tuple = (30.0, 0.1)       # continued-SFT arms) each, both at SFT's last lr: where the loss bites
    epochs: tuple = (4, 2)          # (chosen on seed 0), and the paper's beta and epochs
    cont_lr: float = 3e-5           # continued SFT's peak lr: SFT's last
    processes: int = 2              # jobs (seed, student) spread over this many processes, 1 thread each
    out: str = "experiments/known_pdata.json"   # results ("" = none)
    plot: str = "docs/known_pdata.png"          # the figure ("" = none)


def parse_settings(argv):
    s, types = Settings(), {f.name: f.type for f in fields(Settings)}
    for arg in argv:
        name, _, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or name not in types or not (value or types[name] is str):
            sys.exit(f"usage: --field=value with a field of Settings ({', '.join(types)}); got {arg!r}")
        typ = types[name]
        item = type(getattr(Settings, name)[0]) if typ is tuple else None  # (1, 2, 3) or (1e-3, 3e-5)
        setattr(s, name, tuple(item(v) for v in value.split(",")) if item else typ(value))
    if not len(s.lr) == len(s.beta) == len(s.epochs):
        sys.exit("--lr, --beta and --epochs zip into SPIN settings: give them as many values")
    if s.num_train % s.answers_per_prompt:
        sys.exit("--answers_per_prompt must divide --num_train")
    return s


# ----- p_data: a random teacher with exact log-probs; the students; the random streams -----

STOP = 0
STOP_TOKENIZER = SimpleNamespace(eos_ids=[STOP])  # all spin.generate_answers needs of a tokenizer
TRAIN, VAL, TEST, STUDENT_TEST, SPIN_ITER = 0, 1, 2, 3, 16  # uses of a stream; SPIN_ITER + t for iteration t


def stream(seed, use):
    # The first key of a sampler's streams (generate's `seeds`: prompt i draws from key + i, i < 2^32):
    # seed and use in bit fields of their own, so that no two uses (nor seeds) share a key.
    assert 0 <= use < 256 and 0 <= seed < 2 ** 24
    return seed << 40 | use << 32


def random_model(s, width, layers, seed, gain=1.0, stop_gain=1.0):
    cfg = Config(vocab_size=s.vocab, hidden_size=width, intermediate_size=2 * width,
                 num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=width // 4,
                 rms_norm_eps=1e-5, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif "embed" in name:
                p.normal_(0, 1)
            else:  # (out, in): unit-variance outputs for unit-variance inputs
                p.normal_(0, p.shape[1] ** -0.5)
        # logits = gain * h . w_v with h RMS-normed: the gain sets how peaky the teacher is; a longer
        # stop row makes the stop id the likeliest token in more contexts, so answers end sooner
        model.lm_head.weight *= gain
        model.lm_head.weight[STOP] *= stop_gain
    return model


def sample_pairs(teacher, s, n, seed, use, k=1):
    # n // k prompts of 2-4 uniform non-stop tokens, k teacher answers to each at temperature 1 -> n
    # [(x, y, log p_T(y|x))]: the sampler's log-prob of each drawn token is the model's own (no filter,
    # temperature 1).
    g = torch.Generator().manual_seed(seed * 10 + use)
    prompts = [torch.randint(1, s.vocab, (int(torch.randint(2, 5, (), generator=g)),), generator=g).tolist()
               for _ in range(n // k)]
    prompts = [x for x in prompts for _ in range(k)]
    with packed_weights(teacher.eval()):  # as spin.py generates
        out = generate(teacher, prompts, s.max_new_tokens, temperature=1.0, stop_ids=(STOP,),
                       seeds=[stream(seed, use) + i for i in range(n)], return_logprobs=True)
    return [(x, y, sum(lp)) for x, (y, lp) in zip(prompts, out)]


def sharded_student(s, width, seed, weights=None):
    # A student as spin.py trains a model (spin.load_model): FSDP2 over this process's group (of one), fp32
    # throughout, then the machine's speed paths (the one-process reduce needs the sharded model)
    model = speed_up(spin.shard(random_model(s, width, s.student_layers, seed), dist.get_world_size(),
                                torch.device("cpu"), torch.float32))
    if weights is not None:
        spin.restore(model, weights)
    return model.eval()


class TokenCounter:
    # Counts the answer tokens of every forward that builds a graph (training): the compute we match.
    def __init__(self, model):
        self.total, self.mark = 0, 0
        model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        if torch.is_grad_enabled() and kwargs.get("targets") is not None:
            self.total += kwargs["targets"][1].numel()

    def take(self):  # tokens since the last take
        n, self.mark = self.total - self.mark, self.total
        return n


# ----- the measures -----

def logprobs(model, data, cfg):
    # data [(x, y, ...)] -> (n,) log p_model(y|x), through spin.score's packed layout, no gradient
    return spin.score(model, [(x, [y]) for x, y, *_ in data], cfg, "score")[:, 0]


def mean_se(v):
    return v.mean().item(), (v.std() / len(v) ** 0.5).item()


def evaluate(model, w, cfg, reverse=True):
    # -> forward and reverse KL (nats per answer, with the per-prompt terms d and r for paired changes),
    # held-out and training NLL (nats per token)
    d = torch.tensor([lp for *_, lp in w.test]) - logprobs(model, w.test, cfg)          # (n_test,)
    out = {"nll": -logprobs(model, w.val, cfg).sum().item() / sum(len(y) for _, y, _ in w.val),
           "train_nll": -logprobs(model, w.train, cfg).sum().item() / sum(len(y) for _, y, _ in w.train)}
    (out["kl"], out["kl_se"]), out["d"] = mean_se(d), d
    if reverse:  # the student's answers to the test prompts, the same uniforms at every evaluation
        ys = spin.generate_answers(model, STOP_TOKENIZER, [x for x, *_ in w.test], cfg,
                                   seed=stream(cfg.seed, STUDENT_TEST), desc=None)
        own = [(x, y) for (x, *_), y in zip(w.test, ys)]
        r = logprobs(model, own, cfg) - logprobs(w.teacher, own, cfg)                   # (n_test,)
        (out["rkl"], out["rkl_se"]), out["r"] = mean_se(r), r
        out["len"] = sum(map(len, ys)) / len(ys)
    spin.reshard(model)  # a no-grad forward leaves the root gathered
    return out


def paired(a, b):  # per-prompt terms of two models on the same prompts -> mean change, its s.e.
    return mean_se(a - b)


# ----- SFT: the mean NLL of the answer tokens, through the same packed forward as SPIN -----

def sft_step(model, opt, batch, lr, cfg):
    # batch [(x, y)]: one AdamW step at this lr, gradients clipped as spin.train clips them
    groups, n = [(x, [y]) for x, y in batch], sum(len(y) for _, y in batch)
    budget = spin.token_budget(cfg, torch.device("cpu"))
    for row in spin.micro_batches(spin.lengths_of(groups), range(len(groups)), budget):
        logp, _ = spin.group_logprobs(model, groups, row, cfg)                          # (k, 1)
        (-logp.sum() / n).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)


def sft(model, w, s, cfg, seed):
    # Epochs over the N pairs. When the held-out NLL has not improved for sft_patience epochs, back to the
    # best epoch with the lr divided by 10 (a fresh AdamW); after sft_drops such drops, the end: the model
    # is its best epoch, where more SFT on these pairs, at any of these lrs, stopped helping.
    # -> that epoch, and a row per epoch (the KL too, to see where SFT stops helping)
    pairs, rows, best = [(x, y) for x, y, _ in w.train], [], (math.inf, 0, None)
    drops, waited, step = 0, 0, 0
    spin.reshard(model)
    opt = torch.optim.AdamW(model.parameters(), weight_decay=0.0)
    for epoch in range(1, s.sft_max_epochs + 1):
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        model.train()
        for k in range(0, len(pairs), s.sft_batch):
            lr = s.sft_lr * min(1.0, (step := step + 1) / s.sft_warmup) / 10 ** drops
            sft_step(model, opt, [pairs[i] for i in order[k:k + s.sft_batch]], lr, cfg)
        model.eval()
        row = evaluate(model, w, cfg, reverse=False)
        rows.append({"epoch": epoch, "lr": lr, **{k: v for k, v in row.items() if k != "d"}})
        if row["nll"] < best[0]:
            best, waited = (row["nll"], epoch, spin.snapshot(model)), 0
        elif (waited := waited + 1) >= s.sft_patience:
            if drops == s.sft_drops:
                break
            drops, waited = drops + 1, 0
            spin.restore(model, best[2])
            opt = torch.optim.AdamW(model.parameters(), weight_decay=0.0)
    spin.restore(model, best[2])
    return best[1], rows


# ----- the arms -----

def spin_arm(model, w, s, cfg, counter):
    # spin.py's loop on the N pairs: for t = 0, 1, ...: the student answers every prompt (generate),
    # its log-probs of the real and generated answers are computed once (score), it is trained to tell
    # them apart with itself frozen as the reference (train); iteration t >= 1 trains on t-1's pairs too.
    # -> a row per epoch, and per epoch the answer tokens and pairs of each step (the other arms' budgets).
    pairs, rows, plan, previous = [(x, y) for x, y, _ in w.train], [], [], []
    for t in range(s.iterations):
        gen = spin.generate_answers(model, STOP_TOKENIZER, [x for x, _ in pairs], cfg,
                                    seed=stream(cfg.seed, SPIN_ITER + t), desc=None)
        current = [(x, [y, g]) for (x, y), g in zip(pairs, gen)]
        groups = (previous if cfg.keep_previous else []) + current
        ref = spin.score(model, groups, cfg, "score")                                    # (G, 2)
        # spin.train's steps take batch_size pairs of a shuffled order, the last step the rest
        sizes = [min(cfg.batch_size, len(groups) - k) for k in range(0, len(groups), cfg.batch_size)]
        steps, logged = [], []

        def log(row):  # after every optimizer step (log_every=1)
            logged.append(row)
            steps.append(counter.take())

        def after_epoch(epoch):
            mine = logged[-len(steps):]  # this epoch's steps
            assert len(steps) == len(sizes)
            measures = evaluate(model, w, cfg) if epoch == cfg.epochs else {}  # at the iteration's end
            rows.append({"iter": t, "epoch": epoch, **measures, "tokens": sum(steps), "steps": len(steps),
                         "answers": sum(sizes),
                         "pair_tokens": sum(len(y) + len(g) for _, (y, g) in groups),
                         "margin": sum(r["rewards/margins"] for r in mine) / len(mine),
                         "acc": sum(r["rewards/accuracies"] for r in mine) / len(mine),
                         "loss": sum(r["loss"] for r in mine) / len(mine), "first_loss": mine[0]["loss"],
                         "gen_len": sum(map(len, gen)) / len(gen),
                         "gen_cut": sum(not g or g[-1] != STOP for g in gen) / len(gen)})
            plan.append((list(steps), sizes))
            steps.clear()

        model.train()
        spin.train(model, groups, ref, cfg, t, log, after_epoch)
        model.eval()
        previous = current
    return rows, plan


def sft_arm(model, w, s, cfg, lr, plan, counter, unit):
    # Continued SFT on SPIN's plan: epoch by epoch, as many steps as SPIN's, each on real answers (an
    # endless shuffled queue of the N pairs) until it holds as many answer tokens as SPIN's step did (unit
    # "tokens", the last answer cut to fit) or as many answers as SPIN's step had pairs (unit "answers").
    # Each SPIN iteration's epochs are one round with spin.train's schedule.
    pairs, rows, queue, rounds = [(x, y) for x, y, _ in w.train], [], [], 0

    def take(n):  # the next answers of the queue: n tokens or n answers in all -> the batch
        nonlocal rounds
        batch = []
        while n > 0:
            if not queue:
                rounds += 1
                g = torch.Generator().manual_seed(cfg.seed * 1000 + 500 + rounds)
                queue.extend(pairs[i] for i in torch.randperm(len(pairs), generator=g).tolist())
            x, y = queue.pop(0)
            y = y[:n] if unit == "tokens" else y
            batch.append((x, y))
            n -= len(y) if unit == "tokens" else 1
        return batch

    for t in range(s.iterations):
        epochs = plan[t * cfg.epochs:(t + 1) * cfg.epochs]
        total = sum(len(tokens) for tokens, _ in epochs)
        warm = math.ceil(cfg.warmup_ratio * total)  # spin.train's schedule
        spin.reshard(model)
        opt, k = torch.optim.AdamW(model.parameters(), weight_decay=0.0), 0
        for e, (tokens, sizes) in enumerate(epochs, 1):
            model.train()
            answers = 0
            for n in (tokens if unit == "tokens" else sizes):
                batch = take(n)
                sft_step(model, opt, batch, lr * spin.linear_schedule(k, total, warm), cfg)
                k, answers = k + 1, answers + len(batch)
            model.eval()
            rows.append({"iter": t, "epoch": e, **(evaluate(model, w, cfg) if e == cfg.epochs else {}),
                         "tokens": counter.take(), "steps": len(tokens), "answers": answers})
    return rows


# ----- one job (a seed and a student), end to end -----

def spin_config(s, seed, lr=0.0, beta=0.1, epochs=2):
    return spin.Config(iterations=s.iterations, epochs=epochs, batch_size=s.batch_size, lr=(lr,),
                       beta=(beta,), max_new_tokens=s.max_new_tokens, max_length=64, max_prompt_length=8,
                       temperature=1.0, seed=seed, keep_previous=True, compute_dtype="float32", log_every=1,
                       gen_batch_size=64)


def run_job(s, seed, width, say=print):
    t0, cfg = time.time(), spin_config(s, seed)
    teacher = random_model(s, s.teacher_width, s.teacher_layers, seed, s.teacher_gain, s.stop_gain)
    teacher = speed_up(teacher).eval()  # the machine's speed paths, as every model here
    train, val, test = (sample_pairs(teacher, s, n, seed, use, k) for use, n, k in (
        (TRAIN, s.num_train, s.answers_per_prompt), (VAL, s.num_val, 1), (TEST, s.num_test, 1)))
    w = SimpleNamespace(teacher=teacher, train=train, val=val, test=test)
    # the teacher's own KL must be ~0: its sampler's log-probs against the training layout's
    err = (torch.tensor([lp for *_, lp in test]) - logprobs(teacher, test, cfg)).abs().max().item()
    n_tok, h = sum(len(y) for _, y, _ in test), -sum(lp for *_, lp in test)
    info = {"seed": seed, "width": width, "teacher_entropy_per_token": h / n_tok,
            "teacher_entropy_per_answer": h / len(test), "answer_len": n_tok / len(test),
            "teacher_self_logprob_err": err, "answer_cut": sum(y[-1] != STOP for _, y, _ in test) / len(test)}

    student = sharded_student(s, width, seed + 1000)
    info["student_params"] = sum(p.numel() for p in student.parameters())
    start = evaluate(student, w, cfg, reverse=False)
    best, sft_rows = sft(student, w, s, cfg, seed)
    weights, base = spin.snapshot(student), evaluate(student, w, cfg)
    say(f"seed {seed}, width {width}: SFT from KL {start['kl']:.2f}: {len(sft_rows)} epochs, kept {best}: "
        f"KL {base['kl']:.3f} +- {base['kl_se']:.3f}, reverse KL {base['rkl']:.3f}, held-out NLL "
        f"{base['nll']:.4f}, training NLL {base['train_nll']:.4f} ({time.time() - t0:.0f} s)")
    info.update(sft_epochs=len(sft_rows), sft_best_epoch=best, sft=sft_rows, sft_start_kl=start["kl"],
                arms=[])

    for lr, beta, epochs in zip(s.lr, s.beta, s.epochs):  # from the same checkpoint: SPIN, then SFT x2
        cfg = spin_config(s, seed, lr, beta, epochs)
        model = sharded_student(s, width, seed + 1000, weights)
        arm = {"lr": lr, "beta": beta, "epochs": epochs}
        arm["spin"], plan = spin_arm(model, w, s, cfg, TokenCounter(model))
        for unit in ("tokens", "answers"):
            model = sharded_student(s, width, seed + 1000, weights)
            arm[f"sft_{unit}"] = sft_arm(model, w, s, cfg, s.cont_lr, plan, TokenCounter(model), unit)
        # changes since the checkpoint and SPIN minus each SFT arm, paired on the test prompts
        for a, b, c in zip(arm["spin"], arm["sft_tokens"], arm["sft_answers"]):
            if "d" not in a:  # evaluated at the end of each iteration
                continue
            for k in ("d", "r"):
                for row in (a, b, c):
                    row[f"{k}_change"], row[f"{k}_change_se"] = paired(row[k], base[k])
                for unit, row in (("tokens", b), ("answers", c)):
                    a[f"{k}_minus_{unit}"], a[f"{k}_minus_{unit}_se"] = paired(a[k], row[k])
            for row in (a, b, c):
                del row["d"], row["r"]
                for k in ("nll", "train_nll"):
                    row[f"{k}_change"] = row[k] - base[k]
        last = arm["spin"][-1]
        say(f"seed {seed}, width {width}, SPIN lr {lr:g} beta {beta:g} x{epochs}: KL change "
            f"{last['d_change']:+.3f}, SPIN - SFT (tokens) {last['d_minus_tokens']:+.3f}, (answers) "
            f"{last['d_minus_answers']:+.3f}; margin {last['margin']:.2f}, acc {last['acc']:.3f} "
            f"({time.time() - t0:.0f} s)")
        info["arms"].append(arm)
    del base["d"], base["r"]
    info.update(base=base, seconds=time.time() - t0)
    return info


# ----- tables, JSON, figure -----

ARMS = (("spin", "SPIN"), ("sft_tokens", "SFT, equal tokens"), ("sft_answers", "SFT, equal real answers"))
MEASURES = ("d_change", "r_change", "nll_change", "train_nll_change", "kl", "rkl", "nll", "train_nll", "len",
            "tokens", "answers")
KEYS = {"spin": MEASURES + ("d_minus_tokens", "d_minus_answers", "r_minus_tokens", "r_minus_answers",
                            "margin", "acc"), "sft_tokens": MEASURES, "sft_answers": MEASURES}


def over_seeds(values):  # -> [mean, s.e. over seeds] (the seed-to-seed spread: teacher and data included)
    v = torch.tensor(values, dtype=torch.float64)
    return [v.mean().item(), (v.std() / len(v) ** 0.5).item() if len(v) > 1 else math.nan]


def summary(results, s):
    # per student and SPIN setting, after every epoch (the KLs and NLLs after each iteration's last): each
    # arm's measures, mean and s.e. over seeds; and the SFT checkpoints'
    out = {"checkpoint": [], "arms": []}
    for width in s.student_widths:
        rs = [r for r in results if r["width"] == width]
        out["checkpoint"].append({"width": width, "params": rs[0]["student_params"], **{
            k: over_seeds([r["base"][k] for r in rs]) for k in ("kl", "rkl", "nll", "train_nll", "len")},
            "sft_epochs": over_seeds([r["sft_epochs"] for r in rs])})
        for k, (lr, beta, epochs) in enumerate(zip(s.lr, s.beta, s.epochs)):
            for i, row in enumerate(rs[0]["arms"][k]["spin"]):  # the measures: at iterations' ends only
                out["arms"].append({"width": width, "lr": lr, "beta": beta, "epochs": epochs,
                                    "iter": row["iter"], "epoch": row["epoch"], **{
                    f"{arm}/{key}": over_seeds([r["arms"][k][arm][i][key] for r in rs])
                    for arm, keys in KEYS.items() for key in keys if key in row}})
    return out


def tables(summ, s, say=print):
    f = "{:+.3f} ± {:.3f}".format
    say("\nThe SFT checkpoints, mean ± s.e. over seeds: KL nats per answer, NLL nats per token")
    say("| student | params | SFT epochs | forward KL | reverse KL | held-out NLL | training NLL |")
    say("|---|---|---|---|---|---|---|")
    for c in summ["checkpoint"]:
        say(f"| width {c['width']} | {c['params']} | {c['sft_epochs'][0]:.1f} | "
            f"{c['kl'][0]:.2f} ± {c['kl'][1]:.2f}"
            f" | {c['rkl'][0]:.2f} ± {c['rkl'][1]:.2f} | {c['nll'][0]:.4f} ± {c['nll'][1]:.4f} | "
            f"{c['train_nll'][0]:.4f} ± {c['train_nll'][1]:.4f} |")
    say("\nChanges since the checkpoint after each iteration (its last epoch), mean ± s.e. over seeds; "
        "SPIN - SFT paired per test prompt, then over seeds. KL in nats per answer, NLL per token.")
    for d in ("d", "r"):
        say(f"\n{'forward KL(p_data || p_model)' if d == 'd' else 'reverse KL(p_model || p_data)'}")
        say("| student | SPIN lr, beta, epochs | iter | SPIN | SFT tokens | SFT answers | SPIN - SFT tokens "
            "| SPIN - SFT answers | margin | acc |")
        say("|---|---|---|---|---|---|---|---|---|---|")
        for a in summ["arms"]:
            if a["epoch"] == a["epochs"]:
                say(f"| {a['width']} | {a['lr']:g}, {a['beta']:g}, {a['epochs']} | {a['iter']} | "
                    f"{f(*a[f'spin/{d}_change'])} | {f(*a[f'sft_tokens/{d}_change'])} | "
                    f"{f(*a[f'sft_answers/{d}_change'])} | {f(*a[f'spin/{d}_minus_tokens'])} | "
                    f"{f(*a[f'spin/{d}_minus_answers'])} | {a['spin/margin'][0]:.2f} | "
                    f"{a['spin/acc'][0]:.3f} |")
    say(f"\nAfter {s.iterations} iterations: changes since the checkpoint (KL per answer, NLL per token), "
        "SPIN minus the arm (paired per test prompt), mean ± s.e. over seeds")
    say("| student | SPIN lr, beta, epochs | arm | real answers | forward KL | reverse KL | held-out NLL | "
        "training NLL | SPIN - arm, forward KL | SPIN - arm, reverse KL | margin, acc |")
    say("|---|---|---|---|---|---|---|---|---|---|---|")
    g = "{:+.4f} ± {:.4f}".format
    for a in summ["arms"]:
        if a["iter"] == s.iterations - 1 and a["epoch"] == a["epochs"]:
            for arm, name in ARMS:
                unit = arm.removeprefix("sft_")
                versus = ((f(*a[f"spin/d_minus_{unit}"]), f(*a[f"spin/r_minus_{unit}"]), "") if arm != "spin"
                          else ("", "", f"{a['spin/margin'][0]:.2f}, {a['spin/acc'][0]:.3f}"))
                passes = sum(b[f"{arm}/answers"][0] for b in summ["arms"] if (b["width"], b["lr"], b["beta"],
                             b["epochs"]) == (a["width"], a["lr"], a["beta"], a["epochs"]))
                say(f"| {a['width']} | {a['lr']:g}, {a['beta']:g}, {a['epochs']} | {name} | {passes:.0f} | "
                    f"{f(*a[f'{arm}/d_change'])} | {f(*a[f'{arm}/r_change'])} | "
                    f"{g(*a[f'{arm}/nll_change'])} | {g(*a[f'{arm}/train_nll_change'])} | "
                    f"{' | '.join(versus)} |")


def plot(summ, s, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = (("d_change", "forward KL(p_data || p_model)", "nats per answer"),
            ("r_change", "reverse KL(p_model || p_data)", "nats per answer"),
            ("nll_change", "held-out NLL", "nats per token"),
            ("train_nll_change", "training NLL", "nats per token"))
    fig, ax = plt.subplots(len(s.student_widths), len(cols), squeeze=False,
                           figsize=(5 * len(cols), 4.4 * len(s.student_widths)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", ":", "--", "-.")
    for i, (width, c) in enumerate(zip(s.student_widths, summ["checkpoint"])):
        for k, (lr, beta, epochs) in enumerate(zip(s.lr, s.beta, s.epochs)):
            rows = [a for a in summ["arms"] if a["width"] == width and a["lr"] == lr and a["beta"] == beta
                    and a["epochs"] == epochs]
            for j, (key, name, unit) in enumerate(cols):
                have = [a for a in rows if f"spin/{key}" in a]
                x = [0] + [a["iter"] + a["epoch"] / epochs for a in have]
                for n, (arm, label) in enumerate(ARMS):
                    m = torch.tensor([0.0] + [a[f"{arm}/{key}"][0] for a in have])
                    e = torch.tensor([0.0] + [a[f"{arm}/{key}"][1] for a in have]).nan_to_num()
                    ax[i, j].plot(x, m, styles[k % len(styles)], color=colors[n], marker="o", ms=2,
                                  label=f"{label}; SPIN's lr {lr:g}, beta {beta:g}, {epochs} epochs")
                    ax[i, j].fill_between(x, m - e, m + e, color=colors[n], alpha=0.15)
                ax[i, j].axhline(0, color="gray", lw=0.8)
                ax[i, j].set_title(f"{name}\nstudent width {width} ({c['params']:,} parameters)", fontsize=10)
                ax[i, j].set(xlabel="SPIN iterations done", xticks=range(s.iterations + 1),
                             ylabel=f"change since the SFT checkpoint, {unit}")
    ax[0, 0].legend(fontsize=7)
    k = s.answers_per_prompt
    data = f"{s.num_train // k} prompts x {k} answers" if k > 1 else "one answer per prompt"
    fig.suptitle(f"Known p_data (a random teacher): N = {s.num_train} SFT pairs ({data}), SPIN vs continued "
                 f"SFT (lr {s.cont_lr:g}) from the SFT checkpoint; mean ± s.e. over seeds "
                 f"{', '.join(map(str, s.seeds))}")
    fig.tight_layout()
    tmp = path + ".tmp"
    fig.savefig(tmp, dpi=90, format="png")
    os.replace(tmp, path)


# ----- processes: jobs (seed, student) in a pool, one thread each, so the split changes no number -----

def setup():
    torch.set_num_threads(1)
    if not dist.is_initialized():
        spin.setup_distributed()   # a group of one (gloo, HashStore), as `python spin.py` runs


def job(s, seed, width):
    setup()
    with open(os.devnull, "w") as null, redirect_stderr(null):  # no progress bars: the tables are the output
        return run_job(s, seed, width, say=partial(print, flush=True))


def main(argv):
    s, t0 = parse_settings(argv), time.time()
    print(f"settings: {s}", flush=True)
    # the wider students first: the longest jobs start first and the pool ends evenly
    jobs = sorted(((seed, width) for seed in s.seeds for width in s.student_widths), key=lambda j: -j[1])
    if s.processes > 1:
        with mp.get_context("spawn").Pool(s.processes) as pool:
            results = pool.starmap(partial(job, s), jobs, chunksize=1)
    else:
        results = [job(s, *j) for j in jobs]
    results.sort(key=lambda r: (r["width"], r["seed"]))
    summ = summary(results, s)
    tables(summ, s)
    minutes = (time.time() - t0) / 60
    print(f"\n{len(jobs)} jobs in {minutes:.1f} min, {s.processes} process(es) of 1 thread")
    if s.out:
        path = os.path.join(ROOT, s.out)
        with open(path + ".tmp", "w") as f:
            json.dump({"settings": {f.name: getattr(s, f.name) for f in fields(s)}, "minutes": minutes,
                       "processes": s.processes, "threads": 1, "summary": summ, "jobs": results}, f, indent=1)
        os.replace(path + ".tmp", path)
    if s.plot:
        plot(summ, s, os.path.join(ROOT, s.plot))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
