#!/usr/bin/env python
"""Build the small German real-speech demo set in examples/demo-de/.

Every clip is a German sentence spoken by espeak-ng, resampled to 16 kHz mono with
soxr and stored as FLAC under audio/.  Two JSON Lines manifests are written next to
this script, one object per line:

    {"audio": {"path": "audio/train_000.flac"}, "duration": 3.41,
     "chosen": "...", "rejected": "...", "language": "German"}

"chosen" is the sentence that was spoken.  "rejected" is a transcript with realistic
ASR errors, taken from the data table below: either the real greedy transcript of
OpenAI Whisper base (multilingual) on that very clip, decoded with the German
transcribe prefix (where base got it wrong), or a hand-written error variant (where
base got it right).  The base transcripts are stored here as data, so building the
set needs only espeak-ng, numpy, soundfile and soxr, never the model.

Usage:
    python examples/demo-de/make_demo.py                     # (re)build audio/ and the manifests
    python examples/demo-de/make_demo.py --wer               # greedy WER of the stored base transcripts
    python examples/demo-de/make_demo.py --transcribe DIR    # re-run a Whisper checkpoint on the clips
                                                             # and compare with the stored transcripts

A transformers copy of Whisper base for --transcribe is made with the project's own command:
`whisper-orpo fetch-model base models/whisper-base`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import unicodedata
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLE_RATE = 16_000
LANGUAGE = "German"
# Clips are synthesised and stored exactly as in examples/demo/ (its make_demo.synthesize: espeak-ng,
# 16 kHz, peak-normalised, 7 significant bits in 16-bit FLAC, well under 1 MB for the set). The stored
# base transcripts below were made on the clips that are shipped.

# (voice, words per minute); clip i uses STYLES[i % len(STYLES)], counting on from train into test.
# espeak-ng's German voice with some of its variants (espeak-ng --voices=variant).  Variants on
# which base mostly looped or babbled in a trial (+f3 at 140 wpm) were left out.
STYLES = [
    ("de", 150),
    ("de+m6", 160),
    ("de+m3", 160),
    ("de+f2", 145),
    ("de+m5", 155),
    ("de+f4", 150),
]

# One entry per clip:
#   text -- what espeak-ng speaks; the manifest's "chosen"
#   hand -- hand-written transcript with realistic ASR errors (near-sounding words, wrong case
#           endings, a dropped/inserted short word, split compounds, wrong numbers and names)
#   base -- greedy transcript of Whisper base (openai/whisper-base weights) on the shipped clip,
#           recorded with `--transcribe` (espeak-ng 1.51, transformers generate with
#           language="de", task="transcribe", num_beams=1)
#   rejected_from -- "base": the manifest's "rejected" is base's own mistaken transcript;
#                    "hand": base was right, so "hand" is used.
TRAIN = [
    dict(
        text="Heute ist das Wetter sehr schön, wir gehen in den Park.",
        hand="Heute ist das Wetter sehr schön, wir gehen in dem Park.",
        base="Hoy tschuss mit der Nation, die gern in den Park.",
        rejected_from="base",
    ),
    dict(
        text="Mein Bruder Thomas wohnt seit drei Jahren in München.",
        hand="Mein Bruder Thomas wohnt seit zwei Jahren in München.",
        base="Mein Gurgertormas und Night-Bayerin in München.",
        rejected_from="base",
    ),
    dict(
        text="Der Zug nach Hamburg fährt um acht Uhr ab.",
        hand="Der Zug nach Homburg fährt um acht Uhr ab.",
        base="...dezug nach Hamburg, eh, um nach Zuhör.",
        rejected_from="base",
    ),
    dict(
        text="Kannst du mir bitte das Salz geben?",
        hand="Kannst du mir bitte das Salz gegeben?",
        base="kannst du mich wieder das Malz geben.",
        rejected_from="base",
    ),
    dict(
        text="Wir haben gestern Abend einen spannenden Film gesehen.",
        hand="Wir haben gestern Abend einen spannende Film gesehen.",
        base="Wir haben gestern Abend, Abend, Abend und Abend und feeling, und ehemann.",
        rejected_from="base",
    ),
    dict(
        text="Die Straße vor unserem Haus wird morgen gesperrt.",
        hand="Die Straße vor unseren Haus wird morgen gesperrt.",
        base="... die Strasse von dem Haus mit morgen gesteht.",
        rejected_from="base",
    ),
    dict(
        text="Ich trinke jeden Morgen eine Tasse Kaffee mit Milch.",
        hand="Ich trinke jeden Morgen eine Tasse Kaffee mit Mich.",
        base="Ich bin kein jeden Morgen einer Tasse Café mit Milch.",
        rejected_from="base",
    ),
    dict(
        text="Anna hat im Supermarkt Brot, Käse und Äpfel gekauft.",
        hand="Anna hat im Supermarkt Boot, Käse und Äpfel gekauft.",
        base="Ah ah, den Zuhl war macht rot, Käse und Tefung kauft.",
        rejected_from="base",
    ),
    dict(
        text="Das Konzert beginnt am Samstag um zwanzig Uhr.",
        hand="Das Konzert beginnt am Sonntag um zwanzig Uhr.",
        base="das Konzert beginnt am Lamstag um 20 Uhr.",
        rejected_from="base",
    ),
    dict(
        text="Meine Großmutter backt jeden Sonntag einen Apfelkuchen.",
        hand="Meine Großmutter backt jeden Sonntag einen Apfel Kuchen.",
        base="Mein Entschuldigung, ich werde den Lohncha in den Haften klopfen.",
        rejected_from="base",
    ),
    dict(
        text="Bitte schließ das Fenster, es ist sehr kalt draußen.",
        hand="Bitte schieß das Fenster, es ist sehr kalt draußen.",
        base="mit der Schleissastinster, es ist mir kalt,000",
        rejected_from="base",
    ),
    dict(
        text="Wir fahren im Sommer mit dem Auto nach Italien.",
        hand="Wir fahren im Sommer mit dem Auto nach Italiener.",
        base="Riefer mit dem Moment mit dem Auto nach Italien.",
        rejected_from="base",
    ),
    dict(
        text="Der Arzt sagt, ich soll mehr Wasser trinken.",
        hand="Der Arzt sagt, ich soll mehr Wasser denken.",
        base="der Arzt macht, ich neun mehr Maser trinken.",
        rejected_from="base",
    ),
    dict(
        text="Peter spielt jeden Dienstag mit seinen Freunden Fußball.",
        hand="Peter spielt jeden Dienstag mit seinem Freunden Fußball.",
        base="Beta Steel, Tier und Dienstag mit meinen Freundinnen fürs Palme.",
        rejected_from="base",
    ),
    dict(
        text="Das Restaurant an der Ecke ist leider geschlossen.",
        hand="Das Restaurant an der Ecke ist leider geschlossen worden.",
        base="Das ist doch ein bisschen schlossend.",
        rejected_from="base",
    ),
    dict(
        text="Ich habe meinen Schlüssel in der Küche vergessen.",
        hand="Ich habe meinen Schüssel in der Küche vergessen.",
        base="Ich habe meinen Schlussern in der Küche vergessen.",
        rejected_from="base",
    ),
    dict(
        text="Unsere Tochter geht seit September in die Schule.",
        hand="Unsere Tochter geht seit Dezember in die Schule.",
        base="und es wird auch zu der Nacht mit dem Maulich.",
        rejected_from="base",
    ),
    dict(
        text="Der Bus kommt heute leider zehn Minuten später.",
        hand="Der Bus kommt heute leider zehn Minuten spät.",
        base="Der Mostrompt-Foiter-Liner 10 Minuten später.",
        rejected_from="base",
    ),
    dict(
        text="Wie viel kostet eine Fahrkarte nach Berlin?",
        hand="Wie viel kostet eine Fahrkarte nach Bern?",
        base="die viel kostet eine paar Katze nach Berlin.",
        rejected_from="base",
    ),
    dict(
        text="Lisa und Jonas heiraten im nächsten Frühling.",
        hand="Lisa und Jonas heiraten im nächsten Frühjahr.",
        base="und die Eure Hagar-Tunni-Nächsten-Fühling.",
        rejected_from="base",
    ),
    dict(
        text="Am Wochenende besuchen wir unsere Freunde in Köln.",
        hand="Am Wochenende besuchen wir unsere Freunde in Kiel.",
        base="am hoffenen Beruf und die uns der Freundin können.",
        rejected_from="base",
    ),
    dict(
        text="Er hat 15 Euro für das Mittagessen bezahlt.",
        hand="Er hat 50 Euro für das Mittagessen bezahlt.",
        base="Ich habe 15 Euro für das Wettage in den Saalt.",
        rejected_from="base",
    ),
    dict(
        text="Die Kinder spielen den ganzen Nachmittag im Garten.",
        hand="Die Kinder spielen den ganzen Nachmittag in Garten.",
        base="Die Kinderschie und den ganzen Affentag im Garten.",
        rejected_from="base",
    ),
    dict(
        text="Könnten Sie das bitte noch einmal langsam wiederholen?",
        hand="Könnten Sie das bitte noch einmal langsamer wiederholen?",
        base="Könntest nicht das Mädchen noch einmal lang an wie da vorhin.",
        rejected_from="base",
    ),
    dict(
        text="Mein Handy ist kaputt, ich brauche ein neues.",
        hand="Mein Handy ist kaputt, ich brauche einen neuen.",
        base="Mein Handy ist kaputt, ich rauche ein neues",
        rejected_from="base",
    ),
    dict(
        text="Im Winter liegt in den Bergen oft viel Schnee.",
        hand="Im Winter liegt in den Bergen oft viel See.",
        base="In Winterlieg, in den Mögenhof, die unschneid.",
        rejected_from="base",
    ),
    dict(
        text="Wir treffen uns um halb sieben vor dem Kino.",
        hand="Wir treffen uns um halb acht vor dem Kino.",
        base="die ich im Summhall, even for dem Kino.",
        rejected_from="base",
    ),
    dict(
        text="Die Bäckerei öffnet jeden Tag um sechs Uhr früh.",
        hand="Die Bäckerei öffnet jeden Tag um sieben Uhr früh.",
        base="Die Mekkei-Röpfe die Jeden Tag vom Meksuflug.",
        rejected_from="base",
    ),
    dict(
        text="Sabine arbeitet als Lehrerin an einer Grundschule in Bremen.",
        hand="Sabine arbeitet als Lehrerin an einer Grundschule in Bremerhaven.",
        base="Ich bin ein erweitert als Räberin an einer Gunterschule in Rämen.",
        rejected_from="base",
    ),
    dict(
        text="Die Sitzung beginnt am Montag um 14 Uhr.",
        hand="Die Sitzung beginnt am Montag um 16 Uhr.",
        base="Die Litzung beginnt am Montag vom 15 Uhr.",
        rejected_from="base",
    ),
    dict(
        text="Das Museum ist montags für Besucher geschlossen.",
        hand="Das Museum ist morgens für Besucher geschlossen.",
        base="Das will mehr um die Stimmung hinzuhören.",
        rejected_from="base",
    ),
    dict(
        text="Unser Nachbar hat einen großen schwarzen Hund.",
        hand="Unser Nachbar hat einen großen schwarzen Mund.",
        base="und auch ein bisschen schmackst und unternicht.",
        rejected_from="base",
    ),
]

TEST = [
    dict(
        text="Der Kaffee ist heute Morgen viel zu heiß.",
        hand="Der Kaffee ist heute Morgen viel zu weiß.",
        base="der Café ist heute Morgen viel zu heiß.",
        rejected_from="base",
    ),
    dict(
        text="Michael fährt jeden Tag mit dem Fahrrad zur Arbeit.",
        hand="Michael fährt jeden Tag mit dem Fahrrad zu Arbeit.",
        base="Michein, ich werde jeden Tag mit dem Fahrrad zur Arbeit.",
        rejected_from="base",
    ),
    dict(
        text="Die Wohnung hat drei Zimmer und einen kleinen Balkon.",
        hand="Die Wohnung hat zwei Zimmer und einen kleinen Balkon.",
        base="Die Wohnung hat gleich Zimmer und einen kleinen Mann.",
        rejected_from="base",
    ),
    dict(
        text="Wir warten schon seit zwanzig Minuten auf den Kellner.",
        hand="Wir warten schon seit zwanzig Minuten auf dem Kellner.",
        base="Die Martin schon nix, man sich Minuten auf den Kailn.",
        rejected_from="base",
    ),
    dict(
        text="Morgen regnet es wahrscheinlich den ganzen Tag.",
        hand="Morgen regnet es wahrscheinlich den ganzen Tag lang.",
        base="morgen im Nethis, wahrscheinlich den ganzen Tag.",
        rejected_from="base",
    ),
    dict(
        text="Julia hat zum Geburtstag ein Buch bekommen.",
        hand="Julia hat zum Geburtstag ein Tuch bekommen.",
        base="Julia hat zum Geburtstag ein Buch bekommen.",
        rejected_from="hand",
    ),
    dict(
        text="Der Flug nach Wien hat eine Stunde Verspätung.",
        hand="Der Flug nach Wien hat eine Stunde Verspätungen.",
        base="der Flug nach Wien hat eine Stunde feste tun.",
        rejected_from="base",
    ),
    dict(
        text="Bitte vergiss nicht, die Blumen im Garten zu gießen.",
        hand="Bitte vergiss nicht, die Blumen im Garten zu genießen.",
        base="Bitte vergiss nicht, die Nungen dem Karten zu gießen.",
        rejected_from="base",
    ),
    dict(
        text="In der Stadt gibt es viele schöne alte Häuser.",
        hand="In der Stadt gibt es viele schöne alte Mäuse.",
        base="In der Stadt gibt es viel Schuhe, außer Poise.",
        rejected_from="base",
    ),
    dict(
        text="Ich lerne seit zwei Jahren Deutsch an der Volkshochschule.",
        hand="Ich lerne seit drei Jahren Deutsch an der Volkshochschule.",
        base="Ich will in den nächsten Mai ja den Deutischen gefahrenen Spotschule.",
        rejected_from="base",
    ),
]

SPLITS = {"train": TRAIN, "test": TEST}


def normalize(text: str) -> str:
    """Lowercase, drop punctuation (hyphens become spaces), collapse whitespace. Umlauts and ß stay."""
    text = unicodedata.normalize("NFKC", text).lower().replace("-", " ")
    text = "".join(ch for ch in text if ch.isalnum() or ch.isspace())
    return re.sub(r"\s+", " ", text).strip()


def rejected_for(entry: dict) -> str:
    if entry["rejected_from"] == "base":
        return entry["base"]
    if entry["rejected_from"] == "hand":
        return entry["hand"]
    raise ValueError(f"bad rejected_from {entry['rejected_from']!r}")


def check_table() -> None:
    for split, entries in SPLITS.items():
        for i, e in enumerate(entries):
            where = f"{split}[{i}] {e['text']!r}"
            n_words = len(e["text"].split())
            assert 6 <= n_words <= 12, f"{where}: {n_words} words"
            assert normalize(e["hand"]) != normalize(e["text"]), f"{where}: hand == text"
            base_wrong = normalize(e["base"]) != normalize(e["text"])
            assert e["rejected_from"] == ("base" if base_wrong else "hand"), f"{where}: rejected_from"
            assert normalize(rejected_for(e)) != normalize(e["text"]), where


def english_demo():
    """examples/demo/make_demo.py, whose clip synthesis this set shares (loaded by path: both scripts are
    named make_demo)."""
    spec = importlib.util.spec_from_file_location("english_make_demo", HERE.parent / "demo" / "make_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build() -> None:
    check_table()
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng not found (Debian/Ubuntu: apt-get install -y espeak-ng)")
    audio_dir = HERE / "audio"
    if audio_dir.exists():
        shutil.rmtree(audio_dir)
    audio_dir.mkdir()
    synthesize = english_demo().synthesize
    k = 0
    with tempfile.TemporaryDirectory() as tmp:
        for split, entries in SPLITS.items():
            rows = []
            for i, e in enumerate(entries):
                voice, wpm = STYLES[k % len(STYLES)]
                k += 1
                rel = f"audio/{split}_{i:03d}.flac"
                duration = synthesize(e["text"], voice, wpm, HERE / rel, Path(tmp))
                rows.append(
                    {
                        "audio": {"path": rel},
                        "duration": round(duration, 2),
                        "chosen": e["text"],
                        "rejected": rejected_for(e),
                        "language": LANGUAGE,
                    }
                )
            with open(HERE / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            print(f"{split}: {len(rows)} clips, {sum(r['duration'] for r in rows):.1f} s")
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"examples/demo-de/: {total / 1024:.0f} KiB")


def wer_report(hyps: dict[str, list[str]]) -> None:
    import jiwer

    for split, entries in SPLITS.items():
        refs = [normalize(e["text"]) for e in entries]
        out = [normalize(h) for h in hyps[split]]
        n_wrong = sum(r != h for r, h in zip(refs, out))
        print(f"{split}: WER {100 * jiwer.wer(refs, out):.1f}% ({n_wrong}/{len(refs)} clips with at least one error)")


def transcribe(model_dir: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import soundfile as sf
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(model_dir)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    hyps = {}
    for split, entries in SPLITS.items():
        hyps[split] = []
        for i, e in enumerate(entries):
            audio, sr = sf.read(str(HERE / f"audio/{split}_{i:03d}.flac"), dtype="float32")
            assert sr == SAMPLE_RATE
            feats = processor(audio, sampling_rate=sr, return_tensors="pt").input_features
            with torch.no_grad():
                ids = model.generate(
                    feats, language="de", task="transcribe", num_beams=1, do_sample=False, max_new_tokens=96
                )
            hyp = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
            hyps[split].append(hyp)
            same = "same" if hyp == e["base"] else "DIFFERS from stored"
            ok = "ok " if normalize(hyp) == normalize(e["text"]) else "ERR"
            print(f"{split}[{i:2d}] {ok} {same}\n   ref: {e['text']}\n   hyp: {hyp}")
    wer_report(hyps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wer", action="store_true", help="print the WER of the stored Whisper base transcripts")
    ap.add_argument("--transcribe", metavar="MODEL_DIR", help="transcribe the clips with a Whisper checkpoint")
    args = ap.parse_args()
    if args.transcribe:
        transcribe(args.transcribe)
    elif args.wer:
        check_table()
        wer_report({s: [e["base"] for e in es] for s, es in SPLITS.items()})
    else:
        build()


if __name__ == "__main__":
    main()
