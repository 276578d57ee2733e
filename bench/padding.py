"""Decoder padding with and without length-grouped batching (``group_by_length``) on a manifest.

    python bench/padding.py                               # the bundled demo set, batch 4
    python bench/padding.py --data data/train.jsonl --model DIR --batch 16

Each clip's decoder row holds all its transcripts packed side by side; a batch pads every row to its
longest. Reported: the share of decoder positions that are padding, averaged over ``--epochs`` epochs of
random order (what ``shuffle`` gives) and of length-grouped order.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from transformers import WhisperConfig, WhisperProcessor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orpo.data.dataset import PreferenceDataset
from orpo.data.manifest import read_manifest  # noqa: E402
from orpo.data.sampling import LengthGroupedSampler, padding_fraction  # noqa: E402
from orpo.data.tokens import (
    WhisperTokens,
    is_multilingual,  # noqa: E402
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "examples/demo/train.jsonl"))
    parser.add_argument(
        "--model",
        default=str(ROOT / "tests/fixtures/whisper_tokenizer"),
        help="model or tokenizer directory (default: the multilingual tokenizer fixture)",
    )
    parser.add_argument("--language", default="English")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    processor = WhisperProcessor.from_pretrained(args.model)
    config_file = Path(args.model) / "config.json"
    multilingual = is_multilingual(WhisperConfig.from_pretrained(args.model)) if config_file.exists() else True
    tokens = WhisperTokens(processor.tokenizer, multilingual, "transcribe", False, 448)
    dataset = PreferenceDataset(read_manifest(args.data), processor.feature_extractor, tokens, args.language, 0, 30)
    lengths = dataset.packed_lengths()

    random_order, grouped_order = [], []
    for epoch in range(args.epochs):
        generator = torch.Generator().manual_seed(epoch)
        random_order.append(
            padding_fraction(lengths, torch.randperm(len(lengths), generator=generator).tolist(), args.batch)
        )
        sampler = LengthGroupedSampler(lengths, args.batch, seed=0)
        sampler.set_epoch(epoch)
        grouped_order.append(padding_fraction(lengths, list(sampler), args.batch))
    print(
        f"{args.data}: {len(lengths)} clips, packed row lengths {min(lengths)}-{max(lengths)} tokens, "
        f"batch {args.batch}, {args.epochs} epochs"
    )
    print(f"padding fraction, random order:         {statistics.mean(random_order):.1%}")
    print(f"padding fraction, group_by_length: true: {statistics.mean(grouped_order):.1%}")


if __name__ == "__main__":
    main()
