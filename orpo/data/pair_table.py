"""The training pairs as they stand during a run: each clip's rejected transcripts (the manifest's, or those a
refresh mined from the model) and, for objectives against a reference model, each transcript's reference log-prob.

The table is the one place these live. It changes the dataset's items in place (the main process's copy), so
the training step takes a batch's decoder rows from it rather than from the data-loader workers: a worker works
on a copy of the dataset made when its epoch began and would miss a refresh in mid-epoch. A checkpoint keeps the
table (``pairs.json``: its :meth:`~PairTable.state_dict`) and a resumed run restores it, so the resumed run
trains on the pairs the uninterrupted one had. Reference log-probs are Python floats in that JSON: a float32
value survives JSON exactly.
"""

from __future__ import annotations

import hashlib
import json

import torch

from orpo.data.collate import decoder_rows
from orpo.errors import CheckpointError


class PairTable:
    """The current pairs of a :class:`orpo.data.dataset.PreferenceDataset` (the training set) and their reference
    log-probs: per clip the summed log-prob of the chosen transcript, then of each rejected one (None until
    computed, and again once the clip's rejected transcripts change)."""

    def __init__(self, dataset, pad_token_id: int, rows: bool = False, reference: bool = False):
        self.dataset = dataset
        self.pad_token_id = pad_token_id
        self.rows = rows  # batches take their decoder rows from here (the pairs change during the run)
        self.with_reference = reference  # batches take reference log-probs from here
        self.manifest_rejected = [list(item.sample.rejected) for item in dataset.items]
        self.reference: list[list[float] | None] = [None] * len(dataset)
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
        missing = [i for i in indices if self.reference[i] is None]
        if missing:
            raise RuntimeError(f"no reference log-probs for clips {missing[:10]}: compute them before training on them")
        rows = [self.reference[i] for i in indices]
        width = max(len(row) for row in rows) - 1
        rejected = [row[1:] + [0.0] * (width - len(row) + 1) for row in rows]
        device = sample_index.device
        return {
            "ref_logps_chosen": torch.tensor([row[0] for row in rows], dtype=torch.float32, device=device),
            "ref_logps_rejected": torch.tensor(rejected, dtype=torch.float32, device=device),
        }

    # ----------------------------------------------------------------------------------------------
    # changes

    def rejected(self, index: int) -> list[str]:
        return list(self.dataset.items[index].sample.rejected)

    def replace_rejected(self, index: int, rejected: list[str]) -> None:
        """Clip ``index`` with other rejected transcripts; its reference log-probs are then to be computed again."""
        self.dataset.replace_rejected(index, rejected)
        self.reference[index] = None

    def set_reference(self, values: dict[int, list[float]]) -> None:
        for index, row in values.items():
            if len(row) != len(self.dataset.items[index].segments):
                raise ValueError(f"clip {index}: {len(row)} reference log-probs for its transcripts")
            self.reference[index] = [float(v) for v in row]

    def missing_reference(self) -> list[int]:
        return [i for i, row in enumerate(self.reference) if row is None]

    # ----------------------------------------------------------------------------------------------
    # checkpoints, audit files, agreement between processes

    def chosen_digest(self) -> str:
        """The training set the table belongs to: its chosen transcripts, in order."""
        chosen = [item.sample.chosen for item in self.dataset.items]
        return hashlib.sha256(json.dumps(chosen).encode()).hexdigest()

    def state_dict(self) -> dict:
        return {
            "chosen_sha256": self.chosen_digest(),
            "rejected": [self.rejected(i) for i in range(len(self))],
            "reference": list(self.reference),
            "refreshed_at": self.refreshed_at,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["chosen_sha256"] != self.chosen_digest() or len(state["rejected"]) != len(self):
            raise CheckpointError(
                "the checkpoint's pairs (pairs.json) belong to other training data than this run's train_data: "
                "resume with the train_data the run was started with"
            )
        for index, rejected in enumerate(state["rejected"]):
            if rejected != self.rejected(index):
                self.dataset.replace_rejected(index, rejected)
        self.reference = [None if row is None else list(row) for row in state["reference"]]
        self.refreshed_at = state["refreshed_at"]

    def digest(self) -> str:
        """A digest of every pair and reference log-prob: equal on every process when they train on the same."""
        return hashlib.sha256(json.dumps([self.state_dict()["rejected"], self.reference]).encode()).hexdigest()

    def manifest_records(self) -> list[dict]:
        """The pairs as manifest records (the trainer reads them as training data). A clip of a Hugging Face
        dataset held in memory has no file to name: its record names its row ("source") instead of "audio"."""
        records = []
        for item in self.dataset.items:
            sample = item.sample
            record = {"audio": str(sample.audio_path.resolve())} if sample.audio_path is not None else {}
            if sample.audio_path is None:
                record["source"] = sample.source
            record.update(duration=round(sample.duration, 4), chosen=sample.chosen, rejected=list(sample.rejected))
            if sample.language:
                record["language"] = sample.language
            records.append(record)
        return records
