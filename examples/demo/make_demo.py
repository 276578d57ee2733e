#!/usr/bin/env python
"""Build the small real-speech demo set in examples/demo/.

Every clip is an English sentence spoken by espeak-ng, resampled to 16 kHz mono with
soxr and stored as FLAC under audio/.  Two JSON Lines manifests are written next to
this script, one object per line:

    {"audio": {"path": "audio/train_000.flac"}, "duration": 2.31,
     "chosen": "...", "rejected": "...", "language": "English"}

"chosen" is the sentence that was spoken.  "rejected" is a transcript with realistic
ASR errors, taken from the data table below: either the real greedy transcript of
OpenAI Whisper tiny.en on that very clip (where tiny.en got it wrong) or a hand-written
error variant (where tiny.en got it right).  The tiny.en transcripts are stored here as
data, so building the set needs only espeak-ng, numpy, soundfile and soxr, never the model.

Usage:
    python examples/demo/make_demo.py                     # (re)build audio/ and the manifests
    python examples/demo/make_demo.py --wer               # greedy WER of the stored tiny.en transcripts
    python examples/demo/make_demo.py --transcribe DIR    # re-run a Whisper checkpoint on the clips
                                                          # and compare with the stored transcripts

A transformers copy of tiny.en for --transcribe: `whisper-orpo fetch-model tiny.en models/whisper-tiny.en`
(scripts/setup.sh makes it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLE_RATE = 16_000
# Stored sample resolution.  Clips are written as 16-bit FLAC, but the samples are rounded
# to BITS significant bits after peak-normalising to PEAK; FLAC drops the unused low bits,
# which keeps the whole set under 700 KB (16 bits: ~2.4 MB; 8 bits: ~830 KB).  This is
# clean synthetic speech, and ~30-40 dB SNR did not hurt recognition: tiny.en's WER on
# these clips is about the same at 16 bits (14.7% train / 24.1% test) and at 7 bits.
# The stored tiny.en transcripts below were made on the 7-bit clips that are shipped.
BITS = 7
PEAK = 0.9
PAD_S = 0.10  # silence kept before the first and after the last sample above SILENCE
SILENCE = 1e-3

# (voice, words per minute); clip i uses STYLES[i % len(STYLES)].
STYLES = [
    ("en-us", 160),
    ("en-gb", 150),
    ("en-us+f3", 170),
    ("en-gb+m3", 165),
    ("en-us+m5", 175),
    ("en-gb+f2", 155),
]

# One entry per clip:
#   text    -- what espeak-ng speaks; the manifest's "chosen"
#   hand    -- hand-written transcript with realistic ASR errors (homophones, near-sounding
#              words, a dropped/inserted short word, split/merged words, wrong numbers)
#   tiny_en -- greedy transcript of Whisper tiny.en (openai/whisper-tiny.en weights) on the
#              shipped clip, recorded with `--transcribe` (espeak-ng 1.51, transformers
#              generate, num_beams=1)
#   rejected_from -- "tiny_en": the manifest's "rejected" is tiny.en's own mistaken transcript;
#                    "hand": tiny.en was right (or only differed in formatting), so "hand" is used.
TRAIN = [
    dict(
        text="I think their house is over there by the river.",
        hand="I think there house is over their by the river.",
        tiny_en="I think their house in Mobile never might be river.",
        rejected_from="tiny_en",
    ),
    dict(
        text="Please write your name on the right side of the page.",
        hand="Please right your name on the write side of the page.",
        tiny_en="Please write your name on the right side of the page.",
        rejected_from="hand",
    ),
    dict(
        text="We bought two tickets to the concert on Friday night.",
        hand="We bought to tickets to the concert on Friday night.",
        tiny_en="We want to take it to the concert on Friday night.",
        rejected_from="tiny_en",
    ),
    dict(
        text="The train to Boston leaves at 7:45 tomorrow morning.",
        hand="The train to Austin leaves at 7:15 tomorrow morning.",
        tiny_en="The Train to Austin leaves at 745 tomorrow morning.",
        rejected_from="tiny_en",
    ),
    dict(
        text="My sister Karen moved to Seattle last year.",
        hand="My sister Carol moved to Seattle last year.",
        tiny_en="my sister Karen moved to Seattle last year.",
        rejected_from="hand",
    ),
    dict(
        text="Could you turn the lights off before you leave?",
        hand="Could you turn the light off before you leave?",
        tiny_en="Could you turn the lights off before you leave?",
        rejected_from="hand",
    ),
    dict(
        text="The weather forecast says it will rain all weekend.",
        hand="The whether forecast says it will rain all weekend.",
        tiny_en="But whenever forecast and it will rain all weekend.",
        rejected_from="tiny_en",
    ),
    dict(
        text="I left my keys in the kitchen next to the sink.",
        hand="I left my keys in the kitchen next the sink.",
        tiny_en="I left my keys in the kitchen next to missing.",
        rejected_from="tiny_en",
    ),
    dict(
        text="He scored 23 points in the second half of the game.",
        hand="He scored 33 points in the second half of the game.",
        tiny_en="He scored 23 points in the second half of the game.",
        rejected_from="hand",
    ),
    dict(
        text="Our flight was delayed by almost three hours.",
        hand="Our flight was delayed by most three hours.",
        tiny_en="Now if light was delayed, I almost 3 hours.",
        rejected_from="tiny_en",
    ),
    dict(
        text="She reads a new book every week during the summer.",
        hand="She reads a new book every weak during the summer.",
        tiny_en="She reads a new book every week during the summer.",
        rejected_from="hand",
    ),
    dict(
        text="The doctor told him to drink more water each day.",
        hand="The doctor told him too drink more water each day.",
        tiny_en="The Doctor told him to drink more water each May.",
        rejected_from="tiny_en",
    ),
    dict(
        text="Let's meet outside the library at noon.",
        hand="Let's meet outside a library at noon.",
        tiny_en="Let's meet outside the library at noon.",
        rejected_from="hand",
    ),
    dict(
        text="The package should arrive sometime before Thursday afternoon.",
        hand="The package should arrive some time before Thursday afternoon.",
        tiny_en="The package should arrive sometime before Thursday afternoon.",
        rejected_from="hand",
    ),
    dict(
        text="I can't hear you very well on this phone.",
        hand="I can hear you very well on this phone.",
        tiny_en="I can't hear you very well on this phone.",
        rejected_from="hand",
    ),
    dict(
        text="Peter and Maria are getting married in June.",
        hand="Peter and Mario are getting married in June.",
        tiny_en="Peter and Maria are getting married in June.",
        rejected_from="hand",
    ),
    dict(
        text="Please knock on the door before you come in.",
        hand="Please knock on the door for you come in.",
        tiny_en="Please knock on the door before you come in.",
        rejected_from="hand",
    ),
    dict(
        text="We spent $15 on lunch at the new cafe.",
        hand="We spent $50 on lunch at the new cafe.",
        tiny_en="We spent $15 on lunch at the new cafe.",
        rejected_from="hand",
    ),
    dict(
        text="The kids were playing soccer in the park all afternoon.",
        hand="The kids were playing soccer in the park all after noon.",
        tiny_en="The kids were playing soccer in the park all afternoon.",
        rejected_from="hand",
    ),
    dict(
        text="I would like a cup of tea with milk, please.",
        hand="I would like a cup of tea with mild, please.",
        tiny_en="I will die, cup of tea with milk, please.",
        rejected_from="tiny_en",
    ),
    dict(
        text="Turn left at the second traffic light.",
        hand="Turn left at a second traffic light.",
        tiny_en="Turn left at the second traffic light",
        rejected_from="hand",
    ),
    dict(
        text="The new bridge was finally opened in 2019.",
        hand="The new bridge was finally opened in 2009.",
        tiny_en="The New Bridge was finally opened in 2019.",
        rejected_from="hand",
    ),
    dict(
        text="My grandmother bakes bread every Saturday morning.",
        hand="My grandmother bakes bred every Saturday morning.",
        tiny_en="My grandmother makes red every Saturday morning.",
        rejected_from="tiny_en",
    ),
    dict(
        text="Did you remember to lock the back door?",
        hand="Did you remember to look the back door?",
        tiny_en="Did you remember to lock my back door?",
        rejected_from="tiny_en",
    ),
    dict(
        text="James wants to study medicine at the university.",
        hand="James once to study medicine at the university.",
        tiny_en="James Wan to study medicine at the University.",
        rejected_from="tiny_en",
    ),
    dict(
        text="The movie was too long, but the ending was great.",
        hand="The movie was two long, but the ending was great.",
        tiny_en="a movie was too long, but the ending was great.",
        rejected_from="tiny_en",
    ),
    dict(
        text="Can you send me the report by the end of the day?",
        hand="Can you send me the report by the end of today?",
        tiny_en="Can you send me the report by the end of the page?",
        rejected_from="tiny_en",
    ),
    dict(
        text="There are 12 eggs in the fridge and no milk.",
        hand="There are 20 eggs in the fridge and no milk.",
        tiny_en="There are 12 back in the fridge and no milk.",
        rejected_from="tiny_en",
    ),
    dict(
        text="We walked along the beach and watched the sunset.",
        hand="We walked along the beach and watched the sun set.",
        tiny_en="We walked along the beach and rushed to the sunset.",
        rejected_from="tiny_en",
    ),
    dict(
        text="The children ate all the cookies before dinner.",
        hand="The children eight all the cookies before dinner.",
        tiny_en="Children ate all the cooking before dinner",
        rejected_from="tiny_en",
    ),
    dict(
        text="I need to buy some flour to make a cake.",
        hand="I need to buy some flower to make a cake.",
        tiny_en="I need to buy some flour to make a cake.",
        rejected_from="hand",
    ),
    dict(
        text="Sarah will pick us up from the airport at six.",
        hand="Sara will pick us up from the airport at six.",
        tiny_en="Sarah will be caught up from the airport at 6.",
        rejected_from="tiny_en",
    ),
]

TEST = [
    dict(
        text="The mail usually arrives just before lunch.",
        hand="The male usually arrives just before lunch.",
        tiny_en="The mail usually arrives just before lunch.",
        rejected_from="hand",
    ),
    dict(
        text="Our team won the match by four goals.",
        hand="Our team one the match by for goals.",
        tiny_en="our team won the match by four goals.",
        rejected_from="hand",
    ),
    dict(
        text="Hannah and her brother flew to Chicago on Monday.",
        hand="Hannah and her brother flu to Chicago on Monday.",
        tiny_en="And then the brother flew to Chicago on Monday",
        rejected_from="tiny_en",
    ),
    dict(
        text="The hotel room costs $120 per night.",
        hand="The hotel room costs $220 per night.",
        # tiny.en's "$1.20" is a real error, but it normalises to the same "120", so the
        # hand-written variant is used (likewise "6.30" for "six thirty" below).
        tiny_en="The hotel room costs $1.20 per night.",
        rejected_from="hand",
    ),
    dict(
        text="Please wait here until the nurse calls your name.",
        hand="Please wait hear until the nurse calls your name.",
        tiny_en="Please wait here until the nurse calls your name.",
        rejected_from="hand",
    ),
    dict(
        text="I'm not sure whether we should leave now or later.",
        hand="I'm not sure weather we should leave now or later.",
        tiny_en="I'm not sure whether we should leave now or later.",
        rejected_from="hand",
    ),
    dict(
        text="The bus was so crowded that we had to stand.",
        hand="The bus was so crowded that we had stand.",
        tiny_en="The most one so crowded that we have just had.",
        rejected_from="tiny_en",
    ),
    dict(
        text="He ordered a large pizza with extra cheese.",
        hand="He ordered a large pizza with extra cheeses.",
        tiny_en="He ordered a large piece of win next to a cheese.",
        rejected_from="tiny_en",
    ),
    dict(
        text="The museum is closed for repairs until next week.",
        hand="The museum is closed for repairs until next weak.",
        tiny_en="The museum is closed for repairs until next week.",
        rejected_from="hand",
    ),
    dict(
        text="Emily forgot her umbrella and got soaked in the rain.",
        hand="Emily forgot her umbrella and got soap in the rain.",
        tiny_en="family for Dr Umbrella and Dr Soaked in the rain.",
        rejected_from="tiny_en",
    ),
    dict(
        text="The coffee shop on the corner opens at six thirty.",
        hand="The coffee shop on the corner opens at six forty.",
        tiny_en="The coffee shop on the corner opens at 6.30.",
        rejected_from="hand",
    ),
    dict(
        text="My brother fixed the old bicycle in the garage.",
        hand="My brother fixed the old bicycles in the garage.",
        tiny_en="My brother fixed the old bicycle in the garage.",
        rejected_from="hand",
    ),
    dict(
        text="We need three more chairs for the dinner party.",
        hand="We need free more chairs for the dinner party.",
        tiny_en="We need three more chairs for the dinner party.",
        rejected_from="hand",
    ),
    dict(
        text="The teacher asked the students to read chapter five.",
        hand="The teacher asked the student to read chapter five.",
        tiny_en="The Deuter-Actmus Student Steering Chapter 5",
        rejected_from="tiny_en",
    ),
    dict(
        text="It was too cold to go swimming in the lake.",
        hand="It was to cold to go swimming in the lake.",
        tiny_en="It was too cold to go swimming in the lake.",
        rejected_from="hand",
    ),
    dict(
        text="Daniel lost his wallet somewhere near the train station.",
        hand="Daniel lost his wallet somewhere near the rain station.",
        tiny_en="And your lost kiss while it's somewhere near the train station.",
        rejected_from="tiny_en",
    ),
    dict(
        text="Please close the window before it starts to rain.",
        hand="Please close the window before he starts to rain.",
        tiny_en="Please close the window before it starts to rain.",
        rejected_from="hand",
    ),
    dict(
        text="The dog barked at the mailman every single morning.",
        hand="The dog parked at the mailman every single morning.",
        tiny_en="The dog bark tat the mailman every single morning.",
        rejected_from="tiny_en",
    ),
    dict(
        text="She bought fresh vegetables at the market on Sunday.",
        hand="She bought fresh vegetable at the market on Sunday.",
        tiny_en="She bought fresh, magical, metamomarkets on Sunday",
        rejected_from="tiny_en",
    ),
    dict(
        text="Our neighbors painted their fence a bright shade of blue.",
        hand="Our neighbors painted there fence a bright shade of blew.",
        tiny_en="Our neighbors painted an offensive right shade of blue.",
        rejected_from="tiny_en",
    ),
    dict(
        text="I will call you as soon as the meeting ends.",
        hand="I will call you as soon as the meeting end.",
        tiny_en="I will call you as soon as the meeting ends.",
        rejected_from="hand",
    ),
    dict(
        text="The library has more than ten thousand old maps.",
        hand="The library has more then ten thousand old maps.",
        tiny_en="The library has more than 10,000 dollars marks.",
        rejected_from="tiny_en",
    ),
    dict(
        text="Grandpa told us stories about his years at sea.",
        hand="Grandpa told us stories about his ears at sea.",
        tiny_en="Brent Potoll, the story about Kibir and F.C.",
        rejected_from="tiny_en",
    ),
    dict(
        text="The restaurant was full, so we ate at home.",
        hand="The restaurant was full, so we eight at home.",
        tiny_en="The restaurant was full, so we ate our home.",
        rejected_from="tiny_en",
    ),
    dict(
        text="Michael plays the piano in a small jazz band.",
        hand="Michael plays the piano in a small jazz bend.",
        tiny_en="Michael, please, look at the end of the small gas band.",
        rejected_from="tiny_en",
    ),
    dict(
        text="The storm knocked down two trees on our street.",
        hand="The storm knocked down to trees on our street.",
        tiny_en="The storm knocked down two trees on our street.",
        rejected_from="hand",
    ),
]

SPLITS = {"train": TRAIN, "test": TEST}


def normalize(text: str) -> str:
    """Lowercase, drop punctuation (hyphens become spaces), collapse whitespace."""
    text = unicodedata.normalize("NFKC", text).lower().replace("-", " ")
    text = "".join(ch for ch in text if ch.isalnum() or ch.isspace())
    return re.sub(r"\s+", " ", text).strip()


def rejected_for(entry: dict) -> str:
    if entry["rejected_from"] == "tiny_en":
        return entry["tiny_en"]
    if entry["rejected_from"] == "hand":
        return entry["hand"]
    raise ValueError(f"bad rejected_from {entry['rejected_from']!r}")


def check_table() -> None:
    for split, entries in SPLITS.items():
        for i, e in enumerate(entries):
            where = f"{split}[{i}] {e['text']!r}"
            n_words = len(e["text"].split())
            assert 6 <= n_words <= 15, f"{where}: {n_words} words"
            assert normalize(e["hand"]) != normalize(e["text"]), f"{where}: hand == text"
            if e["rejected_from"] == "tiny_en":
                assert normalize(e["tiny_en"]) != normalize(e["text"]), f"{where}: tiny_en is right"
            assert normalize(rejected_for(e)) != normalize(e["text"]), where


def synthesize(text: str, voice: str, wpm: int, out_path: Path, tmp: Path):
    import numpy as np
    import soundfile as sf
    import soxr

    wav = tmp / "clip.wav"
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(wav), text],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    audio, sr = sf.read(str(wav), dtype="float64", always_2d=True)
    audio = audio.mean(axis=1)
    audio = soxr.resample(audio, sr, SAMPLE_RATE, quality="VHQ")
    loud = np.flatnonzero(np.abs(audio) > SILENCE)
    pad = int(PAD_S * SAMPLE_RATE)
    audio = audio[max(0, loud[0] - pad) : loud[-1] + 1 + pad]
    audio = audio / np.abs(audio).max() * PEAK
    step = 2 ** (16 - BITS)
    pcm = (np.round(audio * 32767 / step) * step).clip(-32768, 32767).astype(np.int16)
    sf.write(str(out_path), pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16", compression_level=1.0)
    return len(pcm) / SAMPLE_RATE


def build() -> None:
    check_table()
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng not found (Debian/Ubuntu: apt-get install -y espeak-ng)")
    audio_dir = HERE / "audio"
    if audio_dir.exists():
        shutil.rmtree(audio_dir)
    audio_dir.mkdir()
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
                        "language": "English",
                    }
                )
            with open(HERE / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            print(f"{split}: {len(rows)} clips, {sum(r['duration'] for r in rows):.1f} s")
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"examples/demo/: {total / 1024:.0f} KiB")


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
                ids = model.generate(feats, num_beams=1, do_sample=False, max_new_tokens=96)
            hyp = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
            hyps[split].append(hyp)
            same = "same" if hyp == e["tiny_en"] else "DIFFERS from stored"
            ok = "ok " if normalize(hyp) == normalize(e["text"]) else "ERR"
            print(f"{split}[{i:2d}] {ok} {same}\n   ref: {e['text']}\n   hyp: {hyp}")
    wer_report(hyps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wer", action="store_true", help="print the WER of the stored tiny.en transcripts")
    ap.add_argument("--transcribe", metavar="MODEL_DIR", help="transcribe the clips with a Whisper checkpoint")
    args = ap.parse_args()
    if args.transcribe:
        transcribe(args.transcribe)
    elif args.wer:
        check_table()
        wer_report({s: [e["tiny_en"] for e in es] for s, es in SPLITS.items()})
    else:
        build()


if __name__ == "__main__":
    main()
