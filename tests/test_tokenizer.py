# data.Tokenizer against transformers' AutoTokenizer: same ids for text and for chat templates.
import json
import os

import pytest
import transformers

from conftest import CHATML, build_tokenizer
from data import Tokenizer

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + "
          "message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + "
          "message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'"
          "  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n"
          "{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
           "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
           "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
           "{{ message['content'] + eos_token}}{% endif %}{% endfor %}")
TOJSON = ("{% for m in messages %}{{ m | tojson }}{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>{% endif %}")

CHATS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name 3 primes."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about 12345."}],
    [{"role": "user", "content": "naïve café Ünïcödé 日本語 🙂 <\"html\"> & spaces   end"}],
]


@pytest.mark.parametrize("name,template", [("chatml", CHATML), ("llama3", LLAMA3), ("zephyr", ZEPHYR),
                                           ("mistral", MISTRAL), ("tojson", TOJSON)])
def test_chat_template_ids_equal_transformers(tmp_path, name, template):
    build_tokenizer(tmp_path, template)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_pretrained(tmp_path)
    for chat in CHATS:
        if name == "mistral" and chat[0]["role"] == "system":
            continue  # that template refuses system prompts (tested below)
        for gen in (False, True):
            want = ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False)
            got = ours.apply_chat_template(chat, add_generation_prompt=gen)
            assert got == list(want), f"{name} gen={gen}: {ours.decode(got, False)!r}"
            assert ours.apply_chat_template(chat, gen, tokenize=False) == \
                ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)


def test_template_raise_exception(tmp_path):
    build_tokenizer(tmp_path, MISTRAL)
    with pytest.raises(Exception, match="must alternate"):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template(CHATS[1])


def test_encode_decode_and_special_tokens(tmp_path):
    build_tokenizer(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_pretrained(tmp_path)
    for text in ["plain text 12345", "<|im_start|>user\nhi<|im_end|>", "🙂  two  spaces\n\tTab"]:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    assert ours.encode("<|im_start|>") == [ours.token_id("<|im_start|>")]
    assert ours.decode(ours.encode("<|im_start|>hi")) == "hi"  # specials skipped by default
    assert ours.eos_ids == [ref.convert_tokens_to_ids("<|im_end|>")]


def test_several_eos_ids_from_generation_config(tmp_path):
    build_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.eos_ids == sorted({0, 2, tok.token_id("<|im_end|>")})


def test_no_template_is_a_clear_error_unless_named(tmp_path):
    build_tokenizer(tmp_path, chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template(CHATS[0])
    (tmp_path / "t.jinja").write_text(CHATML)
    tok = Tokenizer.from_pretrained(tmp_path, chat_template=str(tmp_path / "t.jinja"))
    assert tok.apply_chat_template(CHATS[0], tokenize=False).startswith("<|im_start|>user\nHello")


def test_save_pretrained_roundtrip(tmp_path):
    build_tokenizer(tmp_path / "a", LLAMA3)
    Tokenizer.from_pretrained(tmp_path / "a").save_pretrained(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_pretrained(tmp_path)
    want = ref.apply_chat_template(CHATS[2], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.apply_chat_template(CHATS[2], True) == list(want)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json: not found"):
        Tokenizer.from_pretrained(tmp_path)


# ----- Qwen3's template: thinking switch, reasoning in history, tool turns -----

# Qwen3's chat template, transcribed from its checkpoints' tokenizer_config.json (Qwen3-8B).
QWEN3 = open(os.path.join(os.path.dirname(__file__), "qwen3_chat_template.jinja")).read().rstrip("\n")
# transformers passes enable_thinking=False into the template; here the same switch is a template that
# sets it (what --chat_template FILE takes): Tokenizer.apply_chat_template passes no extra template variables.
NO_THINKING = "{%- set enable_thinking = false %}\n" + QWEN3
QWEN3_CHATS = CHATS + [
    # earlier answers with reasoning: the template drops it before the last query, keeps it after
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
     {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>add</think>4"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
         "name": "weather", "arguments": {"city": "Paris", "unit": "°C"}}}]},
     {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "tool", "content": "sunny"},
     {"role": "assistant", "content": "<think>\nread it\n</think>\n\n21 °C, sunny."}],
]


def qwen3_tokenizer(path):
    hf = build_tokenizer(path, QWEN3)
    hf.add_tokens(["<think>", "</think>"])  # plain added tokens in Qwen3 (matched whole, not special)
    hf.save_pretrained(path)


@pytest.mark.parametrize("thinking", [None, True, False])
def test_qwen3_template_ids_equal_transformers(tmp_path, thinking):
    qwen3_tokenizer(tmp_path)
    (tmp_path / "no_thinking.jinja").write_text(NO_THINKING)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_pretrained(tmp_path, str(tmp_path / "no_thinking.jinja") if thinking is False
                                     else None)
    kw = {} if thinking is None else {"enable_thinking": thinking}
    for chat in QWEN3_CHATS:
        for gen in (False, True):
            want = ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True,
                                           return_dict=False, **kw)
            got = ours.apply_chat_template(chat, add_generation_prompt=gen)
            assert got == list(want), f"thinking={thinking} gen={gen}: {ours.decode(got, False)!r}"
    assert ours.token_id("<think>") is not None and ours.encode("<think>") == [ours.token_id("<think>")]
    if thinking is False:  # the switch does something: the prompt ends with an empty thinking block
        assert ours.apply_chat_template(CHATS[0], True, tokenize=False).endswith("<think>\n\n</think>\n\n")


def test_qwen3_real_answer_extends_the_generation_prompt(tmp_path):
    # What SPIN trains on: with thinking on (the default), a real answer is rendered after an empty
    # thinking block, which is part of the answer's tokens; with it off, the block is in the prompt.
    from data import encode_answer
    qwen3_tokenizer(tmp_path)
    (tmp_path / "no_thinking.jinja").write_text(NO_THINKING)
    prompt = [{"role": "user", "content": "Name 3 primes."}]
    for template, shown in ((None, "<think>\n\n</think>\n\n2, 3, 5."), (NO_THINKING, "2, 3, 5.")):
        tok = Tokenizer.from_pretrained(tmp_path, template and str(tmp_path / "no_thinking.jinja"))
        p, r = encode_answer(tok, prompt, "2, 3, 5.")
        assert tok.decode(r) == shown and r[-1] == tok.token_id("<|im_end|>")
