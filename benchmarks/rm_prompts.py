"""More prompts for the reward-model benchmark: the demo's topics under five further templates.

``examples/demo/prompts.jsonl`` asks about 108 everyday topics in 5 ways (540 prompts); this writes
the same topics in 5 other ways, so ``cat`` of both files gives 1,080 distinct prompts. Used to
measure how held-out reward-model accuracy grows with the number of prompts
(``docs/benchmarks.md``). Re-running gives the same file.

    python benchmarks/rm_prompts.py --out runs/rm-prompts-extra.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "demo"))

from make_prompts import TEMPLATES, topic_list  # noqa: E402

EXTRA_TEMPLATES = [
    "Share a happy thought about {t}.",
    "Why might someone love {t}?",
    "Write a short, friendly note about {t}.",
    "What is one good thing about {t}?",
    "Explain briefly why {t} can be fun.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    assert not set(EXTRA_TEMPLATES) & set(TEMPLATES)
    topics = topic_list()
    rows = [{"id": f"{t.replace(' ', '-')}-x{k}", "prompt": template.format(t=t)}
            for t in topics for k, template in enumerate(EXTRA_TEMPLATES)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} prompts from {len(topics)} topics -> {args.out}")


if __name__ == "__main__":
    main()
