"""Each process's share of a list of clips, for the work the loop spreads over processes by hand (pair refresh,
reference log-probs): disjoint shares of equal length, so that every process runs the same number of batches
(multi-process ZeRO-3 needs every rank in each forward).
"""

from __future__ import annotations

from orpo.scale.launch import num_processes


def process_share(indices: list[int], accelerator=None) -> list[int]:
    """This process's clips: every ``world``-th of ``indices`` from its rank on, padded with the first clip to the
    length of the longest share (a padded clip is worked on twice; callers keep one result per clip)."""
    world = num_processes(accelerator)
    rank = accelerator.process_index if accelerator is not None else 0
    if not indices:
        return []
    share = indices[rank::world]
    longest = -(-len(indices) // world)
    return share + [indices[0]] * (longest - len(share))
