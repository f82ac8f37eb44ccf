# generate.py against the uncached forward, transformers' generate() and hand-made logits.
import datetime
import json
import os
import subprocess
import sys

import pytest
import torch

from generate import (MEMORY_SHARE, filter_logits, from_generation_config, generate,
                      penalize, pool_size, prompt_keys, sample, span, uniforms)
from model import Transformer
from spin_kernels import packed_weights, speed_up
from spin_kernels.machine import max_pool
from spin_kernels.packed import bf16_packing_available

LENGTHS = [1, 7, 30, 13, 2, 21, 16, 4]  # ragged, 1 to 30 tokens


def prompts(lengths=LENGTHS, seed=0, V=307):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models run fastest on one thread; on a shared CPU, OpenMP threads waiting on each other
    # make every small op cost a millisecond.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@torch.no_grad()
def greedy_reference(model, prompt, n):
    # Step-by-step argmax of the uncached forward over the whole sequence so far.
    x, new = list(prompt), []
    for _ in range(n):
        new.append(model(torch.tensor([x]))[0, -1].argmax().item())
        x.append(new[-1])
    return new


def cut(tokens, stop):  # up to and including the first stop id
    return tokens[:tokens.index(stop) + 1] if stop in tokens else tokens


@pytest.fixture(scope="module")
def models(checkpoints):
    return {k: Transformer.from_pretrained(path) for k, (path, _) in checkpoints.items()}


@pytest.mark.parametrize("kind,pool,prefill_tokens", [("mistral", None, 8192), ("llama3_tied", 3, 1),
                                                      ("qwen2", None, 40), ("llama", 2, 7)])
def test_greedy_matches_uncached_argmax(models, kind, pool, prefill_tokens):
    # Mistral's window (8) is shorter than most prompts. prefill_tokens=1 prefills token by token, 40 in
    # groups, 7 in groups and chunks; pools of 2 and 3 refill rows while others decode.
    model, ps = models[kind], prompts()
    free = [greedy_reference(model, p, 12) for p in ps]
    stop = free[0][4]  # a token that does occur, so some rows stop early and others run on
    ref = [cut(f, stop) for f in free]
    assert any(len(r) < 12 for r in ref) and any(len(r) == 12 for r in ref)
    out = generate(model, ps, 12, temperature=0, stop_ids=[stop], pool=pool, prefill_tokens=prefill_tokens)
    assert out == ref


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_matches_transformers(checkpoints, models, kind):
    path, hf = checkpoints[kind]
    ps = prompts([3, 11, 25], seed=1)
    ours = generate(models[kind], ps, 16, temperature=0, stop_ids=[302])
    for p, o in zip(ps, ours):
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=16, do_sample=False, eos_token_id=302, pad_token_id=0)
        assert o == ref[0, len(p):].tolist()


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.8, top_k=20), dict(top_p=0.9)])
def test_same_seed_same_samples_whatever_the_grouping(models, settings):
    model, ps = models["llama"], prompts()
    together = generate(model, ps, 10, seed=7, stop_ids=[5], **settings)
    alone = [generate(model, [p], 10, seed=7, stop_ids=[5], **settings)[0] for p in ps]
    reversed_ = generate(model, ps[::-1], 10, seed=7, stop_ids=[5], pool=3, **settings)[::-1]
    assert together == alone == reversed_
    other = generate(model, ps, 10, seed=8, stop_ids=[5], **settings)
    assert other != together  # the seed matters: the test can fail
    explicit = generate(model, ps, 10, seeds=list(range(len(ps))), **settings)
    assert generate(model, ps[::-1], 10, seeds=list(range(len(ps)))[::-1], **settings)[::-1] == explicit


def with_stop(free, avoid=()):
    # A stop id that ends some answers early and not others (so rows free up at different steps), and the
    # answers it gives: stopping only cuts an answer, since no draw depends on another row or on stopping
    # (avoid: the prompts' tokens, which the repetition penalty treats differently once they are stop ids).
    for stop in sorted({t for f in free for t in f[1:]} - set(avoid)):
        cut_ = [cut(f, stop) for f in free]
        if sum(len(c) < len(f) for c, f in zip(cut_, free)) in range(2, len(free) - 1):
            return stop, cut_
    raise AssertionError("no token stops some answers but not all")


@pytest.mark.parametrize("settings", [dict(temperature=0), dict(), dict(temperature=0.9, top_p=0.8),
                                      dict(top_k=20, min_p=0.05), dict(min_p=0.05, repetition_penalty=1.5)],
                         ids=["greedy", "t1", "top_p", "top_k_min_p", "min_p_penalty"])
def test_continuous_equals_static_equals_alone(models, settings):
    # Token for token whatever the scheduling: each prompt alone, and pools of 1, 3 and 16 rows refilled as
    # soon as a row stops (refill=0), once an eighth is free (default) or once drained (static, refill=1),
    # shrinking to their live rows once nothing waits; ragged prompts, a stop id ending some rows early.
    model, ps = models["qwen2"], prompts(LENGTHS + [5, 27, 1, 9], seed=2)

    def run(ps, **kw):
        return generate(model, ps, 14, seed=3, return_logprobs=True, **settings, **kw)
    stop, want = with_stop([run([p])[0][0] for p in ps], avoid=[t for p in ps for t in p])
    alone = [run([p], stop_ids=[stop])[0] for p in ps]
    assert [t for t, _ in alone] == want
    for pool in (1, 3, 16):
        for refill in (0, 1 / 8, 1):
            out = run(ps, pool=pool, refill=refill, stop_ids=[stop])
            assert [t for t, _ in out] == want, (pool, refill)
            assert all(torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
                       for (_, a), (_, b) in zip(out, alone))


@torch.no_grad()
def test_repetition_penalty_is_transformers(models):
    # Greedy with a penalty == the uncached forward's logits through transformers' own processor over the
    # sequence so far (prompt included), step by step, except that a stop id is never penalised (a chat
    # prompt holds one); and the penalty changes the answers here.
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    model, ps, penalty = models["llama"], prompts([3, 12, 1], seed=1), 1.3

    def reference(p, stop):
        x = list(p)
        while len(x) - len(p) < 12 and (len(x) == len(p) or x[-1] != stop):
            logits = model(torch.tensor([x]))[0, -1:].float()                            # (1, V)
            ids = torch.tensor([[t for t in x if t != stop]])
            x.append(RepetitionPenaltyLogitsProcessor(penalty)(ids, logits).argmax().item())
        return x[len(p):]
    for stop in sorted(set(ps[1])):  # a token of prompt 1 that ends its answer (penalised, it would not)
        want = [reference(p, stop) for p in ps]
        if want[1][-1] == stop:
            break
    assert want[1][-1] == stop
    assert generate(model, ps, 12, temperature=0, repetition_penalty=penalty, stop_ids=[stop], pool=2) == want
    assert generate(model, ps, 12, temperature=0, stop_ids=[stop], pool=2) != want


def test_penalize_is_transformers_bit_for_bit():
    # The penalty alone against transformers' processor on logits of both signs, zeros and -inf (a filtered
    # token), for a penalty above 1 (the default run's) and below 1 (repetition encouraged).
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=g) * 5
    logits[:, :3] = torch.tensor([0.0, float("-inf"), -0.0])
    ids = torch.randint(0, 300, (4, 40), generator=g)
    ids[:, :3] = torch.tensor([0, 1, 2])
    seen = torch.zeros(4, 300, dtype=torch.bool).scatter_(1, ids, True)
    for penalty in (1.2, 1.3, 0.8):
        ref = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        assert torch.equal(penalize(logits, seen, penalty), ref), penalty
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        generate(None, [[1]], 4, repetition_penalty=0)


def test_continuous_refills_rows_while_others_decode(models):
    # A pool of 3 refilled as soon as a row frees: prompt 3 starts while the rows of prompts 0-2 with longer
    # answers (never empty: the stop id is chosen so) still decode; static batching starts it only once all
    # three have stopped.
    model, ps = models["llama"], prompts()
    free = generate(model, ps, 12, seed=0)
    stop = next(s for s in sorted({t for f in free[:3] for t in f})
                if len({len(cut(f, s)) for f in free[:3]}) > 1)  # the first three stop at different steps
    lengths = [len(cut(f, stop)) for f in free[:3]]
    for refill in (0, 1):
        seen = []
        generate(model, ps, 12, seed=0, stop_ids=[stop], pool=3, refill=refill,
                 on_token=lambda i, t: seen.append(i))
        still_decoding = {i for i in seen[seen.index(3):] if i < 3}
        longer = {i for i in range(3) if lengths[i] > min(lengths)}
        assert still_decoding == (longer if refill == 0 else set())


def test_drained_pool_decodes_live_rows_only(models, monkeypatch):
    # Once no prompt waits, every step decodes exactly the rows still answering: the pool shrinks as each
    # row stops, the live rows past its new end moving into the freed ones with their caches (answers the
    # same as each prompt's alone).
    import generate as g
    model, ps, rows = models["llama"], prompts(LENGTHS * 2), []
    free = generate(model, ps, 12, seed=0)
    stop = max(sorted({t for f in free for t in f}), key=lambda s: len({len(cut(f, s)) for f in free}))
    alone = [generate(model, [p], 12, seed=0, stop_ids=[stop])[0] for p in ps]
    make_step = g.make_step

    def counting(*args):
        step = make_step(*args)
        return lambda m, c, tok, *rest: rows.append(len(tok)) or step(m, c, tok, *rest)
    monkeypatch.setattr(g, "make_step", counting)
    out = generate(model, ps, 12, seed=0, stop_ids=[stop], pool=len(ps))
    assert out == alone and len({len(a) for a in out}) > 2  # answers of several lengths: rows free mid-way
    assert sum(rows) == sum(len(a) - 1 for a in out)  # the first token comes from the prefill
    assert rows == sorted(rows, reverse=True) and rows[0] == sum(len(a) > 1 for a in out)


def test_pool_size_from_memory_and_span(models):
    cfg = models["llama"].config  # 2 layers, 2 key/value heads of 16, vocabulary 307
    per_row = 2 * 2 * 2 * 16 * 128 * 4 + 4 * 307 * 4  # keys and values of 128 slots in fp32, sampling rows
    assert pool_size(cfg, 128, torch.float32, "cpu", free=10 * per_row / MEMORY_SHARE) == 10
    assert pool_size(cfg, 128, torch.float32, "cpu", free=0) == 1
    assert pool_size(cfg, 128, torch.float32, "cpu", free=1 << 50) == max_pool("cpu")
    assert 1 <= pool_size(cfg, 128, torch.float32, "cpu") <= max_pool("cpu")  # this machine's free memory
    # The keys a step reads: the longest row, rounded up to 64 (compiled: a power of two), at most all.
    assert [span(n, 320, False) for n in (1, 64, 65, 300)] == [64, 64, 128, 320]
    assert [span(n, 320, True) for n in (1, 65, 129, 300)] == [64, 128, 256, 320]


@pytest.mark.parametrize("attention", ["plain", "fast"])
def test_compiled_step_equals_eager_and_refills_without_recompiling(checkpoints, attention):
    # The decode step through torch.compile as one graph (fullgraph), every sampling construct at once
    # (penalty, temperature, top-p, min-p: sort, scans, searchsorted, scatter): Inductor lowers it on CPU
    # here (CUDA graphs on a GPU), so a construct it cannot lower fails CI, not a GPU session. Samples
    # equal eager's, and other refills (the prompts reversed) replay the same graph.
    from torch._dynamo.utils import counters
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Transformer.from_pretrained(checkpoints["llama"][0], torch.float32, device)
    if attention == "fast":  # as spin.py generates: the two-matmul decode step inside the graph
        speed_up(model)
    ps = prompts(LENGTHS * 2, seed=4)
    settings = dict(temperature=0.9, top_p=0.9, min_p=0.05, repetition_penalty=1.3, stop_ids=[5], seed=1,
                    return_logprobs=True)
    eager = generate(model, ps, 30, pool=5, **settings)
    compiled = generate(model, ps, 30, pool=5, compile=True, **settings)
    graphs = counters["stats"]["unique_graphs"]
    again = generate(model, ps[::-1], 30, pool=5, compile=True, **settings)[::-1]
    assert [t for t, _ in compiled] == [t for t, _ in eager] == [t for t, _ in again]
    assert any(len(t) < 30 for t, _ in eager) and any(len(t) == 30 for t, _ in eager)  # rows refilled
    assert all(torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4) for (_, a), (_, b) in
               zip(compiled, eager))
    assert counters["stats"]["unique_graphs"] == graphs  # other refills, the same shapes: no new graph


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_sample_what_plain_ones_do_and_are_undone(checkpoints, dtype):
    # Inside spin_kernels.packed_weights, a CPU generation multiplies by weights packed once into oneDNN's
    # layout in bf16 (q|k|v and gate|up as one product each, the head too), and in fp32 runs the head as
    # W @ h^T. The same answers as outside it, log-probs up to rounding, on an untied model with biases
    # (qwen2: q|k|v's stacked; lm_head is a Linear: packed once, as the head) and a tied one; after the
    # phase, and after an error inside it, every forward is the plain one again, no packed copy kept.
    for kind in ("qwen2", "llama3_tied"):
        model = Transformer.from_pretrained(checkpoints[kind][0], dtype).eval()
        ps, seen = prompts(LENGTHS * 2, seed=5), set()
        layer = model.model.layers[0]
        attn, mlp = layer.self_attn, layer.mlp
        swapped = lambda: ("logits" in model.__dict__, "project" in attn.__dict__,  # noqa: E731
                           "gate_up" in mlp.__dict__, "forward" in mlp.down_proj.__dict__,
                           "forward" in attn.o_proj.__dict__)

        def runs():  # sampling and greedy, noting per token which forwards were replaced
            watch = lambda i, t: seen.add(swapped())  # noqa: E731
            return sum((generate(model, ps, 20, temperature=T, top_p=0.9, stop_ids=[5], seed=2, pool=6,
                                 return_logprobs=True, on_token=watch) for T in (0.9, 0)), [])
        with packed_weights(model):
            packed = runs()
        bf16 = dtype == torch.bfloat16 and bf16_packing_available()
        assert seen == {(True,) + (bf16,) * 4}  # every token from packed weights (the head at least)
        seen.clear()
        plain = runs()
        assert seen == {(False,) * 5}
        assert [t for t, _ in packed] == [t for t, _ in plain]
        tol = 1e-4 if dtype == torch.float32 else 0.05
        assert all(torch.allclose(torch.tensor(a), torch.tensor(b), atol=tol) for (_, a), (_, b) in
                   zip(packed, plain))

        def fail(i, t):
            raise RuntimeError("stop here")
        with pytest.raises(RuntimeError, match="stop here"), packed_weights(model):
            generate(model, ps, 20, on_token=fail)
        assert not any({"forward", "project", "gate_up", "logits"} & m.__dict__.keys()
                       for m in model.modules())


def test_packing_uses_onednn_ops_this_torch_has():
    # packed_weights needs private oneDNN ops (torch.ops.mkldnn): a torch release that renames them fails
    # here, by name, instead of silently generating with unpacked weights
    for op in ("_reorder_linear_weight", "_linear_pointwise", "_is_mkldnn_bf16_supported"):
        assert hasattr(torch.ops.mkldnn, op), f"torch {torch.__version__} has no torch.ops.mkldnn.{op}: " \
            f"spin_kernels/packed.py needs updating"


def test_logprobs_are_the_models_at_temperature_one(models):
    model, ps = models["mistral"], prompts()
    out = generate(model, ps, 10, seed=3, return_logprobs=True)
    for p, (toks, lps) in zip(ps, out):
        x = torch.tensor([p + toks])
        with torch.no_grad():
            ref = torch.log_softmax(model(x)[0, len(p) - 1:-1].float(), -1).gather(-1, x[0, len(p):, None])
        assert len(lps) == len(toks) == 10
        assert torch.allclose(torch.tensor(lps), ref[:, 0], atol=1e-4)
    # With temperature and top-k the log-prob is that of the filtered, rescaled distribution.
    (toks, lps), = generate(model, ps[:1], 5, seed=3, temperature=0.5, top_k=3, return_logprobs=True)
    x = torch.tensor([ps[0] + toks])
    with torch.no_grad():
        logits = filter_logits(model(x)[0, len(ps[0]) - 1:-1].float() / 0.5, top_k=3)
    ref = torch.log_softmax(logits, -1).gather(-1, x[0, len(ps[0]):, None])[:, 0]
    assert torch.allclose(torch.tensor(lps), ref, atol=1e-4) and (ref < 0).all()


def test_filter_logits_hand_made():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.2, 0.1]])  # sorted: 0.5, 0.2, 0.15, 0.1, 0.05
    logits = probs.log()
    kept = lambda **kw: torch.isfinite(filter_logits(logits, **kw))[0].nonzero()[:, 0].tolist()  # noqa: E731
    assert kept(top_k=2) == [1, 3] and kept(top_k=3) == [0, 1, 3] and kept(top_k=99) == [0, 1, 2, 3, 4]
    assert kept(top_p=0.55) == [1, 3]      # 0.5 < 0.55 <= 0.5 + 0.2: the smallest set reaching p
    assert kept(top_p=0.75) == [0, 1, 3]
    assert kept(top_p=0.01) == [1] and kept(top_p=0.0) == [1]  # always at least the most likely token
    assert kept(top_k=3, top_p=0.55) == [1]  # top-p sees top-k's renormalised mass: 0.5/0.85 > 0.55
    assert kept(top_k=3, top_p=0.7) == [1, 3]
    assert kept(min_p=0.35) == [1, 3] and kept(min_p=0.25) == [0, 1, 3]  # p >= min_p * 0.5
    assert kept(min_p=1.0) == [1] and kept(top_p=0.75, min_p=0.35) == [1, 3]
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert torch.isfinite(filter_logits(ties, top_k=1)).tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("top_k,top_p,min_p", [(5, 1.0, 0), (0, 0.7, 0), (50, 0.9, 0), (1, 1.0, 0),
                                               (0, 1.0, 0.1), (20, 0.95, 0.05)])
def test_filter_logits_equals_transformers(top_k, top_p, min_p):
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    logits = torch.randn(6, 307, generator=torch.Generator().manual_seed(top_k)) * 3
    ref = logits
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    if min_p:
        ref = MinPLogitsWarper(min_p)(None, ref)
    assert torch.equal(torch.isfinite(filter_logits(logits, top_k, top_p, min_p)), torch.isfinite(ref))


def test_sampling_draws_only_allowed_tokens_at_their_frequencies():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.2, 0.1])
    n = 20000
    keys = torch.stack([torch.arange(n), torch.arange(n) * 7 + 1], 1)
    u = uniforms(keys, torch.zeros(n, dtype=torch.long))          # (n,) one draw per stream
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    for kw, allowed in [(dict(top_k=2), [1, 3]), (dict(top_p=0.75), [0, 1, 3]), (dict(min_p=0.25), [0, 1, 3]),
                        (dict(), [0, 1, 2, 3, 4])]:
        tok, lp = sample(probs.log().expand(n, 5), u, 1.0, kw.get("top_k", 0), kw.get("top_p", 1.0),
                         kw.get("min_p", 0.0))
        counts = torch.bincount(tok, minlength=5).double() / n
        want = torch.zeros(5)
        want[allowed] = probs[allowed] / probs[allowed].sum()
        assert set(tok.unique().tolist()) == set(allowed), kw
        assert (counts - want).abs().max() < 0.015, (kw, counts, want)
        assert torch.allclose(lp, want[tok].log().float(), atol=1e-5)
    # The extreme uniforms still land on allowed tokens (token 0 and the last one are filtered out here).
    edges = torch.tensor([0.0, 1 - 2.0 ** -32], dtype=torch.float64)
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.0]]).expand(2, 4)
    assert sample(logits, edges, 1.0, 2, 1.0)[0].tolist() == [1, 2]
    # Keys come from the prompt's content, not only its length.
    assert not torch.equal(prompt_keys([[1, 2]], 0, None), prompt_keys([[2, 1]], 0, None))


@pytest.mark.parametrize("config", [
    {}, {"do_sample": False, "temperature": 0.6, "top_p": 0.9},  # greedy: transformers ignores the rest
    {"do_sample": True}, {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0},
    {"do_sample": True, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.3, "temperature": None},
    {"repetition_penalty": 1.2, "bos_token_id": 1, "eos_token_id": [2, 3], "max_length": 4096}])
def test_generation_config_decodes_as_transformers_would(config):
    # --use_generation_config: what transformers' generate() does with this generation_config.json and no
    # sampling arguments (the reference's HF script): its defaults fill what the file leaves unset.
    from transformers import GenerationConfig
    g = {**GenerationConfig._get_default_generation_params(),
         **{k: v for k, v in GenerationConfig.from_dict(config).to_dict().items() if v is not None}}
    got = from_generation_config(config)
    assert got["repetition_penalty"] == g["repetition_penalty"]  # applied when greedy too
    if not g["do_sample"]:
        assert got["temperature"] == 0  # greedy; the filters then change nothing
    else:
        assert (got["temperature"], got["top_k"], got["top_p"], got["min_p"]) == \
            (g["temperature"], g["top_k"], g["top_p"], g.get("min_p") or 0.0), (got, g)
    with pytest.raises(ValueError, match="ckpt/generation_config.json: num_beams=4 is not supported"):
        from_generation_config({**config, "num_beams": 4}, "ckpt/generation_config.json")


def test_max_new_tokens_and_errors(models):
    model = models["llama"]
    assert generate(model, prompts([3, 5]), 0) == [[], []]
    assert generate(model, [], 5) == []
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], 5)


def test_cli_streams_and_reports_speed(checkpoints, models):
    path, _ = checkpoints["llama"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "generate.py"), "--model", path, "--prompt",
                        "Hello! How are you?", "--max_new_tokens", "12", "--temperature", "0",
                        "--compute_dtype", "float32"],  # pinned: auto is bf16 on a CPU with bf16 units
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": root})
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stderr
    from data import Tokenizer
    tok = Tokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello! How are you?"}],
                                  add_generation_prompt=True)
    want = generate(models["llama"], [ids], 12, temperature=0, stop_ids=tok.eos_ids)[0]
    assert r.stdout == tok.decode(want) + "\n" and len(r.stdout) > 1


def _fsdp_worker(rank, path, out_dir):
    # One of two CPU ranks: FSDP2-shard the model, generate with unequal numbers of prompts per rank.
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # a hang fails the test instead
    mesh = init_device_mesh("cpu", (2,))
    model = Transformer.from_pretrained(path)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()  # a training step first: FSDP's lazy init
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    before = [m._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info for m in mods]
    ps = prompts()[:5] if rank == 0 else prompts()[5:6]  # 5 prompts through 2 rows on rank 0, 1 on rank 1
    with pytest.raises(ValueError, match="gathered"):
        generate(model, ps, 12)  # sharded forwards would be collective: refused
    from spin import gathered
    with gathered(model):  # collective once; inside, the ranks' different amounts of work never meet
        greedy = generate(model, ps, 12, temperature=0, pool=2, stop_ids=[5])
        sampled = generate(model, ps, 12, seed=1, pool=2)
    after = [m._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info for m in mods]
    resharded = all(isinstance(p, DTensor) for p in model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()  # and training still works after
    with open(f"{out_dir}/{rank}.json", "w") as f:
        json.dump(dict(greedy=greedy, sampled=sampled, restored=before == after, resharded=resharded), f)
    dist.barrier()  # neither rank tears gloo down while the other is still in a collective
    dist.destroy_process_group()
    # Skip interpreter teardown: now and then a C++ thread of the gloo/FSDP runtime is still joinable when
    # static destructors run, which aborts the process ("terminate called without an active exception")
    # after all the work above is done and written.
    os._exit(0)


def test_fsdp2_sharded_model_generates_like_the_plain_one(checkpoints, models, tmp_path):
    import torch.multiprocessing as mp
    path, _ = checkpoints["llama3_tied"]
    mp.spawn(_fsdp_worker, args=(path, str(tmp_path)), nprocs=2)
    ps = prompts()
    want = dict(greedy=generate(models["llama3_tied"], ps[:6], 12, temperature=0, stop_ids=[5]),
                sampled=generate(models["llama3_tied"], ps[:6], 12, seed=1))
    got = [json.load(open(tmp_path / f"{r}.json")) for r in (0, 1)]
    assert all(g["restored"] and g["resharded"] for g in got)
    for key in ("greedy", "sampled"):
        assert got[0][key] + got[1][key] == want[key]


# Inductor's Triton code generation for the decode step, on a CPU: the Triton driver and kernel compiler
# are stubbed and the device claims an H200's 132 SMs, so long scans split as on that GPU. Every kernel's
# source is generated (where torch 2.11 crashed on CUDA, issue 22) and none is compiled.
TRITON_CODEGEN = """
import sys, torch, torch.utils._triton as ut, torch._inductor.config as ic
import torch._inductor.async_compile as ac, torch._inductor.codegen.triton as ct
from torch._inductor.runtime import hints
from triton.backends.compiler import GPUTarget
ic.cpu_backend, ic.compile_threads, ic.force_disable_caches = "triton", 1, True
ut.triton_backend = lambda: GPUTarget("cuda", 90, 32)
ut.triton_hash_with_backend = ct.triton_hash_with_backend = lambda: "stub"
create = hints.DeviceProperties.create.__func__
hints.DeviceProperties.create = classmethod(lambda c, d: create(c, d)._replace(multi_processor_count=132))
kernels = []
class Unrunnable(Exception): pass
def stub(self, name, source, *a, **k):
    kernels.append(name)
    def run(*a, **k): raise Unrunnable
    return type("K", (), {"run": staticmethod(run), "__call__": staticmethod(run)})()
ac.AsyncCompile.triton = stub
from model import Config, KVCache, Transformer
from generate import decode_one_token
S, V = 64, 49152
cfg = Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)
sampling = eval(sys.argv[1])
seen = torch.zeros(S, V, dtype=torch.bool) if sampling[-1] != 1 else None
step = torch.compile(lambda *a: decode_one_token(*a, *sampling), fullgraph=True)
try:
    with torch.no_grad():
        step(Transformer(cfg).eval(), KVCache(cfg, S, 128), torch.zeros(S, dtype=torch.long),
             torch.zeros(S, 2, dtype=torch.long), torch.zeros(S, dtype=torch.long), seen)
except Exception as e:
    if not isinstance(e, Unrunnable) and "Unrunnable" not in repr(e):
        raise
print(len(kernels), sum(k.startswith("triton_spl") for k in kernels))
"""


@pytest.mark.parametrize("sampling", ["(1.0, 0, 1.0, 0.0, 1.0)", "(0.7, 20, 0.9, 0.1, 1.2)"],
                         ids=["spin", "every_filter"])
def test_decode_step_generates_triton_code(sampling):
    pytest.importorskip("triton.backends.compiler")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", TRITON_CODEGEN, sampling], cwd=root, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": root})
    if out.returncode and "AttributeError" in out.stderr:  # the stubs reach into torch's internals
        pytest.skip(f"this torch's Inductor internals differ: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr[-3000:]
    n, split_scans = map(int, out.stdout.split()[-2:])
    assert n > 10 and split_scans >= 1  # the whole step, and a long scan split as on an H200
