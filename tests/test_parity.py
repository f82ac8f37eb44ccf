# spin's training against TRL's DPOTrainer, the implementation users trust (SPIN's loss is DPO's with
# chosen = the real answer, rejected = the model's own). A tiny checkpoint built by transformers, four
# pairs rendered by each side's own tokenisation (the same ids: checked), reference log-probs precomputed
# by each side from the start model, the same optimizer, schedule (warmup from lr 0, then linear decay)
# and clipping; 4 optimizer steps of the whole batch (so the data order cannot differ), fp32.
# Compared: per-sequence log-probs before and after training (relative 1e-5), every step's loss, rewards,
# accuracy, gradient norm and lr, and the weights after the last step (1e-5 absolute).
# Why the weights agree to ~1e-6, not to fp32 rounding: Adam and RMSprop divide by sqrt(v) + 1e-8, so where
# a coordinate's gradient is ~1e-8 its update is ~lr * g / 1e-8: the ~1e-10 by which two fp32
# implementations' gradients differ there become ~lr * 1e-2 in the weights (2e-6 at lr 1e-4; at lr 1e-3
# Adam reached 3.4e-5). The lrs below keep that ~5x under the tolerance and the updates ~10x over it.
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_checkpoint, build_tokenizer

# ChatML with the newline between turns put before a turn, not after it: the rendered answer ends at its
# stop id, so TRL's completion (all the template renders after the prompt) is exactly our answer (up to
# and including the first stop id). With ChatML's own trailing "\n", TRL would score one more token.
TEMPLATE = ("{% for m in messages %}{% if not loop.first %}{{ '\n' }}{% endif %}"
            "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '\n<|im_start|>assistant\n' }}{% endif %}")
PAIRS = [  # (prompt, real answer, generated answer)
    ("What does the quick fox do?", "The quick brown fox jumps over the lazy dog.", "It is fine, thanks."),
    ("Say hello.", "Hello! How are you today?", "Numbers like 12345 and 3.14159 appear too. Hello!"),
    ("Write f(x).", "def f(x):\n    return x * 2\n", "def f(x): return x"),
    ("Tell me about self-play.", "Self-play fine-tuning turns a model into its own opponent.", "A model."),
]
EPOCHS, WARMUP = 4, 0.25  # steps at lr x 0, 1, 2/3, 1/3
CASES = [  # loss, beta, optimizer, lr: each value twice; the first is the reference code's own setting
    ("sigmoid", 0.1, "rmsprop", 1e-5), ("sigmoid", 5.0, "adamw", 5e-5),
    ("hinge", 0.1, "adamw", 5e-5), ("hinge", 5.0, "rmsprop", 1e-5)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("parity") / "ckpt"
    build_checkpoint(path, "llama")
    build_tokenizer(path, TEMPLATE)
    return str(path)


def run_trl(path, loss, beta, optimizer, lr, out):
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": q}],
                               "chosen": [{"role": "assistant", "content": real}],
                               "rejected": [{"role": "assistant", "content": gen}]}
                              for q, real, gen in PAIRS])
    args = DPOConfig(output_dir=out, per_device_train_batch_size=len(PAIRS), num_train_epochs=EPOCHS,
                     learning_rate=lr, beta=beta, loss_type=[loss], max_length=None,
                     precompute_ref_log_probs=True,
                     optim={"rmsprop": "rmsprop", "adamw": "adamw_torch"}[optimizer],
                     lr_scheduler_type="linear", warmup_steps=WARMUP, max_grad_norm=1.0, weight_decay=0.0,
                     gradient_checkpointing=False, bf16=False, use_cpu=True, logging_steps=1,
                     save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    rows = list(trainer.train_dataset)
    ref = torch.tensor([[r["ref_chosen_logps"], r["ref_rejected_logps"]] for r in rows])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, trainer.data_collator(rows))
    return {"ids": [(r["prompt_ids"], [r["chosen_ids"], r["rejected_ids"]]) for r in rows], "ref": ref,
            "after": torch.stack([chosen, rejected], 1),
            "steps": [{"loss": h["loss"], "real": h["rewards/chosen"], "generated": h["rewards/rejected"],
                       "acc": h["rewards/accuracies"], "margin": h["rewards/margins"],
                       "grad_norm": h["grad_norm"], "lr": h["learning_rate"]} for h in logs],
            "weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}}


def run_spin(path, loss, beta, optimizer, lr, mutate=None):
    # spin.py's own functions, as `python spin.py` runs them: FSDP2 over a group of one (the process_group
    # fixture) and the machine's fast paths (spin.load_model), packed micro-batches (micro_batch_tokens 128: the four pairs in several rows, so gradients
    # accumulate across them).
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    import spin
    from data import Tokenizer
    cfg = spin.Config(batch_size=len(PAIRS), epochs=EPOCHS, lr=(lr,), beta=(beta,), loss=loss,
                      optimizer=optimizer, warmup_ratio=WARMUP, max_grad_norm=1.0, micro_batch_tokens=128,
                      compute_dtype="float32")
    tok = Tokenizer.from_pretrained(path)
    ids = [spin.pair_group(tok, [{"role": "user", "content": q}], real, gen, cfg) for q, real, gen in PAIRS]
    groups = mutate(ids) if mutate else ids
    model = spin.load_model(path, cfg, 1, torch.device("cpu"))
    ref = spin.score(model, groups, cfg, "score")                                         # (N, 2)
    logged = []
    model.train()
    spin.train(model, groups, ref, cfg, 0, logged.append, lambda epoch: None)
    model.eval()
    after = spin.score(model, groups, cfg, "score")
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"ids": ids, "ref": ref, "after": after, "weights": weights,
            "steps": [{"loss": r["loss"], "real": r["rewards/real"], "generated": r["rewards/generated"],
                       "acc": r["rewards/accuracies"], "margin": r["rewards/margins"],
                       "grad_norm": r["grad_norm"], "lr": r["lr"]} for r in logged]}


def compare(ours, trl, beta, start):
    # -> None, or raises AssertionError naming the first quantity that differs and by how much
    assert ours["ids"] == trl["ids"], "the two tokenisations differ"
    for key in ("ref", "after"):  # per-sequence log p(answer | prompt), sums over the answer's tokens
        rel = ((ours[key] - trl[key]).abs() / trl[key].abs()).max().item()
        assert rel < 1e-5, f"log-probs ({key}): relative difference {rel:.2e}"
    # Rewards are beta x differences of log-probs of ~100 nats: compared in nats (/ beta), like log-probs.
    scale = trl["ref"].abs().max().item()
    assert len(ours["steps"]) == len(trl["steps"]) == EPOCHS
    for k, (a, b) in enumerate(zip(ours["steps"], trl["steps"])):
        for name in ("real", "generated", "margin"):
            err = abs(a[name] - b[name]) / beta
            assert err < 1e-5 * scale, f"step {k}: rewards/{name} {a[name]} vs {b[name]} ({err:.2e} nats)"
        assert abs(a["loss"] - b["loss"]) < 2e-5 * beta * scale, f"step {k}: loss {a['loss']} vs {b['loss']}"
        assert a["acc"] == b["acc"], f"step {k}: accuracy {a['acc']} vs {b['acc']}"
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-3 * b["grad_norm"] + 1e-6, \
            f"step {k}: grad norm {a['grad_norm']} vs {b['grad_norm']}"
        assert abs(a["lr"] - b["lr"]) <= 1e-6 * b["lr"], f"step {k}: lr {a['lr']} vs {b['lr']}"
    moved = max((trl["weights"][k] - start[k]).abs().max().item() for k in start)
    worst, where = max(((ours["weights"][k] - trl["weights"][k]).abs().max().item(), k) for k in start)
    assert worst < 1e-5, f"weights: {where} differs by {worst:.2e} (updates up to {moved:.2e})"
    return moved


@pytest.fixture(scope="module")
def trl_runs(ckpt, tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = run_trl(ckpt, *case, str(tmp_path_factory.mktemp("trl")))
        return cache[case]
    return get


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_spin_trains_as_trl_dpo_trainer(ckpt, trl_runs, process_group, case):
    trl = trl_runs(case)
    moved = compare(run_spin(ckpt, *case), trl, case[1], load_file(os.path.join(ckpt, "model.safetensors")))
    assert moved > 5e-5  # the weights did move: their agreement means something
    assert trl["steps"][-1]["acc"] == 1.0 and trl["steps"][-1]["loss"] < trl["steps"][0]["loss"]


# ----- the comparison catches what it must: mutations of our side fail it -----

def flip_reference_sign(spin_loss):
    return lambda pi_real, pi_gen, ref_real, ref_gen, beta, kind: spin_loss(
        pi_real, pi_gen, -ref_real, -ref_gen, beta, kind)


def drop_prompt_mask(groups):
    # the prompt's tokens scored as if they were the answer's (all but the first, which nothing predicts)
    return [(p[:1], [p[1:] + r for r in answers]) for p, answers in groups]


@pytest.mark.parametrize("mutation", ["reference_sign", "prompt_mask"])
def test_parity_fails_under_mutation(ckpt, trl_runs, process_group, monkeypatch, mutation):
    import spin
    case = CASES[0]
    if mutation == "reference_sign":
        monkeypatch.setattr(spin, "spin_loss", flip_reference_sign(spin.spin_loss))
        ours = run_spin(ckpt, *case)
    else:
        ours = run_spin(ckpt, *case, mutate=drop_prompt_mask)
    # the prompt's tokens change the log-probs before training; the flipped sign, where training went
    with pytest.raises(AssertionError, match=r"log-probs \((ref|after)\)"):
        compare(ours, trl_runs(case), case[1], load_file(os.path.join(ckpt, "model.safetensors")))
