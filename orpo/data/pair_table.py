"""The training pairs as they stand during a run: each clip's rejected transcripts (the manifest's, or those a
refresh mined from the model) and, for objectives against a reference model, each transcript's reference log-prob.

The table is the one place these live. It changes the dataset's items in place (the main process's copy), so
the training step takes a batch's decoder rows from it rather than from the data-loader workers: a worker works
on a copy of the dataset made when its epoch began and would miss a refresh in mid-epoch. A checkpoint keeps the
table (``pairs.json``, with the reference log-probs in ``pairs.safetensors``: its :meth:`~PairTable.state_dict`)
and a resumed run restores it, so the resumed run trains on the pairs the uninterrupted one had. Only the clips a
refresh changed are kept as text; the reference log-probs are one float64 array (NaN: not computed), whatever
the number of clips.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from orpo.data.collate import decoder_rows
from orpo.errors import CheckpointError


class PairTable:
    """The current pairs of a :class:`orpo.data.dataset.PreferenceDataset` (the training set) and their reference
    log-probs: per clip the summed log-prob of the chosen transcript, then of each rejected one (NaN until
    computed, and again once the clip's rejected transcripts change)."""

    def __init__(self, dataset, pad_token_id: int, rows: bool = False, reference: bool = False):
        self.dataset = dataset
        self.pad_token_id = pad_token_id
        self.rows = rows  # batches take their decoder rows from here (the pairs change during the run)
        self.with_reference = reference  # batches take reference log-probs from here
        self.changed: dict[int, list[str]] = {}  # clip: its rejected transcripts, where a refresh changed them
        self.reference = np.full((len(dataset), 1), np.nan)  # widened as transcripts get reference log-probs
        self.refreshed_at: int | None = None  # the optimizer step of the last refresh

    def __len__(self) -> int:
        return len(self.dataset)

    # ----------------------------------------------------------------------------------------------
    # what a batch takes from it

    def batch_fields(self, sample_index: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a batch of these clips takes from the table: its decoder rows, its reference log-probs, or both."""
        fields = self.decoder_fields(sample_index) if self.rows else {}
        return fields | (self.reference_fields(sample_index) if self.with_reference else {})

    def decoder_fields(self, sample_index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The decoder rows of a batch's clips as their pairs stand now, on ``sample_index``'s device."""
        segments = [self.dataset.items[i].segments for i in sample_index.tolist()]
        rows = decoder_rows(segments, self.pad_token_id)
        return {name: value.to(sample_index.device) for name, value in rows.items()}

    def reference_fields(self, sample_index: torch.Tensor) -> dict[str, torch.Tensor]:
        """``ref_logps_chosen`` (B,) and ``ref_logps_rejected`` (B, K) of a batch (summed log-probs; 0 in empty
        slots), float32 on ``sample_index``'s device."""
        indices = sample_index.tolist()
        counts = [len(self.dataset.items[i].segments) for i in indices]
        rows = self.reference[indices]
        missing = [i for i, row, n in zip(indices, rows, counts) if np.isnan(row[:n]).any()]
        if missing:
            raise RuntimeError(f"no reference log-probs for clips {missing[:10]}: compute them before training on them")
        width = max(counts)
        rows = np.where(np.arange(rows.shape[1])[None, :] < np.array(counts)[:, None], rows, 0.0)[:, :width]
        values = torch.tensor(rows, dtype=torch.float32, device=sample_index.device)
        return {"ref_logps_chosen": values[:, 0], "ref_logps_rejected": values[:, 1:]}

    # ----------------------------------------------------------------------------------------------
    # changes

    def rejected(self, index: int) -> list[str]:
        return list(self.dataset.items[index].sample.rejected)

    def manifest_rejected(self, index: int) -> list[str]:
        """The clip's rejected transcripts as the data gave them."""
        return self.dataset.original_rejected(index)

    def replace_rejected(self, index: int, rejected: list[str]) -> None:
        """Clip ``index`` with other rejected transcripts; its reference log-probs are then to be computed again."""
        self.dataset.replace_rejected(index, rejected)
        self.changed[index] = list(rejected)
        self.reference[index] = np.nan

    def set_reference(self, values: dict[int, list[float]]) -> None:
        width = max((len(row) for row in values.values()), default=0)
        if width > self.reference.shape[1]:
            self.reference = np.pad(
                self.reference, ((0, 0), (0, width - self.reference.shape[1])), constant_values=np.nan
            )
        for index, row in values.items():
            if len(row) != len(self.dataset.items[index].segments):
                raise ValueError(f"clip {index}: {len(row)} reference log-probs for its transcripts")
            self.reference[index] = np.nan
            self.reference[index, : len(row)] = row

    def reference_of(self, index: int) -> list[float]:
        return self.reference[index, : len(self.dataset.items[index].segments)].tolist()

    def missing_reference(self) -> list[int]:
        """Clips without reference log-probs (a clip gets all of its transcripts' at once)."""
        return np.flatnonzero(np.isnan(self.reference[:, 0])).tolist()

    # ----------------------------------------------------------------------------------------------
    # checkpoints, audit files, agreement between processes

    def chosen_digest(self) -> str:
        """The training set the table belongs to: its chosen transcripts, in order."""
        return hashlib.sha256(json.dumps(self.dataset.chosen_texts()).encode()).hexdigest()

    def state_dict(self) -> dict:
        return {
            "chosen_sha256": self.chosen_digest(),
            "clips": len(self),
            "rejected": {str(index): rejected for index, rejected in sorted(self.changed.items())},
            "reference": torch.from_numpy(self.reference.copy()),
            "refreshed_at": self.refreshed_at,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["chosen_sha256"] != self.chosen_digest() or state["clips"] != len(self):
            raise CheckpointError(
                "the checkpoint's pairs (pairs.json) belong to other training data than this run's train_data: "
                "resume with the train_data the run was started with"
            )
        for index, rejected in state["rejected"].items():
            self.dataset.replace_rejected(int(index), rejected)
            self.changed[int(index)] = list(rejected)
        self.reference = state["reference"].double().numpy().copy()
        self.refreshed_at = state["refreshed_at"]

    def digest(self) -> str:
        """A digest of every changed pair and reference log-prob: equal on every process training on the same."""
        digest = hashlib.sha256(json.dumps(sorted(self.changed.items())).encode())
        digest.update(np.ascontiguousarray(self.reference).tobytes())
        return digest.hexdigest()

    def manifest_records(self):
        """The pairs as manifest records, one clip at a time (the trainer reads them as training data). A clip of a
        Hugging Face dataset held in memory has no file to name: its record names its row ("source") instead."""
        for item in self.dataset.items:
            sample = item.sample
            record = {"audio": str(sample.audio_path.resolve())} if sample.audio_path is not None else {}
            if sample.audio_path is None:
                record["source"] = sample.source
            record.update(duration=round(sample.duration, 4), chosen=sample.chosen, rejected=list(sample.rejected))
            if sample.language:
                record["language"] = sample.language
            yield record
