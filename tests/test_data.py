# data.py part 2: every input format, bad input as one-line file:line errors, tokenisation policy.
import json

import pytest
import torch

from conftest import build_tokenizer
from data import Tokenizer, encode_answer, read_pairs, to_pair, truncate

USER, ANSWER = "What is 2 + 2?", "It is 4."
WANT = ([{"role": "user", "content": USER}], ANSWER)


@pytest.mark.parametrize("record", [
    {"messages": [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}]},
    {"conversations": [{"from": "human", "value": USER}, {"from": "gpt", "value": ANSWER}]},
    {"instruction": USER, "output": ANSWER},
    {"real": [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}],
     "generated": [{"role": "user", "content": USER}, {"role": "assistant", "content": "5"}]},
])
def test_each_format(record):
    assert to_pair(record) == WANT


def test_alpaca_input_and_multi_turn():
    assert to_pair({"instruction": "Sum:", "input": "2, 2", "output": "4"})[0][0]["content"] == "Sum:\n\n2, 2"
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"}]
    prompt, answer = to_pair({"messages": msgs})
    assert prompt == msgs[:4] and answer == "d"  # multi-turn: every turn before the last answer
    prompt, answer = to_pair({"messages": msgs}, first_turn=True)
    assert prompt == msgs[:2] and answer == "b"  # the paper's setting


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_jsonl_and_json_array(tmp_path):
    rec = {"messages": [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}]}
    f1 = write(tmp_path / "a.jsonl", [json.dumps(rec)] * 3)
    f2 = tmp_path / "a.json"
    f2.write_text(json.dumps([rec] * 3, indent=2))
    assert read_pairs(f1)[0] == read_pairs(str(f2))[0] == [WANT] * 3


def test_cut_off_json_array_keeps_complete_records(tmp_path):
    rec = {"conversations": [{"from": "human", "value": USER}, {"from": "gpt", "value": ANSWER}]}
    text = json.dumps([rec] * 5, indent=2)
    f = tmp_path / "cut.json"
    f.write_text(text[: len(text) - 40])  # the end of the last record is lost, as in the ShareGPT wheel
    pairs, stats = read_pairs(str(f))
    assert pairs == [WANT] * 4 and stats["cut_off"] == 1 and stats["records"] == 4


@pytest.mark.parametrize("line,why", [
    ('{"messages": [{"role": "user", "content": "hi"}', "malformed JSON"),
    ('{"prompt": "hi"}', "no known fields"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}',
     "empty answer"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant answer"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', "no user turn"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}',
     "content: string"),
    ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}', "role"),
    ('[1, 2]', "not a JSON object"),
])
def test_bad_record_names_file_and_line(tmp_path, line, why):
    good = json.dumps({"instruction": "a", "output": "b"})
    f = write(tmp_path / "d.jsonl", [good, "", good, line, good])
    with pytest.raises(ValueError) as e:
        read_pairs(f)
    assert str(e.value).startswith(f"{f}:4: ") and why in str(e.value) and "\n" not in str(e.value)
    pairs, stats = read_pairs(f, skip_bad=True)
    assert len(pairs) == 3 and stats["skipped"] == 1


def test_bad_element_in_json_array_names_line(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": "a"}\n]\n')
    with pytest.raises(ValueError, match=r"d.json:3: no known fields"):
        read_pairs(str(f))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: not found"):
        read_pairs(str(tmp_path / "nope.jsonl"))


def test_encode_answer_uses_template_and_stops_at_eos(tmp_path):
    build_tokenizer(tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path)
    prompt = [{"role": "user", "content": USER}]
    p, r = encode_answer(tok, prompt, ANSWER)
    assert p == tok.apply_chat_template(prompt, add_generation_prompt=True)
    # The answer is exactly what the sampler would emit: its text, then the stop token, nothing after.
    assert r[-1] in tok.eos_ids and tok.decode(r) == ANSWER
    assert p + r == tok.apply_chat_template(prompt + [{"role": "assistant", "content": ANSWER}])[:len(p + r)]


def reference_truncation(prompt, chosen, rejected, max_length, max_prompt_length):
    # uclaml/SPIN's spin/alignment/utils.py (HEAD a12ba80), DataCollatorWithPadding.tokenize_batch_element,
    # lines 102-118, transcribed on id lists (its answers already carry their appended EOS)
    longer_response_length = max(len(chosen), len(rejected))
    if len(prompt) + longer_response_length > max_length:
        prompt = prompt[-max_prompt_length:]  # truncation_mode "keep_end"
    if len(prompt) + longer_response_length > max_length:
        chosen = chosen[: max_length - max_prompt_length]
        rejected = rejected[: max_length - max_prompt_length]
    return prompt, chosen, rejected


def test_truncation_is_the_reference_rule():
    ids = lambda n, base=0: list(range(base, base + n))  # noqa: E731
    # The two cases at 1024 / 512. A 600-token prompt with 200-token answers: nothing is cut.
    p, (r, g), cut = truncate(ids(600), [ids(200, 1000), ids(200, 2000)], 1024, 512)
    assert (len(p), len(r), len(g), cut) == (600, 200, 200, False)
    # A 100-token prompt with a 1000-token real answer: the prompt stays whole, BOTH answers are cut to
    # 1024 - 512 = 512 tokens (not to 1024 - 100), the short one untouched.
    p, (r, g), cut = truncate(ids(100), [ids(1000, 1000), ids(50, 3000)], 1024, 512)
    assert (p, r, g, cut) == (ids(100), ids(512, 1000), ids(50, 3000), True)
    # A long prompt keeps its end; the answers then fit.
    p, (r, g), cut = truncate(ids(900), [ids(300, 1000), ids(10, 2000)], 1024, 512)
    assert (p, r, g, cut) == (ids(512, 388), ids(300, 1000), ids(10, 2000), True)
    # Against the reference's own lines, over random lengths around the limits.
    gen = torch.Generator().manual_seed(0)
    for _ in range(2000):
        P, R, G = (int(x) for x in torch.randint(1, 40, (3,), generator=gen))
        ml, mpl = (int(x) for x in torch.randint(2, 40, (2,), generator=gen))
        mpl = min(mpl, ml - 1)
        want = reference_truncation(ids(P), ids(R, 100), ids(G, 200), ml, mpl)
        p, (r, g), cut = truncate(ids(P), [ids(R, 100), ids(G, 200)], ml, mpl)
        assert (p, r, g) == want, (P, R, G, ml, mpl)
        assert cut == (P + max(R, G) > ml)
