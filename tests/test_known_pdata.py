# experiments/known_pdata.py at a tiny size (seconds): the mechanics, not the outcome. The teacher's
# log-probs are exact (scored again, they match the sampler's), every KL and NLL is finite, SPIN's first
# step has loss log 2 (the model is its own reference), continued SFT trains the same answer tokens as SPIN
# in the same optimizer steps (one arm) or the same real answers (the other), as counted on each model,
# no two uses of the sampler share a random stream, and one process or two give the same numbers.
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import known_pdata as kp  # noqa: E402
import spin  # noqa: E402

TINY = ["--seeds=5", "--student_widths=32", "--num_train=24", "--num_val=16", "--num_test=32",
        "--sft_max_epochs=3", "--iterations=2", "--lr=1e-4,1e-3", "--beta=0.1,1", "--epochs=2,1",
        "--cont_lr=1e-4", "--max_new_tokens=12", "--processes=1", "--out=", "--plot="]


def test_known_pdata_mechanics(monkeypatch):
    # every sampler call's keys, the teacher's (generate in the experiment) and the students' (in spin.py)
    calls = []

    def recording(generate):
        def wrapped(*args, seeds=None, **kwargs):
            calls.append(list(seeds))
            return generate(*args, seeds=seeds, **kwargs)
        return wrapped
    monkeypatch.setattr(kp, "generate", recording(kp.generate))
    monkeypatch.setattr(spin, "generate", recording(spin.generate))

    s = kp.parse_settings(TINY)
    kp.setup()
    r = kp.run_job(s, s.seeds[0], s.student_widths[0], say=lambda *a: None)
    assert r["teacher_self_logprob_err"] < 1e-3, r["teacher_self_logprob_err"]
    assert r["base"]["kl"] < r["sft_start_kl"]  # SFT learned something: the KL measures the student
    assert [(a["lr"], a["beta"], a["epochs"]) for a in r["arms"]] == [(1e-4, 0.1, 2), (1e-3, 1.0, 1)]
    for arm in r["arms"]:
        spin_rows, by_tokens, by_answers = arm["spin"], arm["sft_tokens"], arm["sft_answers"]
        assert len(spin_rows) == len(by_tokens) == len(by_answers) == s.iterations * arm["epochs"]
        # the measures at the checkpoint and at the end of each iteration (its last epoch)
        for row in [r["base"]] + spin_rows + by_tokens + by_answers:
            assert ("kl" in row) == (row is r["base"] or row["epoch"] == arm["epochs"]), row
            assert all(math.isfinite(row.get(k, 0.0)) for k in ("kl", "kl_se", "rkl", "rkl_se", "nll",
                                                                 "train_nll", "d_change", "r_change")), row
        assert all(math.isfinite(row[k]) for row in r["sft"] for k in ("kl", "nll", "train_nll"))
        # SPIN's first step: the model equals its reference p_0, every margin is 0, the loss is log 2
        assert abs(spin_rows[0]["first_loss"] - math.log(2)) < 1e-4, spin_rows[0]["first_loss"]
        for a, b, c in zip(spin_rows, by_tokens, by_answers):
            # a SPIN epoch trains each pair once, real and generated answer: the hook saw exactly those
            assert a["tokens"] == a["pair_tokens"] > 0
            assert a["steps"] == b["steps"] == c["steps"] and a["iter"] == b["iter"] == c["iter"]
            # equal answer tokens: the same tokens in every matched epoch, so more real answers than SPIN's
            assert b["tokens"] == a["tokens"] and b["answers"] > a["answers"]
            # equal real answers: as many real answers as SPIN's pairs, so fewer tokens
            assert c["answers"] == a["answers"] and c["tokens"] < a["tokens"]
        # iteration t >= 1 trains on t-1's pairs too (the paper's mixing): SPIN's real-answer passes
        # are epochs x (N + 2N (iterations - 1)), and the equal-answers arm's count is the same
        passes = arm["epochs"] * s.num_train * (1 + 2 * (s.iterations - 1))
        assert sum(row["answers"] for row in spin_rows) == sum(row["answers"] for row in by_answers) == passes

    # random streams: the teacher's train, validation and test answers and the students' samples (SPIN's
    # per iteration, the reverse KL's on the test prompts) never share a key. A stream used twice is the
    # same list (the reverse KL's at every evaluation, SPIN's iteration t in each arm): deliberate pairing.
    teacher = calls[:3]
    assert [len(c) for c in teacher] == [s.num_train, s.num_val, s.num_test]
    distinct = {tuple(c) for c in calls}
    assert len(distinct) == 3 + 1 + s.iterations  # the teacher's 3, reverse KL's 1, SPIN's per iteration
    keys = [k for c in distinct for k in c]
    assert len(keys) == len(set(keys)), "two uses of the sampler share a random stream"


def test_answers_per_prompt():
    # K = 4: the N pairs are N / 4 prompts, each with 4 different teacher answers (4 streams)
    s = kp.parse_settings(["--answers_per_prompt=4", "--max_new_tokens=12"])
    teacher = kp.random_model(s, s.teacher_width, s.teacher_layers, 5, s.teacher_gain, s.stop_gain).eval()
    pairs = kp.sample_pairs(teacher, s, 8, 5, kp.TRAIN, k=4)
    prompts = [tuple(x) for x, _, _ in pairs]
    assert len(pairs) == 8 and len(set(prompts)) == 2 and prompts[:4] == [prompts[0]] * 4
    assert len({tuple(y) for _, y, _ in pairs[:4]}) > 1


def test_split_across_processes_changes_nothing():
    # two jobs in one process, then in a pool of two (one thread each, as the default command runs): the
    # same numbers, all of them, but the wall time
    argv = [a for a in TINY if not a.startswith(("--seeds", "--student_widths", "--processes"))]
    argv += ["--seeds=5", "--student_widths=16,32", "--iterations=1", "--lr=1e-3", "--beta=1", "--epochs=1"]

    def numbers(results):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in results]
    assert numbers(kp.main(argv + ["--processes=1"])) == numbers(kp.main(argv + ["--processes=2"]))
