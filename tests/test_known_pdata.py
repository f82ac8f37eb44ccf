# experiments/known_pdata.py at a tiny size (seconds): the mechanics, not the outcome. The teacher's
# log-probs are exact (scored again, they match the sampler's), every KL is finite, SPIN's first step has
# loss log 2 (the model is its own reference), and both arms trained the same answer tokens in the same
# optimizer steps, as counted by a hook on each model.
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import known_pdata as kp  # noqa: E402

TINY = ["--seeds=5", "--num_train=24", "--num_val=16", "--num_test=32", "--sft_max_epochs=3",
        "--iterations=2", "--epochs=2", "--max_new_tokens=12", "--lr=1e-4,1e-3", "--cont_lr=1e-4,1e-3",
        "--out=", "--plot="]


def test_known_pdata_mechanics():
    s = kp.parse_settings(TINY)
    kp.setup()
    with kp.quiet_bars():
        r = kp.run_seed(s, s.seeds[0], say=lambda *a: None)
    assert r["teacher_self_logprob_err"] < 1e-3, r["teacher_self_logprob_err"]
    assert r["base"]["kl"] < r["sft_start_kl"]  # SFT learned something: the KL measures the student
    assert [(a["lr"], a["cont_lr"]) for a in r["arms"]] == [(1e-4, 1e-4), (1e-3, 1e-3)]
    for arm in r["arms"]:
        spin_rows, sft_rows = arm["spin"], arm["cont_sft"]
        assert len(spin_rows) == len(sft_rows) == s.iterations * s.epochs
        for row in [r["base"]] + r["sft"] + spin_rows + sft_rows:
            assert all(math.isfinite(row[k]) for k in ("kl", "kl_se", "nll")), row
        # SPIN's first step: the model equals its reference p_0, every margin is 0, the loss is log 2
        assert abs(spin_rows[0]["first_loss"] - math.log(2)) < 1e-4, spin_rows[0]["first_loss"]
        for a, b in zip(spin_rows, sft_rows):
            # a SPIN epoch trains each pair once, real and generated answer: the hook saw exactly those
            assert a["tokens"] == a["pair_tokens"] > 0
            # equal compute: the same steps and answer tokens in every matched epoch
            assert (a["iter"], a["epoch"], a["steps"], a["tokens"]) == (b["iter"], b["epoch"], b["steps"],
                                                                       b["tokens"])
        # iteration 1 trains on iteration 0's pairs too (the paper's mixing): about twice the tokens
        assert spin_rows[s.epochs]["tokens"] > 1.5 * spin_rows[0]["tokens"]
