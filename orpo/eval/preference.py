"""The preference metrics of a model on a preference set: the objective's eval loss, NLL, rewards, accuracies,
margins, and two that mean the same for every objective (``preference/accuracy``, ``preference/margin``: from the
average log-probs).

The one path for them: the training loop's evaluations and ``whisper-orpo evaluate`` both call
:func:`preference_metrics`. Means over clips of all processes, each clip counted once (the duplicates
that even shards add are dropped by index), under TRL's names with an ``eval/`` prefix.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from orpo.eval.generate import restore_training_modes, stop_between_batches, training_modes
from orpo.loss.objective import Objective
from orpo.loss.pairs import comparable_preference


def preference_metrics(
    model: torch.nn.Module,
    loader,
    accelerator,
    objective: Objective,
    reference=None,
    desc: str = "eval",
    stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """The ``objective``'s metrics of an :class:`orpo.model.orpo_whisper.ORPOWhisper` (prepared or not) on a
    prepared loader; ``reference`` (a :class:`orpo.data.pair_table.PairTable` of the loader's dataset) gives each
    batch its reference log-probs when the objective needs them; ``stop`` as in
    :func:`orpo.eval.generate.generate_transcripts`."""
    sums: dict[str, float] = {}
    seen: set[int] = set()
    modes = training_modes(model)
    model.eval()
    disable = accelerator is not None and not accelerator.is_local_main_process
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc=desc, leave=False, disable=disable):
                stop_between_batches(stop)
                if reference is not None:
                    batch = {**batch, **reference.reference_fields(batch["sample_index"])}
                out = model(batch)
                _, per_clip = objective(out, batch)
                per_clip |= comparable_preference(out)
                rows = {"index": batch["sample_index"], **per_clip}
                if accelerator is not None:
                    rows = accelerator.gather_for_metrics(rows)
                for k, index in enumerate(rows["index"].tolist()):
                    if index in seen:
                        continue
                    seen.add(index)
                    for name in per_clip:
                        sums[name] = sums.get(name, 0.0) + float(rows[name][k])
    finally:
        restore_training_modes(modes)
    return {f"eval/{name}": value / len(seen) for name, value in sorted(sums.items())}
