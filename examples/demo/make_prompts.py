"""Writes prompts.jsonl: the demo task's prompt set (templates x everyday topics).

Topics, not just prompts, are split between train and held-out, so a held-out prompt never shares
its topic with a training prompt. Re-running gives the same file.
"""

import json
import random
from pathlib import Path

TOPICS = """gardening; baking bread; morning walks; learning a new language; riding a bicycle; visiting a museum;
playing chess; camping in the mountains; cooking pasta; reading novels; birdwatching; painting with watercolors;
going to the beach; growing tomatoes; adopting a dog; keeping a journal; making coffee; swimming; yoga;
running a first 5k; playing the guitar; learning to code; visiting grandparents; volunteering at a shelter;
watching the sunrise; picnics in the park; board game nights; hiking with friends; knitting; photography;
stargazing; making pancakes; planting trees; taking the train; rainy afternoons; writing letters; baking cookies;
snowy mornings; fishing at a lake; building a birdhouse; learning to dance; visiting a farmers market;
playing basketball; a weekend road trip; making soup; organizing a closet; a new houseplant; drinking tea;
flying a kite; autumn leaves; spring flowers; summer festivals; cooking with kids; a library visit; playing piano;
making a smoothie; cleaning the kitchen; a community garden; riding a horse; visiting a zoo; going to a concert;
making pizza at home; starting a podcast; a family dinner; sailing; ice skating; collecting stamps; pottery;
a quiet evening at home; learning to juggle; sunset at the harbor; a morning run; a thank-you note; solving puzzles;
planting herbs on a balcony; a trip to the mountains; making lemonade; a school science fair; a new job;
moving to a new city; a birthday party; a walk in the forest; a road cycling trip; meditation; cooking curry;
visiting an old friend; a rainy-day movie marathon; making a scrapbook; repairing a bike; a farm visit;
feeding ducks at a pond; playing soccer; baking a cake; a snow day; a bookshop; a trip to the seaside;
learning to swim; a neighborhood cleanup; a first camping trip; making breakfast for someone; a quiet library;
a city park; riding a ferry; watching fireworks; a long bath; visiting a lighthouse; making jam; a tennis match""".replace("\n", " ")

TEMPLATES = [
    "Tell me something nice about {t}.",
    "Write two sentences about {t}.",
    "What do you enjoy about {t}?",
    "Give me a short tip about {t}.",
    "Describe {t} in a few words.",
]
HELD_OUT_TOPICS = 20


def topic_list() -> list[str]:
    return [t.strip() for t in TOPICS.split(";") if t.strip()]


def main() -> None:
    topics = topic_list()
    assert len(topics) == len(set(topics)), "duplicate topics"
    rng = random.Random(2026)
    rng.shuffle(topics)
    held = set(topics[:HELD_OUT_TOPICS])
    rows = []
    for t in topics:
        for k, template in enumerate(TEMPLATES):
            rows.append({"id": f"{t.replace(' ', '-')}-{k}", "prompt": template.format(t=t),
                         "split": "eval" if t in held else "train"})
    out = Path(__file__).with_name("prompts.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    n_eval = sum(r["split"] == "eval" for r in rows)
    print(f"{len(rows)} prompts ({len(rows) - n_eval} train, {n_eval} held out) from {len(topics)} topics -> {out}")


if __name__ == "__main__":
    main()
