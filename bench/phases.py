# Where the time of a `spin.py` run went, from what it leaves behind: each progress bar's final elapsed time
# in its log (generate, score, train, the held-out evaluation's generate and score; whole seconds) and its
# metrics.jsonl. The train bar closes after the evaluation that follows its last epoch: its last time
# includes that evaluation.
#   python bench/phases.py RUN_DIR LOG
import json
import os
import re
import sys

BAR = re.compile(r"^(?P<desc>[\w ]+?): +100%\|[^|]*\| (?P<n>\d+)/(?P=n) \[(?P<t>[\d:]+)<")


def seconds(clock):  # tqdm's "MM:SS" or "H:MM:SS"
    s = 0
    for part in clock.split(":"):
        s = 60 * s + int(part)
    return s


def main(run, log):
    with open(log, errors="replace") as f:
        pieces = re.split(r"[\r\n]", f.read())
    bars = []  # a bar's last 100% state (tqdm prints it at the last update and again at close)
    for m in filter(None, map(BAR.match, pieces)):
        if bars and bars[-1][0] == m["desc"]:
            bars.pop()
        bars.append((m["desc"], int(m["n"]), seconds(m["t"])))
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))] \
        if os.path.isfile(os.path.join(run, "metrics.jsonl")) else []
    print("| phase (progress bar) | items | s |\n|---|---|---|")
    for desc, n, t in bars:
        print(f"| {desc} | {n} | {t} |")
    gen = [r for r in rows if r.get("phase") == "generate"]
    steps = [r for r in rows if "step" in r]
    for r in gen:
        print(f"generate: {r['seconds']:.1f} s, {r['gen_tokens_per_s']:.0f} new tokens/s, mean answer "
              f"{r['gen_len']:.0f} tokens, {r['gen_unfinished']:.0%} cut at the cap")
    if steps:
        print(f"train: {len(steps)} steps, first loss {steps[0]['loss']:.4f} (log 2 = 0.6931), last "
              f"{steps[-1]['loss']:.4f}, answer tokens/s per step {steps[0]['tokens_per_s']:.0f} (first), "
              f"{steps[-1]['tokens_per_s']:.0f} (last)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
