"""OUT, a run's folder: one run at a time, what is complete, the logs, and the held-out evaluation read back.

OUT/iter{t}/model is renamed into place last, so iteration t is complete exactly when it exists: a run
started again on the same OUT goes on from the first incomplete iteration and decides as an uninterrupted
run would (the stop rule reads eval.jsonl only: a row per iteration and epoch, epoch 0 the iteration's
start model, "chosen" the row each complete iteration kept). Rank 0 writes; every rank reads what it read.
"""
import fcntl
import json
import os

import torch
import torch.distributed as dist


def write_jsonl(path, rows):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def from_rank0(obj):  # rank 0's obj, on every rank
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class RunDir:
    def __init__(self, path):
        # One run per OUT: rank 0 holds an flock on OUT/.lock while it lives. The kernel drops it when the
        # process ends, however it ends, so a killed run never leaves it stuck.
        self.path, self.rank0, self.lock = path, dist.get_rank() == 0, None
        if self.rank0:
            os.makedirs(path, exist_ok=True)
            self.lock = open(os.path.join(path, ".lock"), "a")
            try:
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.lock = None
        if not from_rank0(self.lock is not None):
            raise ValueError(f"{path}: another spin.py is running on this --out (it holds {path}/.lock)")

    def file(self, t, name):  # OUT/iter{t}/name
        os.makedirs(f"{self.path}/iter{t}", exist_ok=True)
        return f"{self.path}/iter{t}/{name}"

    def resume(self, iterations):
        # -> the first incomplete iteration. Its logs from an interrupted attempt are dropped (it runs
        # again), except its generate phase's when its answers were written (they are kept).
        start = next((t for t in range(iterations)
                      if not os.path.isfile(f"{self.path}/iter{t}/model/config.json")), iterations)
        if self.rank0:
            generated = os.path.isfile(f"{self.path}/iter{start}/generated.jsonl")
            for name in ("metrics.jsonl", "eval.jsonl"):
                if os.path.isfile(f"{self.path}/{name}"):
                    write_jsonl(f"{self.path}/{name}", [
                        r for r in read_jsonl(f"{self.path}/{name}") if r["iter"] < start or
                        (generated and r["iter"] == start and r.get("phase") == "generate")])
        dist.barrier()
        return start

    def log(self, row, name="metrics.jsonl"):
        if self.rank0:
            with open(f"{self.path}/{name}", "a") as f:
                f.write(json.dumps(row) + "\n")

    def eval_rows(self):  # eval.jsonl, on every rank
        file = f"{self.path}/eval.jsonl"
        return from_rank0(read_jsonl(file) if self.rank0 and os.path.isfile(file) else [])

    def keep(self, t, epoch, state):
        # Iteration t keeps `epoch`: its held-out state (the next iteration's start) and its "chosen" mark.
        if self.rank0:
            torch.save(state, self.file(t, "eval_state.pt.tmp"))
            os.replace(self.file(t, "eval_state.pt.tmp"), self.file(t, "eval_state.pt"))
            rows = read_jsonl(f"{self.path}/eval.jsonl")
            write_jsonl(f"{self.path}/eval.jsonl", [
                {**r, "chosen": r["chosen"] or (r["iter"], r["epoch"]) == (t, epoch)} for r in rows])

    def kept(self, t):  # the held-out state iteration t kept
        return torch.load(self.file(t, "eval_state.pt"), weights_only=True)


def stop_rule(rows, cfg):
    # rows: eval.jsonl, one kept ("chosen") row per complete iteration. Stop once `patience` iterations in a
    # row fail to beat the best held-out nll_real so far (the start model's first) by stop_margin.
    best, bad = None, 0
    for t in sorted({r["iter"] for r in rows if r["chosen"]}):
        kept = next(r["nll_real"] for r in rows if r["iter"] == t and r["chosen"])
        best = {r["epoch"]: r["nll_real"] for r in rows if r["iter"] == t}[0] if best is None else best
        best, bad = (kept, 0) if kept < best - cfg.stop_margin else (best, bad + 1)
    return cfg.select_epoch and bad >= cfg.patience


def report(rows, out):
    print("\niter  epoch  nll_real  gap      gen_len  cut    acc    margin")
    for r in rows:
        acc = "  -  " if r["acc"] is None else f"{r['acc']:.3f}"
        mar = "  -  " if r["margin"] is None else f"{r['margin']:+.3f}"
        print(f"{r['iter']:4d}  {r['epoch']:5d}  {r['nll_real']:.4f}    {r['gap']:+.3f}   "
              f"{r['gen_len']:6.1f}   {r['gen_unfinished']:.2f}   {acc}  {mar}{'  *' if r['chosen'] else ''}")
    print("(* = kept: the start of the next iteration)")
    try:
        from matplotlib.figure import Figure  # no pyplot: nothing global to switch, nothing left open
    except ImportError:
        return print("(pip install matplotlib for eval.png)")
    epochs = max(r["epoch"] for r in rows) or 1
    fig = Figure(figsize=(16, 3), layout="tight")
    for ax, key in zip(fig.subplots(1, 4), ["nll_real", "gap", "gen_len", "acc"]):
        pts = [(r["iter"] + r["epoch"] / epochs, r[key], r["chosen"]) for r in rows if r[key] is not None]
        if pts:
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker=".", color="C0")
            ax.plot([x for x, _, c in pts if c], [y for _, y, c in pts if c], "*", color="C3", ms=12)
        ax.set(title=key, xticks=range(max(r["iter"] for r in rows) + 2),
               xlabel="iteration (epochs between; * = kept)")
    fig.savefig(f"{out}/eval.tmp.png")
    os.replace(f"{out}/eval.tmp.png", f"{out}/eval.png")
