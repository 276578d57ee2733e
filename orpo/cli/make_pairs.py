"""``whisper-orpo make-pairs``: preference pairs from a plain ASR manifest (see :mod:`orpo.pairs.make_pairs`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from orpo.config import MakePairsConfig, parse_args
from orpo.errors import run_command

PROG = "whisper-orpo make-pairs"


def make_pairs_from_config(cfg: MakePairsConfig) -> None:
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor
    from transformers.utils import logging as hf_logging

    from orpo.data.manifest import read_asr_manifest
    from orpo.data.schema import language_code
    from orpo.data.tokens import WhisperTokens
    from orpo.errors import ConfigError
    from orpo.pairs.make_pairs import NBestDecoder, make_pairs, skipped_path

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if cfg.language is not None:
        try:
            language_code(cfg.language)
        except ValueError as err:
            raise ConfigError(f"language: {err}") from None
    samples = read_asr_manifest(cfg.data)  # a bad line stops here, before the model loads
    hf_logging.set_verbosity_error()
    processor = WhisperProcessor.from_pretrained(cfg.model)
    model = WhisperForConditionalGeneration.from_pretrained(cfg.model)
    model.to(torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    tokens = WhisperTokens.for_model(processor.tokenizer, model.config, cfg.task)
    decoder = NBestDecoder(model, processor, cfg.num_beams, cfg.max_new_tokens)
    summary = make_pairs(
        samples,
        Path(cfg.out),
        decoder,
        tokens,
        default_language=cfg.language,
        num_rejected=cfg.num_rejected,
        batch_size=cfg.batch_size,
    )
    print(summary.line())
    if summary.skipped:
        print(f"skipped clips are listed in {skipped_path(Path(cfg.out))}")


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    return run_command(lambda: make_pairs_from_config(parse_args(argv, MakePairsConfig, prog)))


if __name__ == "__main__":
    sys.exit(main())
