"""Does SPIN do what the paper claims? A run where p_data is known exactly (issue 24).

The paper (arXiv 2401.01335, Theorem 5.2, Figure 3): SPIN's only fixed point is p_model = p_data, and
iterating it on the SFT data improves a model past where more SFT epochs on the same data stop helping.
Here p_data is a teacher whose log-probabilities are exact: a small random Transformer of this project's
model, sampled at temperature 1 (prompts of 2-4 random tokens, answers of at most 32 tokens, most ending
in the stop id; a cut answer is the 32-token prefix, for teacher and student alike, so every distribution
below is over the same set of answers). Per seed:
  1. SFT data: N teacher pairs (x, y), one fixed set, as the paper's SFT data. A smaller student is
     trained on them by plain SFT until its held-out NLL (teacher answers to other prompts) stops
     improving; its best epoch is the SFT checkpoint.
  2. Two arms from that checkpoint on the same N pairs, with equal compute: SPIN as spin.py runs it
     (spin.generate_answers, spin.score, spin.train; the paper's data mixing, keep_previous) and
     continued SFT. Equal compute means: the same optimizer steps and, step for step, the same number of
     answer tokens through a forward and backward (a SPIN step's real and generated answers; an SFT step
     takes real answers until it has as many, the last one cut to fit), counted by a hook on the model,
     not computed. What is not equal: SPIN also samples N answers and scores its pairs once per iteration
     (forward only); continued SFT does neither.
  3. The measure after every epoch: KL(p_data || p_model) = E_x E_{y ~ teacher} [log p_T(y|x) - log
     p_model(y|x)], in nats per answer, the Monte Carlo mean over a fixed test set of fresh teacher
     samples (never trained on nor used for any choice) with its standard error; the held-out NLL per
     token of the validation answers (the set SFT's early stopping watched); SPIN's margin and accuracy
     as spin.train logs them (means over the epoch's steps).
The log-probs of the teacher are the sampler's own (generate's return_logprobs at temperature 1); a
check per seed scores them again through the training layout: KL(teacher || teacher) must be ~0.

Settings chosen on the validation seed 0, before any reported seed (1, 2, 3) ran:
  sizes: a 2-layer width-64 teacher (vocabulary 64, per-token entropy 1.6 nats, answers of 14 tokens on
    average, 20% cut at 32), a 2-layer width-32 student, N = 1024: SFT's KL is 18.2 nats per answer at
    N = 256, 12.6 at N = 1024, 8.05 at N = 4096: a gap that more real data closes, the one SPIN claims to
    close without it. SFT: lr 3e-3, dropped to 3e-4 and 3e-5 at plateaus. (With a constant lr and early
    stopping only, --sft_drops=0 --sft_patience=3, the checkpoint is not done: both arms then gain, at lr
    3e-5 SPIN -0.235 and continued SFT -0.251 nats per answer, at 1e-4 -0.19 and -0.23 at best.)
  SPIN beta 0.1; lrs 1e-5 (the lowest KL of the grid) and 1e-4 (10x: where the arms move); continued SFT at
    the same lrs (1e-5 its best too). Tried, 5 iterations, KL change at its best epoch: SPIN beta 0.1 / 1
    at lr 1e-4: +0.01 / +0.00 (then rising to +0.27 / +0.26), at 3e-5: -0.00 / -0.00, at 1e-5: -0.01 /
    -0.00; continued SFT at 1e-4: +0.01, 3e-5: -0.00, 1e-5: -0.00. Earlier: lr 1e-3 and 3e-4 only raised
    the KL, and beta 3 at 3e-5 matched beta 1. 4 iterations, to fit 15 minutes.

    python experiments/known_pdata.py [--seeds=1,2,3] [--beta=...] [--lr=...]   (every Settings field)
"""
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from types import SimpleNamespace

import torch
import torch.distributed as dist

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
    student_width: int = 32         # the student: the same shape at half the width
    student_layers: int = 2
    max_new_tokens: int = 32        # longest answer (teacher and student)
    num_train: int = 1024           # N, the SFT data (prompts with one teacher answer each)
    num_val: int = 256              # held-out teacher pairs: SFT's early stopping and the NLL column
    num_test: int = 1024            # fresh teacher pairs for KL, touched by nothing else
    sft_lr: float = 3e-3            # SFT: AdamW, linear warmup over sft_warmup steps, then constant until
                                    # a plateau divides it by 10
    sft_batch: int = 16             # pairs per SFT step
    sft_warmup: int = 16
    sft_patience: int = 2           # epochs without a better held-out NLL before the lr drops (/10)
    sft_drops: int = 2              # lr drops before SFT stops (3e-3, 3e-4, 3e-5)
    sft_max_epochs: int = 80
    iterations: int = 4             # SPIN iterations (each with spin.py's warmup and linear decay)
    epochs: int = 2                 # epochs per SPIN iteration (the paper's text: 2)
    batch_size: int = 8             # pairs per SPIN step
    beta: float = 0.1               # SPIN's beta
    lr: tuple = (1e-5, 1e-4)        # SPIN's peak lr: one pair of arms per value, with cont_lr's value
    cont_lr: tuple = (1e-5, 1e-4)   # continued SFT's peak lr (the same schedule as a SPIN iteration)
    out: str = "experiments/known_pdata.json"   # results ("" = none)
    plot: str = "docs/known_pdata.png"          # the figure ("" = none)


def parse_settings(argv):
    s, types = Settings(), {f.name: f.type for f in fields(Settings)}
    for arg in argv:
        name, _, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or name not in types or not (value or types[name] is str):
            sys.exit(f"usage: --field=value with a field of Settings ({', '.join(types)}); got {arg!r}")
        typ = types[name]
        item = type(getattr(Settings, name)[0]) if typ is tuple else None  # (1, 2, 3) or (1e-5, 1e-4)
        setattr(s, name, tuple(item(v) for v in value.split(",")) if item else typ(value))
    return s


# ----- p_data: a random teacher with exact log-probs; the student -----

STOP = 0


def random_model(s, width, layers, seed, gain=1.0, stop_gain=1.0):
    cfg = Config(vocab_size=s.vocab, hidden_size=width, intermediate_size=2 * width,
                 num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=width // 4,
                 rms_norm_eps=1e-5, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = speed_up(Transformer(cfg))
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


def sample_pairs(teacher, s, n, seed):
    # n prompts of 2-4 uniform non-stop tokens and the teacher's answers at temperature 1 -> [(x, y, log
    # p_T(y|x))]: the sampler's log-prob of each drawn token is the model's own (no filter, temperature 1).
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, s.vocab, (int(torch.randint(2, 5, (), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    with packed_weights(teacher.eval()):  # as spin.py generates
        out = generate(teacher, prompts, s.max_new_tokens, temperature=1.0, stop_ids=(STOP,),
                       seeds=[seed * 100_003 + i for i in range(n)], return_logprobs=True)
    return [(x, y, sum(lp)) for x, (y, lp) in zip(prompts, out)]


def sharded_student(s, seed, weights=None):
    # The student as spin.py trains a model: FSDP2 over this process's group (of one), fp32 throughout.
    model = spin.shard(random_model(s, s.student_width, s.student_layers, seed), dist.get_world_size(),
                       torch.device("cpu"), torch.float32)
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


def evaluate(model, val, test, cfg):
    d = torch.tensor([lp for *_, lp in test]) - logprobs(model, test, cfg)            # (n_test,)
    nll = -logprobs(model, val, cfg).sum().item() / sum(len(y) for _, y, _ in val)
    spin.reshard(model)  # a no-grad forward leaves the root gathered
    return {"kl": d.mean().item(), "kl_se": (d.std() / len(d) ** 0.5).item(), "nll": nll, "d": d}


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


def sft(model, train, val, test, s, cfg, seed):
    # Epochs over the N pairs. When the held-out NLL has not improved for sft_patience epochs, back to the
    # best epoch with the lr divided by 10 (a fresh AdamW); after sft_drops such drops, the end: the model
    # is its best epoch, where more SFT on these pairs, at any of these lrs, stopped helping.
    # -> that epoch, and a row per epoch (the KL too, to see where SFT stops helping)
    pairs, rows, best = [(x, y) for x, y, _ in train], [], (math.inf, 0, None)
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
        row = evaluate(model, val, test, cfg)
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


# ----- the two arms -----

def spin_arm(model, train, val, test, s, cfg, counter):
    # spin.py's loop on the N pairs: for t = 0, 1, ...: the student answers every prompt (generate),
    # its log-probs of the real and generated answers are computed once (score), it is trained to tell
    # them apart with itself frozen as the reference (train); iteration t >= 1 trains on t-1's pairs too.
    # -> a row per epoch, and the answer tokens of each of its steps (the other arm's budget).
    pairs, rows, plan, previous = [(x, y) for x, y, _ in train], [], [], []
    stop = SimpleNamespace(eos_ids=[STOP])  # all generate_answers needs of a tokenizer
    for t in range(s.iterations):
        gen = spin.generate_answers(model, stop, [x for x, _ in pairs], cfg, seed=cfg.seed * 100_003 +
                                    1_000_000 * (t + 1), desc=None)
        current = [(x, [y, g]) for (x, y), g in zip(pairs, gen)]
        groups = (previous if cfg.keep_previous else []) + current
        ref = spin.score(model, groups, cfg, "score")                                    # (G, 2)
        steps, logged = [], []

        def log(row):  # after every optimizer step (log_every=1)
            logged.append(row)
            steps.append(counter.take())

        def after_epoch(epoch):
            mine = logged[-len(steps):]  # this epoch's steps
            rows.append({"iter": t, "epoch": epoch, **evaluate(model, val, test, cfg), "tokens": sum(steps),
                         "steps": len(steps), "pair_tokens": sum(len(y) + len(g) for _, (y, g) in groups),
                         "margin": sum(r["rewards/margins"] for r in mine) / len(mine),
                         "acc": sum(r["rewards/accuracies"] for r in mine) / len(mine),
                         "loss": sum(r["loss"] for r in mine) / len(mine), "first_loss": mine[0]["loss"],
                         "gen_len": sum(map(len, gen)) / len(gen),
                         "gen_cut": sum(not g or g[-1] != STOP for g in gen) / len(gen)})
            plan.append(list(steps))
            steps.clear()

        model.train()
        spin.train(model, groups, ref, cfg, t, log, after_epoch)
        model.eval()
        previous = current
    return rows, plan


def sft_arm(model, train, val, test, s, cfg, lr, plan, counter):
    # Continued SFT with SPIN's budget: epoch by epoch, as many steps as SPIN's, each on real answers
    # (an endless shuffled stream of the N pairs) until it holds as many answer tokens as SPIN's step did,
    # the last answer cut to fit. Each SPIN iteration's epochs are one round with spin.train's schedule.
    pairs, rows, stream, passes = [(x, y) for x, y, _ in train], [], [], 0

    def take(n):  # the next answers of the stream, n tokens in all
        nonlocal passes
        batch = []
        while n > 0:
            if not stream:
                passes += 1
                g = torch.Generator().manual_seed(cfg.seed * 1000 + 500 + passes)
                stream.extend(pairs[i] for i in torch.randperm(len(pairs), generator=g).tolist())
            x, y = stream.pop(0)
            batch.append((x, y[:n]))
            n -= len(y[:n])
        return batch

    for t in range(s.iterations):
        epochs = plan[t * s.epochs:(t + 1) * s.epochs]
        total = sum(map(len, epochs))
        warm = math.ceil(cfg.warmup_ratio * total)  # spin.train's schedule
        spin.reshard(model)
        opt, k = torch.optim.AdamW(model.parameters(), weight_decay=0.0), 0
        for e, budget in enumerate(epochs, 1):
            model.train()
            for n in budget:
                sft_step(model, opt, take(n), lr * spin.linear_schedule(k, total, warm), cfg)
                k += 1
            model.eval()
            rows.append({"iter": t, "epoch": e, **evaluate(model, val, test, cfg), "tokens": counter.take(),
                         "steps": len(budget)})
    return rows


# ----- one seed, end to end -----

def spin_config(s, seed, lr):
    return spin.Config(iterations=s.iterations, epochs=s.epochs, batch_size=s.batch_size, lr=(lr,),
                       beta=(s.beta,), max_new_tokens=s.max_new_tokens, max_length=64, max_prompt_length=8,
                       temperature=1.0, seed=seed, keep_previous=True, compute_dtype="float32", log_every=1,
                       gen_batch_size=64)


def paired(d, d0):  # per-answer KL terms now and before, on the same test answers -> change, its s.e.
    return (d - d0).mean().item(), ((d - d0).std() / len(d) ** 0.5).item()


def run_seed(s, seed, say=print):
    t0, cfg = time.time(), spin_config(s, seed, s.lr[0])
    teacher = random_model(s, s.teacher_width, s.teacher_layers, seed, s.teacher_gain, s.stop_gain).eval()
    train, val, test = (sample_pairs(teacher, s, n, seed * 10 + k) for k, n in
                        enumerate((s.num_train, s.num_val, s.num_test)))
    # the teacher's own KL must be ~0: its sampler's log-probs against the training layout's
    err = (torch.tensor([lp for *_, lp in test]) - logprobs(teacher, test, cfg)).abs().max().item()
    n_tok, h = sum(len(y) for _, y, _ in test), -sum(lp for *_, lp in test)
    info = {"seed": seed, "teacher_entropy_per_token": h / n_tok,
            "teacher_entropy_per_answer": h / len(test), "answer_len": n_tok / len(test),
            "teacher_self_logprob_err": err, "beta": s.beta,
            "answer_cut": sum(y[-1] != STOP for _, y, _ in test) / len(test)}
    say(f"seed {seed}: teacher entropy {h / n_tok:.3f} nats/token, {h / len(test):.2f} nats/answer; answers "
        f"{n_tok / len(test):.1f} tokens, {info['answer_cut']:.0%} cut at {s.max_new_tokens}; "
        f"|sampler - scored log p_T| <= {err:.1e}")

    student = sharded_student(s, seed + 1000)
    start = evaluate(student, val, test, cfg)
    best, sft_rows = sft(student, train, val, test, s, cfg, seed)
    weights, base = spin.snapshot(student), evaluate(student, val, test, cfg)
    say(f"seed {seed}: SFT from KL {start['kl']:.2f}: {len(sft_rows)} epochs, kept epoch {best}: KL "
        f"{base['kl']:.3f} +- {base['kl_se']:.3f}, held-out NLL {base['nll']:.4f} "
        f"({time.time() - t0:.0f} s)")
    info.update(sft_epochs=len(sft_rows), sft_best_epoch=best, sft=sft_rows, sft_start_kl=start["kl"],
                arms=[])

    for lr, cont_lr in zip(s.lr, s.cont_lr):  # from the same checkpoint: SPIN, then SFT with its budget
        cfg = spin_config(s, seed, lr)
        model = sharded_student(s, seed + 1000, weights)
        spin_rows, plan = spin_arm(model, train, val, test, s, cfg, TokenCounter(model))
        model = sharded_student(s, seed + 1000, weights)
        sft_rows_arm = sft_arm(model, train, val, test, s, cfg, cont_lr, plan, TokenCounter(model))
        for a, b in zip(spin_rows, sft_rows_arm):  # changes since the checkpoint, paired on the test answers
            a["dkl"], a["dkl_se"] = paired(a["d"], base["d"])
            b["dkl"], b["dkl_se"] = paired(b["d"], base["d"])
            a["minus_sft"], a["minus_sft_se"] = paired(a.pop("d"), b.pop("d"))
        info["arms"].append({"lr": lr, "cont_lr": cont_lr, "spin": spin_rows, "cont_sft": sft_rows_arm})
    base.pop("d")
    info.update(base=base, seconds=time.time() - t0)
    return info


# ----- tables, JSON, figure -----

def table(r, say=print):
    b = r["base"]
    say(f"\nseed {r['seed']}: the SFT checkpoint (epoch {r['sft_best_epoch']} of {r['sft_epochs']}): KL "
        f"{b['kl']:.3f} +- {b['kl_se']:.3f} nats per answer, held-out NLL {b['nll']:.4f} nats per token.\n"
        f"Changes since it (paired on the same test answers): KL of SPIN, of continued SFT, their "
        f"difference")
    for arm in r["arms"]:
        say(f"\nSPIN lr {arm['lr']:g} (beta {r['beta']}), continued SFT lr {arm['cont_lr']:g}; tokens: "
            f"the answer tokens each arm trained in the epoch")
        say("| iter | epoch | tokens | SPIN dKL | SFT dKL | SPIN - SFT | SPIN NLL | SFT NLL | margin "
            "| acc |")
        say("|---|---|---|---|---|---|---|---|---|---|")
        for a, c in zip(arm["spin"], arm["cont_sft"]):
            say(f"| {a['iter']} | {a['epoch']} | {a['tokens']} | {a['dkl']:+.3f} +- {a['dkl_se']:.3f} | "
                f"{c['dkl']:+.3f} +- {c['dkl_se']:.3f} | {a['minus_sft']:+.3f} +- {a['minus_sft_se']:.3f} | "
                f"{a['nll']:.4f} | {c['nll']:.4f} | {a['margin']:+.3f} | {a['acc']:.3f} |")


def summary(results, say=print):
    # per setting and matched epoch: the mean over seeds of each arm's KL change and of their difference,
    # with the standard error over seeds (the seed-to-seed spread, teacher and data included)
    out = []
    for k, arm in enumerate(results[0]["arms"]):
        say(f"\nall seeds, SPIN lr {arm['lr']:g}, continued SFT lr {arm['cont_lr']:g}: KL - KL(SFT "
            f"checkpoint), nats per answer, mean +- s.e. over {len(results)} seeds")
        say("| iter | epoch | SPIN | continued SFT | SPIN - SFT |")
        say("|---|---|---|---|---|")
        for i, row in enumerate(arm["spin"]):
            d = torch.tensor([[r["arms"][k]["spin"][i]["dkl"], r["arms"][k]["cont_sft"][i]["dkl"],
                               r["arms"][k]["spin"][i]["minus_sft"]] for r in results], dtype=torch.float64)
            m = d.mean(0)
            se = d.std(0) / len(d) ** 0.5 if len(d) > 1 else torch.full((3,), math.nan)
            out.append({"lr": arm["lr"], "cont_lr": arm["cont_lr"], "iter": row["iter"],
                        "epoch": row["epoch"], **{f"{name}{suffix}": v[j].item() for suffix, v in
                                                  (("", m), ("_se", se))
                                                  for j, name in enumerate(("spin", "sft", "diff"))}})
            say(f"| {row['iter']} | {row['epoch']} | {m[0]:+.3f} +- {se[0]:.3f} | {m[1]:+.3f} +- "
                f"{se[1]:.3f} | {m[2]:+.3f} +- {se[2]:.3f} |")
    return out


def plot(results, s, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    n = len(results[0]["arms"])
    fig, ax = plt.subplots(2, 1 + n, figsize=(5.5 * (1 + n), 8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ticks = ["SFT"] + [f"{e['iter']}.{e['epoch']}" for e in results[0]["arms"][0]["spin"]]
    for i, r in enumerate(results):
        c = colors[i % len(colors)]
        epochs = [e["epoch"] for e in r["sft"]]
        ax[0, 0].plot(epochs, [e["kl"] for e in r["sft"]], color=c, marker=".")
        ax[1, 0].plot(epochs, [e["nll"] for e in r["sft"]], color=c, marker=".")
        for a in ax[:, 0]:
            a.axvline(r["sft_best_epoch"], color=c, ls=":", lw=1)
        for k, arm in enumerate(r["arms"], 1):
            for name, ls in (("spin", "-"), ("cont_sft", "--")):
                ax[0, k].plot(range(len(ticks)), [0] + [e["dkl"] for e in arm[name]], ls, color=c,
                              marker="o", ms=3)
                ax[1, k].plot(range(len(ticks)), [0] + [e["nll"] - r["base"]["nll"] for e in arm[name]], ls,
                              color=c, marker="o", ms=3)
    ax[0, 0].set(title="SFT on the N pairs (dotted: the kept epoch)",
                 ylabel="KL(p_data || p_model), nats per answer")
    ax[1, 0].set(xlabel="SFT epoch (lr / 10 after each plateau)", ylabel="held-out NLL, nats per token")
    ax[0, 0].legend([Line2D([], [], color=colors[i % len(colors)]) for i in range(len(results))] +
                    [Line2D([], [], color="k"), Line2D([], [], color="k", ls="--")],
                    [f"seed {r['seed']}" for r in results] + ["SPIN", "continued SFT"], fontsize=8)
    for k, arm in enumerate(results[0]["arms"], 1):
        ax[0, k].set(title=f"SPIN (solid; beta {s.beta}, lr {arm['lr']:g}) vs continued SFT\n(dashed; "
                     f"lr {arm['cont_lr']:g}; the same steps and tokens)",
                     ylabel="KL - KL(SFT checkpoint), nats per answer")
        ax[1, k].set(xlabel="SPIN iteration.epoch",
                     ylabel="held-out NLL - NLL(SFT checkpoint), nats per token")
        for a in ax[:, k]:
            a.axhline(0, color="gray", lw=0.8)
            a.set_xticks(range(len(ticks)), ticks)
    fig.suptitle(f"Known p_data (a random teacher): N = {s.num_train} SFT pairs, KL on {s.num_test} fresh "
                 f"teacher answers, {len(results)} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def setup():
    if not dist.is_initialized():
        spin.setup_distributed()   # a group of one (gloo, HashStore), as `python spin.py` runs


@contextmanager
def quiet_bars():  # the phases' progress bars off: here the tables are the output
    bars = spin.tqdm
    spin.tqdm = lambda *args, **kwargs: bars(*args, **{**kwargs, "disable": True})
    try:
        yield
    finally:
        spin.tqdm = bars


def main(argv):
    s, t0 = parse_settings(argv), time.time()
    if len(s.lr) != len(s.cont_lr):
        sys.exit("--lr and --cont_lr pair up: give them as many values")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    setup()
    print(f"settings: {s}")
    results = []
    with quiet_bars():
        for seed in s.seeds:
            results.append(run_seed(s, seed))
            table(results[-1])
    rows = summary(results)
    minutes = (time.time() - t0) / 60
    print(f"\n{len(s.seeds)} seeds in {minutes:.1f} min on {torch.get_num_threads()} thread(s)")
    if s.out:
        with open(os.path.join(ROOT, s.out), "w") as f:
            json.dump({"settings": {f.name: getattr(s, f.name) for f in fields(s)}, "minutes": minutes,
                       "threads": torch.get_num_threads(), "summary": rows, "seeds": results}, f, indent=1)
    if s.plot:
        plot(results, s, os.path.join(ROOT, s.plot))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
