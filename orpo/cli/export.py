"""``whisper-orpo export``: a merged Hugging Face model from a run's output, adapter or checkpoint; optionally
a CTranslate2 model for faster-whisper, loaded back and checked on one clip."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from orpo.config import ExportConfig, parse_args
from orpo.errors import run_command

PROG = "whisper-orpo export"


def export_from_config(cfg: ExportConfig) -> None:
    from orpo.artifacts.export import check_audio, compare_tokens, ct2_greedy, export_ct2, hf_greedy, save_merged
    from orpo.artifacts.run_model import load_model, run_config
    from orpo.data.tokens import WhisperTokens

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    source = Path(cfg.checkpoint)
    whisper, processor, description = load_model(source, cfg.base_model)
    out = save_merged(whisper, processor, cfg.out, cfg.overwrite)
    print(f"wrote {out} (from {description})")
    if not cfg.ct2:
        return
    ct2_dir = Path(cfg.ct2_out) if cfg.ct2_out else out.with_name(out.name + "_ct2")
    export_ct2(out, ct2_dir, cfg.ct2, cfg.overwrite)
    settings = run_config(source)
    tokens = WhisperTokens.for_model(processor.tokenizer, whisper.config, settings.get("task") or "transcribe")
    prefix = tokens.prefix(cfg.language or settings.get("language") or "en", timestamps=False)
    audio = check_audio(cfg.check_audio)
    ct2_ids = ct2_greedy(ct2_dir, processor, audio, prefix, cfg.check_max_length)
    hf_ids = hf_greedy(whisper, processor, audio, prefix, cfg.check_max_length)
    decode = processor.tokenizer.decode
    print(f"wrote {ct2_dir} (CTranslate2, {cfg.ct2}); it loads and transcribes the check clip:")
    print(f"  ctranslate2:  {decode(ct2_ids, skip_special_tokens=True).strip()!r}")
    print(f"  transformers: {decode(hf_ids, skip_special_tokens=True).strip()!r} ({compare_tokens(ct2_ids, hf_ids)})")


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    return run_command(lambda: export_from_config(parse_args(argv, ExportConfig, prog)))


if __name__ == "__main__":
    sys.exit(main())
