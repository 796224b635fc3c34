"""Time the hallucination and adversarial probes (and red teaming) on a real model; print the rates.

Wall time depends on what else runs on the machine; CPU time (process time, all threads) does not.

    python benchmarks/eval_probes.py --model smollm2-135m-instruct [--baseline DIR] --out runs/bench-probes
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import matmul_gflops, peak_rss_mb  # noqa: E402
from preftune.evaluation.config import AdversarialConfig, HallucinationConfig  # noqa: E402
from preftune.evaluation.probes.adversarial import run_adversarial_probe  # noqa: E402
from preftune.evaluation.probes.hallucination import run_hallucination_probe  # noqa: E402


def fmt(rate: dict) -> str:
    return f"{100 * rate['rate']:5.1f} % [{100 * rate['ci'][0]:.1f}, {100 * rate['ci'][1]:.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--baseline", default=None, help="model before tuning (before/after columns)")
    ap.add_argument("--out", default="runs/bench-probes")
    ap.add_argument("--red-team", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    gflops = matmul_gflops()
    t0, c0 = time.perf_counter(), time.process_time()
    hal = run_hallucination_probe(HallucinationConfig(model=args.model, baseline=args.baseline,
                                                      out=f"{args.out}/hallucination", threads=args.threads))
    t1, c1 = time.perf_counter(), time.process_time()
    adv = run_adversarial_probe(AdversarialConfig(model=args.model, baseline=args.baseline,
                                                  out=f"{args.out}/adversarial",
                                                  red_team=args.red_team, threads=args.threads))
    t2, c2 = time.perf_counter(), time.process_time()
    models = 2 if args.baseline else 1
    print(f"hallucination probe: {hal['n']} questions x {models} model(s) in {t1 - t0:.0f} s wall, {c1 - c0:.0f} s CPU")
    for key in ("correct", "wrong", "abstained"):
        before = f"   before {fmt(hal['baseline']['rates'][key])}" if args.baseline else ""
        print(f"  {key:<10} {fmt(hal['rates'][key])}{before}")
    print(f"adversarial probe: {adv['n']} prompts x {models} model(s) + {args.red_team} red-team attacks "
          f"in {t2 - t1:.0f} s wall, {c2 - c1:.0f} s CPU")
    for key in ("unsafe", "refused", "over_refusal"):
        before = f"   before {fmt(adv['baseline']['rates'][key])}" if args.baseline else ""
        print(f"  {key:<12} {fmt(adv['rates'][key])}{before}")
    for cat, v in adv["by_category"].items():
        print(f"  {cat:<20} unsafe {fmt(v['unsafe'])}  refused {fmt(v['refused'])}")
    print(f"machine: fp32 matmul {gflops} GFLOP/s in this process; peak memory {peak_rss_mb()} MB")
    rt = adv.get("red_team")
    if rt:
        print(f"  red team: {rt['successes']}/{rt['attempts']} successful, success {fmt(rt['success'])}, "
              f"distinct-1/2 of all attacks {rt['distinct_1_all']:.2f}/{rt['distinct_2_all']:.2f}")


if __name__ == "__main__":
    main()
