"""Writes the bundled sample datasets in data/ (deterministic; re-run after editing the lists below).

    python data/build_samples.py

- instructions_alpaca.json / instructions_sharegpt.json / instructions_messages.jsonl:
  the same small instruction set in the three common chat-data formats.
- sentiment_train.jsonl / sentiment_heldout.jsonl: the synthetic task (prompt/completion).
  A review's label is decided by its adjective; the held-out split pairs the adjectives with
  subjects and templates never seen in training, so a score there measures learning, not recall.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

INSTRUCTIONS = [
    ("Name the capital of France.", "", "The capital of France is Paris."),
    ("Translate to Spanish.", "Good morning", "Buenos días."),
    ("Give the opposite of the word.", "hot", "cold"),
    ("Add the two numbers.", "12 and 30", "12 + 30 = 42."),
    (
        "Summarize in one sentence.",
        "The meeting moved from Monday to Wednesday because the room was booked.",
        "The meeting is now on Wednesday since the room was taken on Monday.",
    ),
    ("What is LoRA?", "", "LoRA freezes the base weights W0 and learns a low-rank update B·A, scaled by alpha/r."),
    (
        "Write a haiku about rain.",
        "",
        "Soft rain on the roof,\nthe garden drinks quietly,\nclouds hum their long song.",
    ),
    ("Convert to uppercase.", "workbench", "WORKBENCH"),
    ("List three primary colors.", "", "Red, blue and yellow."),
    ("Is the number even or odd?", "17", "17 is odd."),
    ("Fix the grammar.", "she go to school every days", "She goes to school every day."),
    (
        "Explain QLoRA in one sentence.",
        "",
        "QLoRA stores the frozen base in 4-bit NF4, computes in bf16 and trains LoRA adapters on top.",
    ),
    ("Count the words.", "the quick brown fox", "There are 4 words."),
    ("Reverse the word.", "stressed", "desserts"),
    ("Name a mammal that can fly.", "", "The bat."),
    ("What does a tokenizer do?", "", "It splits text into tokens and maps each token to an integer id."),
    ("Give a synonym.", "happy", "joyful"),
    ("Convert Celsius to Fahrenheit.", "100 C", "100 C is 212 F."),
    ("Sort the numbers.", "5, 2, 9, 1", "1, 2, 5, 9"),
    ("Answer yes or no: is water wet?", "", "Yes."),
    ("Write a short greeting for an email.", "", "Hello, I hope this message finds you well."),
    ("What is the plural?", "mouse", "mice"),
    ("Describe the sky on a clear day.", "", "Bright blue, with the sun shining and no clouds."),
    ("Multiply the numbers.", "7 and 6", "7 x 6 = 42."),
    ("Which planet is known as the red planet?", "", "Mars."),
    ("Give an example of a prime number above 10.", "", "11 is a prime number."),
    ("Complete the sentence.", "An apple a day", "An apple a day keeps the doctor away."),
    (
        "What is gradient accumulation?",
        "",
        "Summing gradients over several small batches before one optimizer step, to mimic a larger batch.",
    ),
    ("Classify the animal.", "salmon", "A salmon is a fish."),
    ("Turn the sentence into a question.", "The store is open.", "Is the store open?"),
    (
        "What does rank r control in LoRA?",
        "",
        "The width of the low-rank matrices: a larger r means more trainable parameters and capacity.",
    ),
    ("Name the largest ocean.", "", "The Pacific Ocean."),
]

SUBJECTS_TRAIN = [
    "food",
    "movie",
    "hotel",
    "service",
    "phone",
    "book",
    "concert",
    "coffee",
    "game",
    "room",
    "staff",
    "music",
    "pizza",
    "flight",
    "camera",
    "laptop",
]
SUBJECTS_HELDOUT = ["museum", "bakery", "train", "jacket", "garden", "podcast"]
POSITIVE = ["great", "wonderful", "excellent", "lovely", "amazing", "superb"]
NEGATIVE = ["awful", "terrible", "horrible", "dreadful", "boring", "bad"]
TEMPLATES_TRAIN = ["The {s} was {a}.", "Honestly, the {s} was {a}.", "I thought the {s} was {a}."]
TEMPLATES_HELDOUT = ["Our {s} felt {a}.", "That {s}? Simply {a}."]


def alpaca_rows() -> list[dict]:
    return [{"instruction": i, "input": x, "output": o} for i, x, o in INSTRUCTIONS]


def user_text(instruction: str, inp: str) -> str:
    return f"{instruction}\n\n{inp}" if inp else instruction


def sharegpt_rows() -> list[dict]:
    return [
        {"conversations": [{"from": "human", "value": user_text(i, x)}, {"from": "gpt", "value": o}]}
        for i, x, o in INSTRUCTIONS
    ]


def messages_rows() -> list[dict]:
    system = {"role": "system", "content": "You are a concise assistant."}
    return [
        {"messages": [system, {"role": "user", "content": user_text(i, x)}, {"role": "assistant", "content": o}]}
        for i, x, o in INSTRUCTIONS
    ]


def sentiment_rows(subjects: list[str], templates: list[str], rng: random.Random) -> list[dict]:
    rows = []
    for s in subjects:
        for t in templates:
            for label, adjectives in (("positive", POSITIVE), ("negative", NEGATIVE)):
                for a in adjectives:
                    review = t.format(s=s, a=a)
                    rows.append({"prompt": f"Review: {review}\nSentiment:", "completion": f" {label}"})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(0)
    (HERE / "instructions_alpaca.json").write_text(json.dumps(alpaca_rows(), indent=1, ensure_ascii=False) + "\n")
    (HERE / "instructions_sharegpt.json").write_text(json.dumps(sharegpt_rows(), indent=1, ensure_ascii=False) + "\n")
    write_jsonl(HERE / "instructions_messages.jsonl", messages_rows())
    write_jsonl(HERE / "sentiment_train.jsonl", sentiment_rows(SUBJECTS_TRAIN, TEMPLATES_TRAIN, rng))
    heldout = sentiment_rows(SUBJECTS_HELDOUT, TEMPLATES_HELDOUT, rng)[:48]
    write_jsonl(HERE / "sentiment_heldout.jsonl", heldout)


if __name__ == "__main__":
    main()
