"""Reading a run's held-out evaluation: the stop rule, the end-of-run table and eval.png.

eval.jsonl holds one row per iteration and epoch (epoch 0 = the iteration's start model); "chosen" marks
the row each complete iteration kept as the next one's start. Pure functions of those rows, so a
resumed run decides exactly as an uninterrupted one.
"""
import os


def stop_rule(rows, cfg):
    # rows: eval.jsonl; each complete iteration has one kept ("chosen") row. The run ends once `patience`
    # iterations in a row failed to beat the best held-out nll_real so far (the start model's first) by
    # stop_margin.
    best, bad = None, 0
    for t in sorted({r["iter"] for r in rows if r["chosen"]}):
        its = {r["epoch"]: r["nll_real"] for r in rows if r["iter"] == t}
        kept = next(r["nll_real"] for r in rows if r["iter"] == t and r["chosen"])
        best = its[0] if best is None else best
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
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("(pip install matplotlib for eval.png)")
    epochs = max(r["epoch"] for r in rows) or 1
    keys = ["nll_real", "gap", "gen_len", "acc"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, key in zip(axes, keys):
        pts = [(r["iter"] + r["epoch"] / epochs, r[key], r["chosen"]) for r in rows if r[key] is not None]
        if pts:
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker=".", color="C0")
            ax.plot([x for x, _, c in pts if c], [y for _, y, c in pts if c], "*", color="C3", ms=12)
        ax.set_title(key)
        ax.set_xticks(range(max(r["iter"] for r in rows) + 2))
        ax.set_xlabel("iteration (epochs between; * = kept)")
    fig.tight_layout()
    fig.savefig(f"{out}/eval.tmp.png")
    os.replace(f"{out}/eval.tmp.png", f"{out}/eval.png")
