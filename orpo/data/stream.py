"""Training pairs read as a stream (``streaming: true``): corpora too large to check up front.

The source is a Hugging Face ``IterableDataset`` (:func:`orpo.data.hf.open_stream`: WebDataset tar shards,
parquet files, a saved dataset read in shards, or a dataset ``load_dataset`` streams). Each process reads its own
disjoint part (``datasets.distributed.split_dataset_by_node``: whole shards when there are at least as many as
processes), and ``datasets`` gives each data-loader worker of a process its own shards of that part (a worker
left without a shard reads nothing and ends).

* **Shuffling**: the stream is read in blocks of ``shuffle_buffer`` rows; each block is put in a random order
  drawn from (seed, epoch, reader, block). With ``group_by_length`` the block is instead sorted by packed
  decoder length, cut into batches of similar length, and the batches are shuffled. When the stream ends the
  next epoch starts it again.
* **Exact resume**: the reader's position is (epoch, block, the stream's own ``state_dict()`` at the block's
  start, entries of the block done). A resumed reader re-reads that block (at most ``shuffle_buffer`` rows, no
  audio decoded), orders it the same way and skips what was done. ``torchdata``'s ``StatefulDataLoader`` keeps
  this position per worker and knows which batches were consumed; the trainer keeps its state in every
  checkpoint. (``datasets``' own shuffle buffer would lose its contents on resume.)
* **Bad samples** cannot be checked up front. A row that does not parse, or whose audio does not decode, is
  reported with its source (shard and key, or row) and reason: it travels with the next batch (``bad_samples``)
  to the training process, which stops the run unless ``max_bad_samples`` allows it (then it is logged, counted
  in the metrics and listed in ``output_dir/bad_samples.jsonl``). A bad sample is skipped, never replaced by
  another: the stream's next sample simply follows. Clips outside ``[min_audio_len, max_audio_len]`` are
  dropped and named the same way (``dropped``), as a manifest's are.
"""

from __future__ import annotations

import math
from itertools import islice

import numpy as np
import torch

from orpo.data.audio import SAMPLE_RATE
from orpo.data.dataset import model_input
from orpo.data.encode import encode_sample
from orpo.data.hf import stream_audio, stream_row, stream_sample, stream_where
from orpo.data.normalize import TextNormalizer
from orpo.errors import ManifestError


class StreamedPreferences(torch.utils.data.IterableDataset):
    """The training items of a stream, with the position of the reader that makes them (see the module)."""

    def __init__(self, source, label: str, base, settings: dict, tokens, feature_extractor, augment=None):
        self.source, self.label, self.base = source, label, base
        self.settings = settings  # seed, shuffle_buffer, batch_size, group_by_length, min/max_len, columns, ...
        self.tokens = tokens
        self.feature_extractor = feature_extractor
        self.augment = augment
        self.rank, self.world = settings["rank"], settings["world"]
        self.position = {"epoch": 0, "block": 0, "block_state": None, "done": 0}

    # the reader's position (StatefulDataLoader calls these in the worker that reads)

    def state_dict(self) -> dict:
        return dict(self.position)

    def load_state_dict(self, state: dict) -> None:
        self.position = dict(state)

    # reading

    def reader(self) -> tuple[int, int]:
        """(this reader's index, readers in all): process x data-loader worker (its seeds draw from it)."""
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        return self.rank * workers + worker_id, self.world * workers

    def part(self, block_state):
        """This process's part of the stream, at ``block_state`` (None: its start); read in a data-loader worker,
        ``datasets`` narrows it to that worker's shards itself."""
        from datasets.distributed import split_dataset_by_node

        part = split_dataset_by_node(self.source, rank=self.rank, world_size=self.world)
        if block_state is not None:
            part.load_state_dict(block_state)
        return part

    def __iter__(self):
        normalizer = TextNormalizer()
        while True:  # epochs: the trainer stops after max_steps
            rows_read, items = 0, 0
            from_start = self.position["block"] == 0 and self.position["done"] == 0  # not resumed mid-epoch
            block_state = self.position["block_state"]  # where the current block starts (None: the part's start)
            part = self.part(block_state)
            rows, first = iter(part), True
            while True:
                block_state = block_state if first else part.state_dict()
                first = False
                block = list(islice(rows, self.settings["shuffle_buffer"]))
                if not block:
                    break
                rows_read += len(block)
                entries = [self.parse(row, k, normalizer) for k, row in enumerate(block)]
                for k in self.order(entries)[self.position["done"] :]:
                    self.position |= {"block_state": block_state, "done": self.position["done"] + 1}
                    for item in self.item(entries[k], normalizer):
                        items += 1
                        yield item
                self.position |= {"block": self.position["block"] + 1, "block_state": None, "done": 0}
            if from_start and not rows_read:
                return  # a reader without a shard (more data-loader workers than shards): it ends, the others go on
            if from_start and not items:
                self.nothing_to_train_on()
            self.position |= {"epoch": self.position["epoch"] + 1, "block": 0, "block_state": None, "done": 0}

    def nothing_to_train_on(self) -> None:
        """A whole pass over a part whose rows are all bad or outside the length limits would be read again for
        ever: an error, naming what it met."""
        waiting = self.position.get("waiting", {})
        met = [f"{r['source']}: {r['reason']}" for r in waiting.get("bad_samples", [])[:3]]
        met += [f"{source}: outside the length limits" for source in waiting.get("dropped", [])[:3]]
        raise ManifestError(
            f"{self.label}: a whole pass over a reader's part gave no training sample: {'; '.join(met)}"
        )

    def parse(self, row: dict, row_in_block: int, normalizer) -> dict:
        """One row of a block, its transcripts parsed and tokenised (its audio not yet read): an entry to yield,
        or a bad sample to report."""
        ordinal = self.position["block"] * self.settings["shuffle_buffer"] + row_in_block
        row, audio_column = stream_row(row, self.settings["columns"]["audio"])
        where = stream_where(self.label, row, ordinal)
        try:
            sample = stream_sample(row, where, audio_column, self.base, self.settings["columns"], math.inf)
            length = sum(len(ids) - 1 for ids, _ in self.encode(sample, normalizer).segments)
        except ManifestError as err:
            return {"bad": {"source": where, "reason": str(err)}}
        return {"row": row, "audio_column": audio_column, "where": where, "ordinal": ordinal, "length": length}

    def encode(self, sample, normalizer):
        return encode_sample(sample, self.tokens, self.settings["language"], normalizer)

    def order(self, entries: list[dict]) -> list[int]:
        """The block's order: a seeded permutation, or length-grouped batches in a seeded order."""
        reader, _ = self.reader()
        seed = [self.settings["seed"] % 2**63, self.position["epoch"], reader, self.position["block"]]
        rng = np.random.default_rng(seed)
        if not self.settings["group_by_length"]:
            return rng.permutation(len(entries)).tolist()
        by_length = sorted(range(len(entries)), key=lambda k: -entries[k].get("length", 0))
        size = self.settings["batch_size"]
        batches = [by_length[start : start + size] for start in range(0, len(by_length), size)]
        return [k for b in rng.permutation(len(batches)).tolist() for k in batches[b]]

    def item(self, entry: dict, normalizer):
        """The training item of an entry (its audio decoded, checked, augmented, featurised), or nothing for a
        bad or dropped one, whose record rides on the next item."""
        if "bad" in entry:
            self.pending("bad_samples", entry["bad"])
            return
        where, row, column = entry["where"], entry["row"], entry["audio_column"]
        try:
            audio = stream_audio(row, where, column, self.base)
            duration = len(audio) / SAMPLE_RATE
            sample = stream_sample(row, where, column, self.base, self.settings["columns"], duration)
            encoded = self.encode(sample, normalizer)
        except ManifestError as err:
            self.pending("bad_samples", {"source": where, "reason": str(err)})
            return
        if not self.settings["min_len"] <= duration <= self.settings["max_len"]:
            self.pending("dropped", where)
            return
        if self.augment is not None:  # draws from (seed, epoch, reader, row): no two readers draw alike
            reader, _ = self.reader()
            audio = self.augment(audio, (reader << 40) + entry["ordinal"], self.position["epoch"])
        item = {
            **model_input(audio, self.feature_extractor, self.settings["raw_audio"]),
            "segments": encoded.segments,
            "index": -1,
            "source": where,
        }
        yield item | self.take_pending()

    def pending(self, kind: str, record) -> None:
        """A record for the next item; kept in the position, so a resumed reader still delivers it."""
        waiting = self.position.get("waiting", {})
        self.position["waiting"] = waiting | {kind: waiting.get(kind, []) + [record]}

    def take_pending(self) -> dict:
        return self.position.pop("waiting", {})
