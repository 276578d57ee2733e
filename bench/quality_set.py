"""Build the preference set of the quality benchmark (``bench/quality.py``) into ``bench/quality-data/``.

    python bench/quality_set.py                 # train (200 pairs), test (60 pairs), regression (40 clips)
    python bench/quality_set.py --multilingual  # also regression-multilingual.jsonl: English, German, Spanish, French
    python bench/quality_set.py --force         # build again

What it is: **synthetic speech**. Everyday English sentences from a template grammar (fixed seed; no test
sentence is a training sentence), spoken by espeak-ng with rotating voices and speeds, then passed once through
the trainer's own augmentation (``orpo.data.augment``: white noise at 10-30 dB SNR and gain of -6..6 dB, each on
about half the clips), stored as 16 kHz FLAC. The rejected transcript is the base model's own error: make-pairs
(the code of ``whisper-orpo make-pairs``) decodes every clip with Whisper tiny.en, beam 5, and keeps the best
hypothesis that differs from the sentence after Whisper's normaliser. Where every hypothesis is right, a rule
makes a realistic ASR-style error instead (a homophone, a dropped or doubled short word, a wrong number, a
near-sounding word); ``rejected_from`` says which ("model" or "rule").

The regression split is general speech the training never sees: the demo's hand-written sentences
(``examples/demo``), spoken by voices that no training or test clip uses. With ``--multilingual`` it gains
German, Spanish and French sentences (espeak-ng voices de, es, fr) for the multilingual base model.

Needs espeak-ng (``apt-get install espeak-ng``) and models/whisper-tiny.en (``bash scripts/setup.sh``). Built
into a staging folder and renamed into place. About 6 minutes on a 2-core CPU (mostly the beam search).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples" / "demo"))

import make_demo  # noqa: E402  (the demo's espeak-ng synthesis and its sentences)

from orpo.data.normalize import TextNormalizer  # noqa: E402

OUT = ROOT / "bench" / "quality-data"
SEED = 1234
SIZES = {"train": 200, "test": 60}
REGRESSION_CLIPS = 40
TRAIN_VOICES = ["en-us", "en-gb", "en-gb-x-rp", "en-us+f3", "en-gb+m3", "en-us+m5", "en-029+f2"]
REGRESSION_VOICES = ["en-gb-scotland", "en-gb-x-gbclan+f4", "en-us+m2", "en-gb-x-gbcwmd+f1"]
AUGMENT = {"noise": {"p": 0.5, "snr_db": [10, 30]}, "gain": {"p": 0.5, "db": [-6, 6]}}

NAMES = ["Anna", "Peter", "Maria", "James", "Sarah", "David", "Laura", "Thomas", "Emily", "Daniel", "Grace", "Oliver"]
PLACES = ["the station", "the library", "the market", "the office", "the airport", "the hospital", "the park",
          "the school", "the bakery", "the museum", "the harbour", "the stadium"]  # fmt: skip
OBJECTS = ["the red bicycle", "a heavy box", "the old piano", "two tickets", "a new phone", "the kitchen table",
           "three letters", "the blue umbrella", "a cup of tea", "the weekly report", "some fresh bread",
           "the keys"]  # fmt: skip
VERBS = ["carried", "found", "sold", "painted", "bought", "fixed", "left", "brought", "moved", "cleaned"]
TIMES = ["on Monday", "last night", "this morning", "before lunch", "after the storm", "on Friday evening",
         "at eight o'clock", "next week", "in the spring", "every Sunday"]  # fmt: skip
TEMPLATES = [
    "{name} {verb} {object} to {place} {time}.",
    "{time_cap}, {name} {verb} {object} near {place}.",
    "Did {name} really leave {object} at {place} {time}?",
    "We waited for {name} outside {place} for {number} minutes.",
    "{name} said the train to {place_bare} leaves at {hour} {time}.",
    "There were {number} people waiting at {place} {time}.",
    "Please ask {name} to bring {object} to {place}.",
    "I think {name} knows where {object} went {time}.",
]
OTHER_LANGUAGES = {
    "German": ("de", ["Der Zug nach Berlin fährt um acht Uhr ab.", "Meine Schwester wohnt in einem kleinen Haus.",
                      "Wir haben gestern im Park Fußball gespielt.", "Kannst du mir bitte das Salz geben?",
                      "Das Wetter ist heute sehr schön.", "Ich habe das Buch in der Bibliothek gefunden.",
                      "Der Arzt hat ihm viel Wasser empfohlen.", "Um zwölf Uhr essen wir zu Mittag."]),
    "Spanish": ("es", ["El tren sale de la estación a las ocho.", "Mi hermana vive en una casa pequeña.",
                       "Ayer jugamos al fútbol en el parque.", "¿Puedes pasarme la sal, por favor?",
                       "Hoy hace muy buen tiempo en la ciudad.", "Encontré el libro en la biblioteca.",
                       "El médico le dijo que bebiera más agua.", "Comemos juntos todos los domingos."]),
    "French": ("fr", ["Le train pour Paris part à huit heures.", "Ma sœur habite dans une petite maison.",
                      "Hier nous avons joué au football dans le parc.", "Peux-tu me passer le sel, s'il te plaît?",
                      "Il fait très beau aujourd'hui.", "J'ai trouvé le livre à la bibliothèque.",
                      "Le médecin lui a dit de boire plus d'eau.", "Nous mangeons ensemble tous les dimanches."]),
}  # fmt: skip
# Rules for an ASR-style error where the model made none: (word, replacement), tried in this order.
SWAPS = [("their", "there"), ("two", "to"), ("to", "two"), ("for", "four"), ("week", "weak"), ("write", "right"),
         ("the", "a"), ("a", "the"), ("at", "and"), ("leaves", "leave"), ("minutes", "minute"), ("people", "peoples"),
         ("said", "says"), ("knows", "know"), ("bread", "red"), ("keys", "peas"), ("tea", "team")]  # fmt: skip


def sentence(rng: random.Random) -> str:
    place = rng.choice(PLACES)
    time = rng.choice(TIMES)
    return rng.choice(TEMPLATES).format(
        name=rng.choice(NAMES),
        verb=rng.choice(VERBS),
        object=rng.choice(OBJECTS),
        place=place,
        place_bare=place.removeprefix("the ").capitalize(),
        time=time,
        time_cap=time[0].upper() + time[1:],
        number=rng.choice(["two", "five", "twelve", "twenty", "forty", "a hundred"]),
        hour=rng.choice(["six", "seven thirty", "nine fifteen", "ten", "half past four"]),
    )


def sentences(seed: int = SEED) -> dict[str, list[str]]:
    """Distinct sentences for each split; no test sentence is a training one."""
    rng, seen, splits = random.Random(seed), set(), {}
    for split, size in SIZES.items():
        chosen = []
        while len(chosen) < size:
            text = sentence(rng)
            if text not in seen:
                seen.add(text)
                chosen.append(text)
        splits[split] = chosen
    return splits


def rule_error(text: str, seed: int) -> str:
    """A realistic ASR-style error of ``text`` that reads differently after Whisper's normaliser: the first
    applicable word swap (homophones, near-sounding words, a wrong article or ending), else a dropped word."""
    normalize = TextNormalizer()
    words = text.split()
    rng = random.Random(seed)
    for word, replacement in rng.sample(SWAPS, len(SWAPS)):
        spots = [i for i, w in enumerate(words) if w.lower().strip(".,?!") == word]
        if spots:
            i = rng.choice(spots)
            tail = words[i][len(word) :]
            candidate = " ".join(words[:i] + [replacement + tail] + words[i + 1 :])
            if normalize(candidate, "en") != normalize(text, "en"):
                return candidate
    i = rng.randrange(1, len(words) - 1)
    return " ".join(words[:i] + words[i + 1 :])


def speak(rows: list[dict], folder: Path, augment) -> None:
    """Synthesise every row's text into ``folder/audio`` and set its audio path and duration."""
    import numpy as np
    import soundfile as sf

    (folder / "audio").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for index, row in enumerate(tqdm(rows, desc=f"espeak-ng ({folder.name})")):
            path = folder / "audio" / f"{row.pop('name')}.flac"
            make_demo.synthesize(row["text"], row["voice"], row["wpm"], path, Path(tmp))
            if augment is not None:
                audio, rate = sf.read(str(path), dtype="float32")
                audio = np.clip(augment(audio, index), -1.0, 1.0)
                sf.write(str(path), audio, rate, format="FLAC", subtype="PCM_16")
            row["audio"] = {"path": f"audio/{path.name}"}
            row["duration"] = round(sf.info(str(path)).duration, 3)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def preference_split(split: str, texts: list[str], folder: Path, augment, model: Path) -> tuple[int, int]:
    """Speak ``texts``, mine rejected transcripts with the model, fill the rest by rule; (from model, by rule)."""
    from orpo.config import MakePairsConfig
    from orpo.pairs.make_pairs import make_pairs_from_config, skipped_path

    rng = random.Random(f"{SEED}-{split}")
    rows = [
        {
            "name": f"{split}_{i:03d}",
            "text": t,
            "voice": TRAIN_VOICES[i % len(TRAIN_VOICES)],
            "wpm": rng.randint(140, 200),
        }
        for i, t in enumerate(texts)
    ]
    speak(rows, folder, augment)
    for row in rows:
        row["language"] = "English"
    write_jsonl(folder / f"{split}-asr.jsonl", rows)
    pairs_path = folder / f"{split}-pairs.jsonl"
    make_pairs_from_config(
        MakePairsConfig(model=str(model), data=str(folder / f"{split}-asr.jsonl"), out=str(pairs_path), num_beams=5)
    )
    mined = {r["source_line"]: r for r in map(json.loads, pairs_path.read_text().splitlines())}
    records = []
    for line, row in enumerate(rows, start=1):
        record = {"audio": row["audio"], "duration": row["duration"], "chosen": row["text"], "language": "English"}
        if line in mined:
            record.update(rejected=mined[line]["rejected"], rejected_from="model", base_wer=mined[line].get("wer"))
        else:
            record.update(rejected=rule_error(row["text"], seed=line), rejected_from="rule", base_wer=0.0)
        records.append({**record, "voice": row["voice"], "wpm": row["wpm"]})
    write_jsonl(folder / f"{split}.jsonl", records)
    for name in (f"{split}-asr.jsonl", pairs_path.name, skipped_path(pairs_path).name):
        (folder / name).unlink(missing_ok=True)
    from_model = sum(r["rejected_from"] == "model" for r in records)
    return from_model, len(records) - from_model


def regression_split(folder: Path, multilingual: bool) -> None:
    """regression.jsonl (English) and, with ``multilingual``, regression-multilingual.jsonl."""
    texts = [e["text"] for e in make_demo.TRAIN + make_demo.TEST][:REGRESSION_CLIPS]
    rows = [
        {"name": f"regression_{i:03d}", "text": t, "voice": REGRESSION_VOICES[i % len(REGRESSION_VOICES)], "wpm": 165}
        for i, t in enumerate(texts)
    ]
    others = []
    if multilingual:
        for language, (voice, lines) in OTHER_LANGUAGES.items():
            others += [
                {"name": f"regression_{voice}_{i:02d}", "text": t, "voice": voice, "wpm": 150, "language": language}
                for i, t in enumerate(lines)
            ]
    speak(rows + others, folder, augment=None)
    english = [{**r, "language": "English"} for r in rows]
    write_jsonl(folder / "regression.jsonl", english)
    if multilingual:
        write_jsonl(folder / "regression-multilingual.jsonl", english + others)


def build(multilingual: bool, model: Path) -> None:
    from orpo.data.augment import Augmenter

    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng not found (Debian/Ubuntu: apt-get install -y espeak-ng)")
    if not (model / "config.json").is_file():
        sys.exit(f"{model} is missing: bash scripts/setup.sh (or whisper-orpo fetch-model tiny.en {model})")
    staging = OUT.with_name(OUT.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    augment_file = staging / "augment.yaml"  # the same file format a recipe's augment_config_path names
    augment_file.write_text(json.dumps(AUGMENT))
    augment = Augmenter.from_file(augment_file, seed=SEED)
    for split, texts in sentences().items():
        from_model, by_rule = preference_split(split, texts, staging, augment, model)
        print(f"{split}: {from_model + by_rule} pairs, rejected from the model {from_model}, by rule {by_rule}")
    regression_split(staging, multilingual)
    if OUT.exists():
        shutil.rmtree(OUT)
    staging.rename(OUT)
    print(f"built {OUT}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--multilingual", action="store_true", help="also the German, Spanish and French clips")
    parser.add_argument("--model", default=str(ROOT / "models" / "whisper-tiny.en"), help="model that mines errors")
    parser.add_argument("--force", action="store_true", help="build again even when the set exists")
    args = parser.parse_args()
    wanted = OUT / ("regression-multilingual.jsonl" if args.multilingual else "regression.jsonl")
    if wanted.is_file() and not args.force:
        print(f"{OUT} is built (--force builds it again)")
        return
    build(args.multilingual, Path(args.model))


if __name__ == "__main__":
    main()
