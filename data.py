"""Chat data in, SPIN pairs out: the checkpoint's tokenizer and its own chat template.

Part 1, the tokenizer: `tokenizers` does the BPE; the chat template is the checkpoint's own Jinja, rendered
the way `transformers` renders it (sandboxed, trim_blocks + lstrip_blocks, same globals), then encoded
without extra special tokens, so the ids are exactly those of `transformers`' apply_chat_template.
"""
import json
import os
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(t):  # tokenizer_config stores a special token as a string or an AddedToken dict
    return t.get("content") if isinstance(t, dict) else t


def _read_json(file, default=None):
    if not os.path.isfile(file):
        return default
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None


def compile_template(source):
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' override: Jinja's own tojson escapes HTML characters, which changes the text
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


class Tokenizer:
    def __init__(self, tk, config, generation_config=None, chat_template=None, source="tokenizer"):
        # tk: a tokenizers.Tokenizer; config: tokenizer_config.json as a dict; generation_config: its dict.
        self.tk, self.config, self.source = tk, config, source
        self.generation_config = generation_config or {}
        self.special = {n: _token_text(config.get(n)) for n in SPECIAL_NAMES if config.get(n) is not None}
        template = chat_template or config.get("chat_template")
        if isinstance(template, list):  # older format: a list of named templates
            template = {t["name"]: t["template"] for t in template}.get("default")
        self.chat_template = template
        self._compiled = None
        # A checkpoint may stop on several ids (Llama 3: <|eot_id|> and <|end_of_text|>).
        eos = self.generation_config.get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if "eos_token" in self.special and self.token_id(self.special["eos_token"]) is not None:
            eos.append(self.token_id(self.special["eos_token"]))
        self.eos_ids = sorted(set(eos))
        pad = self.special.get("pad_token")
        self.pad_id = self.token_id(pad) if pad else (self.eos_ids[0] if self.eos_ids else 0)

    @classmethod
    def from_pretrained(cls, path, chat_template=None):
        # chat_template: a Jinja string or a .jinja file, for checkpoints that ship none (or to override).
        if chat_template and os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        from tokenizers import Tokenizer as TK
        if str(path).endswith(".gguf"):
            from from_gguf import load_gguf_tokenizer
            tk, config, gen = load_gguf_tokenizer(path)
            return cls(tk, config, gen, chat_template, source=str(path))
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: not found (only fast tokenizers, tokenizer.json, are read)")
        try:
            tk = TK.from_file(file)
        except Exception as e:
            raise ValueError(f"{file}: cannot read tokenizer ({str(e).splitlines()[0]})") from None
        config = _read_json(os.path.join(path, "special_tokens_map.json"), {})
        config.update(_read_json(os.path.join(path, "tokenizer_config.json"), {}))
        jinja_file = os.path.join(path, "chat_template.jinja")  # where transformers 5 saves templates
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                config["chat_template"] = f.read()
        gen = _read_json(os.path.join(path, "generation_config.json"), {})
        return cls(tk, config, gen, chat_template, source=str(path))

    def save_pretrained(self, path):
        # Writes tokenizer files that both this class and transformers' AutoTokenizer read.
        self.tk.save(os.path.join(path, "tokenizer.json"))
        config = {k: v for k, v in self.config.items() if k != "chat_template"}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.update(self.special)
        if self.chat_template:
            config["chat_template"] = self.chat_template
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        if self.generation_config:
            with open(os.path.join(path, "generation_config.json"), "w") as f:
                json.dump(self.generation_config, f, indent=2)

    def token_id(self, text):
        return self.tk.token_to_id(text)

    def encode(self, text, add_special_tokens=False):
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=True):
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render(self, messages, add_generation_prompt=False):
        if not self.chat_template:
            raise ValueError(f"{self.source}: the checkpoint has no chat template; name one with "
                             f"--chat_template FILE")
        if self._compiled is None:
            self._compiled = compile_template(self.chat_template)
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     tools=None, documents=None, **self.special)

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        text = self.render(messages, add_generation_prompt)
        return self.encode(text) if tokenize else text



# ----- Part 2: SFT records in, token pairs out -----
# A record becomes (prompt messages, real answer): the prompt is every turn before the last assistant
# answer. Formats: OpenAI/UltraChat {"messages"}, ShareGPT {"conversations": [{"from", "value"}]},
# Alpaca {"instruction", "input", "output"}, and SPIN's own {"real": [...], "generated": [...]}.

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
         "system": "system"}


def read_json_records(file, stats):
    # Yields (line number, record) from JSONL or from one JSON array. An array cut off mid-record (the
    # ShareGPT wheel's file is) yields every complete record; stats["cut_off"] counts the lost one.
    with open(file, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        dec, i, line, seen = json.JSONDecoder(), text.index("[") + 1, 1, 0
        while True:
            while i < len(text) and text[i] in " \t\r\n,":
                i += 1
            if i >= len(text) or text[i] == "]":
                return
            line, seen = line + text.count("\n", seen, i), i  # count newlines once, for file:line errors
            try:
                obj, end = dec.raw_decode(text, i)
            except json.JSONDecodeError as e:
                if not text.rstrip().endswith("]"):  # the file ends inside this record: it was cut off
                    stats["cut_off"] = 1
                    return
                raise ValueError(f"{file}:{line}: malformed JSON ({e.msg})") from None
            yield line, obj
            i = end
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:  # handed on, so that skip_bad can count it
                    yield n, ValueError(f"malformed JSON ({e.msg})")


def to_pair(rec, first_turn=False):
    # -> (prompt messages, answer text); raises ValueError(why) for a record we cannot use.
    if not isinstance(rec, dict):
        raise ValueError("record is not a JSON object")
    if "real" in rec or "messages" in rec:
        msgs = rec.get("real", rec.get("messages"))
    elif "conversations" in rec:
        msgs = [{"role": ROLES.get(str(m.get("from")).lower(), m.get("from")), "content": m.get("value")}
                for m in rec["conversations"] if isinstance(m, dict)]
    elif "instruction" in rec and "output" in rec:
        user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
    else:
        raise ValueError("no known fields (messages, conversations, instruction/output, real)")
    roles = ("system", "user", "assistant")
    if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in roles
            for m in msgs):
        raise ValueError("messages must be {role: system|user|assistant, content: string} objects")
    answers = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if first_turn:  # the paper's setting: first user turn and the first answer after it
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        answers = [i for i in answers if users and i > users[0]][:1]
    if not answers:
        raise ValueError("no assistant answer")
    i = answers[-1]
    if not msgs[i]["content"].strip():
        raise ValueError("empty answer")
    if not any(m["role"] == "user" for m in msgs[:i]):
        raise ValueError("no user turn before the answer")
    return [{"role": m["role"], "content": m["content"]} for m in msgs[:i]], msgs[i]["content"]


def read_pairs(file, first_turn=False, skip_bad=False, keep=None):
    # -> list of (prompt messages, answer), stats. A bad record is a one-line error naming file:line,
    # or with skip_bad a counted skip. keep(prompt, answer) -> bool filters (counted as "filtered").
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: not found")
    pairs, stats = [], {"records": 0, "skipped": 0, "filtered": 0, "cut_off": 0}
    for line, rec in read_json_records(file, stats):
        stats["records"] += 1
        try:
            if isinstance(rec, ValueError):
                raise rec
            prompt, answer = to_pair(rec, first_turn)
        except (ValueError, TypeError, AttributeError) as e:
            if not skip_bad:
                raise ValueError(f"{file}:{line}: {e}") from None
            stats["skipped"] += 1
            continue
        if keep is not None and not keep(prompt, answer):
            stats["filtered"] += 1
            continue
        pairs.append((prompt, answer))
    return pairs, stats


def is_english(text, min_ascii=0.95):
    return sum(c.isascii() for c in text) >= min_ascii * len(text)


def encode_answer(tok, prompt, answer):
    # Prompt ids (chat template + generation prompt) and the answer's ids as the template renders them,
    # cut after the first stop token: exactly what the sampler produces for a generated answer, so real
    # and generated answers are tokenised the same way (the paper's code did not do this).
    p = tok.apply_chat_template(prompt, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": answer}])
    if full[:len(p)] != p:
        raise ValueError(f"{tok.source}: chat template: a rendered answer does not extend the generation "
                         f"prompt")
    r = full[len(p):]
    stop = next((i for i, t in enumerate(r) if t in tok.eos_ids), None)
    return p, r if stop is None else r[:stop + 1]


def truncate(p, r, max_length, max_prompt_length):
    # The reference's policy: keep the END of a long prompt, then cut the answer to fit max_length.
    cut_p, cut_r = len(p) > max_prompt_length, len(p[-max_prompt_length:]) + len(r) > max_length
    p = p[-max_prompt_length:]
    return p, r[:max_length - len(p)], cut_p, cut_r


def collate(seqs, pad_id, device=None):
    # seqs: list of (prompt ids, response ids) -> tokens (B, T) right-padded, targets (B, T) with the
    # next token at response positions and -100 elsewhere (prompt and padding are out of the loss).
    import torch
    T = max(len(p) + len(r) for p, r in seqs)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        tokens[i, :len(p) + len(r)] = torch.tensor(p + r)
        targets[i, len(p) - 1:len(p) + len(r) - 1] = torch.tensor(r)
    return tokens.to(device), targets.to(device)
