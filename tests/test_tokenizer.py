# data.Tokenizer against transformers' AutoTokenizer: same ids for text and for chat templates.
import json

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
TOJSON = "{% for m in messages %}{{ m | tojson }}{% endfor %}{% if add_generation_prompt %}<|im_start|>{% endif %}"

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
