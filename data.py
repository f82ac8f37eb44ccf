"""Chat data in, SPIN pairs out: the checkpoint's tokenizer and its own chat template.

Part 1, the tokenizer: `tokenizers` does the BPE; the chat template is the checkpoint's own Jinja, rendered
the way `transformers` renders it (sandboxed, trim_blocks + lstrip_blocks, same globals), then encoded
without extra special tokens, so the ids are exactly those of `transformers`' apply_chat_template.
"""
import fnmatch
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
        self.chat_template, self._compiled = template, None
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
            return cls(*load_gguf_tokenizer(path), chat_template, source=str(path))
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

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        if not self.chat_template:
            raise ValueError(f"{self.source}: the checkpoint has no chat template; name one with "
                             f"--chat_template FILE")
        if self._compiled is None:
            self._compiled = compile_template(self.chat_template)
        text = self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     tools=None, documents=None, **self.special)
        return self.encode(text) if tokenize else text


# ----- Part 2: SFT records in, token pairs out -----
# --data names JSON, JSONL or parquet files (or a folder, or a hub dataset and its split), whose records
# are read one by one. A record becomes (prompt messages, real answer): the prompt is every turn before
# the last assistant answer. Formats: OpenAI/UltraChat {"messages"}, ShareGPT {"conversations": [{"from",
# "value"}]}, Alpaca {"instruction", "input", "output"}, and SPIN's own {"real": [...], "generated": [...]}.

ROLES = {"human": "user", "user": "user", "system": "system",
         **dict.fromkeys(("gpt", "assistant", "chatgpt", "bard", "bing", "model"), "assistant")}
DATA_EXT = (".parquet", ".jsonl", ".json")
FIELDS = ("messages", "conversations", "real", "instruction", "input", "output")  # what to_pair reads


def split_patterns(split):
    # Where datasets on the hub keep a split's files: data/train_sft-00000-of-00003-<hash>.parquet (as
    # push_to_hub writes them), default/train_sft/0000.parquet (the hub's conversion), train.jsonl, ...
    forms = (f"{split}-*", f"*/{split}-*", split, f"*/{split}", f"*_{split}", f"{split}/*", f"*/{split}/*")
    return [form + ext for form in forms for ext in DATA_EXT]


def data_files(data, split=""):
    # --data -> the files to read, in order: a file; several, comma-separated; a folder (its data files,
    # or the split's); a hub dataset id "org/name[@revision]": only its split's files (split "" = train)
    # are fetched into the hub's cache, through the same function as a model id.
    data = os.fspath(data)
    if os.path.isfile(data):
        return [data]
    if "," in data and not os.path.isdir(data):
        return [f for part in data.split(",") for f in data_files(part, split)]
    from model import HUB_ID, hub_snapshot
    if os.path.isdir(data):
        folder = data
    elif HUB_ID.fullmatch(data):
        split = split or "train"
        folder = hub_snapshot(data, "dataset", split_patterns(split))
    else:
        raise FileNotFoundError(f"{data}: not found: neither a data file, a folder nor a hub dataset id "
                                f"(org/name or org/name@revision)")
    found = sorted(os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
                   for d, _, names in os.walk(folder) for f in names if f.endswith(DATA_EXT))
    files = [f for f in found if not split or any(fnmatch.fnmatch(f, p) for p in split_patterns(split))]
    if not files:
        what = f"files of split {split!r} ({split}-*.parquet, {split}.jsonl, ...)" if split else "data files"
        seen = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise FileNotFoundError(f"{data}: no {what} (.parquet, .jsonl, .json); found: {seen or 'none'}")
    return [os.path.join(folder, f) for f in files]


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


def read_parquet_records(file):
    # Yields ("row i", record) from a parquet file, i counted from 0 as the hub's viewer and pandas show
    # it. Only the columns to_pair reads are loaded, whole (a bad file fails here, not mid-run); rows
    # become Python objects a batch at a time.
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{file}: parquet files need pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(file)
        names = pf.schema_arrow.names
        table = pf.read(columns=[c for c in names if c in FIELDS])
    except Exception as e:  # not parquet, truncated, corrupt: one line naming the file
        raise ValueError(f"{file}: cannot read parquet file ({(str(e).splitlines() or [''])[0]})") from None
    if not (set(names) & {"messages", "conversations", "real"} or {"instruction", "output"} <= set(names)):
        raise ValueError(f"{file}: no columns of a known format (messages, conversations, real, or "
                         f"instruction + output); it has {', '.join(names)}")
    rows = (rec for batch in table.to_batches(max_chunksize=1024) for rec in batch.to_pylist())
    yield from ((f"row {i}", rec) for i, rec in enumerate(rows))


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
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                             and m.get("role") in roles for m in msgs):
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


def read_pairs(data, first_turn=False, skip_bad=False, keep=None, split=""):
    # data: what --data takes (data_files) -> list of (prompt messages, answer), stats. A bad record is a
    # one-line error naming file:line (file:row i in parquet), or with skip_bad a counted skip.
    # keep(prompt, answer) -> bool filters (counted as "filtered").
    pairs, stats = [], {"records": 0, "skipped": 0, "filtered": 0, "cut_off": 0}
    for file in data_files(data, split):
        records = read_parquet_records(file) if file.endswith(".parquet") else read_json_records(file, stats)
        for line, rec in records:
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
    # and generated answers are tokenised the same way. (The reference scores the template's text after
    # the answer too, plus one more EOS: docs/departures.md.)
    p = tok.apply_chat_template(prompt, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": answer}])
    if full[:len(p)] != p:
        raise ValueError(f"{tok.source}: chat template: a rendered answer does not extend the generation "
                         f"prompt")
    r = full[len(p):]
    stop = next((i for i, t in enumerate(r) if t in tok.eos_ids), None)
    return p, r if stop is None else r[:stop + 1]


def truncate(p, answers, max_length, max_prompt_length):
    # The reference's rule (its DataCollatorWithPadding, TRL's classic tokenize_row), for a prompt and the
    # answers that share it: only when the prompt and its LONGEST answer exceed max_length, the prompt keeps
    # its last max_prompt_length tokens; if that is still too long, every answer is cut to max_length -
    # max_prompt_length (whatever the prompt's length). -> prompt, answers, whether anything was cut
    longest = max(map(len, answers))
    if len(p) + longest <= max_length:
        return p, answers, False
    p = p[-max_prompt_length:]
    if len(p) + longest > max_length:
        answers = [r[:max_length - max_prompt_length] for r in answers]
    return p, answers, True


def pack(groups, rows, pad_id, device=None, length=None):
    # groups: (prompt ids, [answer ids, ...]) with the same number A of answers each; rows: lists of
    # indices into groups, one list per packed row. Each group is laid out once as [prompt | answer 1 |
    # answer 2 | ...]: every answer sees the prompt and itself, never another answer or group, and its
    # positions continue from the prompt's end, as if it were its own sequence (model.forward's layout).
    # -> tokens (B, T); layout (pos, doc, branch) (B, T) each; targets (index (n,), ids (n,)): answer
    # token ids[k] is predicted at flattened position index[k] (an answer's first token at its prompt's
    # last position, which all the group's answers share); owner (n,): target k belongs to answer
    # g * A + a of group g, so `zeros(len(groups) * A).index_add_(0, owner, logp)` sums log p(answer).
    # Rows are right-padded to the longest, or to `length` (a fixed shape for compiled kernels).
    import torch
    A = len(groups[0][1])
    T = max([length or 0] + [sum(len(groups[g][0]) + sum(map(len, groups[g][1])) for g in row)
                             for row in rows])
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    doc = torch.full_like(tokens, -1)  # padding: doc -1, each padding token sees only itself
    pos, branch = torch.zeros_like(tokens), torch.zeros_like(tokens)
    index, ids, owner = [], [], []
    for b, row in enumerate(rows):
        at = 0
        for d, g in enumerate(row, 1):
            prompt, answers = groups[g]
            assert len(answers) == A, "every group needs the same number of answers"
            P, end = len(prompt), at + len(prompt)
            tokens[b, at:end], pos[b, at:end], doc[b, at:end] = torch.tensor(prompt), torch.arange(P), d
            for a, r in enumerate(answers, 1):
                R = len(r)
                tokens[b, end:end + R], doc[b, end:end + R], branch[b, end:end + R] = torch.tensor(r), d, a
                pos[b, end:end + R] = torch.arange(P, P + R)
                # the token at answer position k is predicted from position k - 1 (the prompt's last for k=0)
                if R:
                    index += [b * T + at + P - 1] + list(range(b * T + end, b * T + end + R - 1))
                ids += r
                owner += [g * A + a - 1] * R
                end += R
            at = end
    index, ids, owner = (torch.tensor(x, dtype=torch.long, device=device) for x in (index, ids, owner))
    return tokens.to(device), (pos.to(device), doc.to(device), branch.to(device)), (index, ids), owner
