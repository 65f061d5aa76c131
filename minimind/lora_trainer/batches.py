"""The data of a run: the SFT data sets (``load_data``), each epoch's optimizer steps as micro-batches of
indices (``epoch_micro_batches``, ``epoch_steps``), the DataLoader that pads them (``collate``,
``data_loader``), and the grouping of micro-batches back into steps (``windows``).
"""
from __future__ import annotations

from functools import partial
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from torch.utils.data import DataLoader

from ..cli import CLIError
from .config import TrainConfig
from .runtime import Runtime


def load_sft(path: str, tokenizer, max_seq_len: int, flag: str):
    from ..dataset import SFTDataset

    try:
        return SFTDataset(path, tokenizer, max_seq_len=max_seq_len, pad=False)
    except (OSError, ValueError) as err:
        raise CLIError(f"{flag} {path!r}: {err}")


def load_data(cfg: TrainConfig, tokenizer, rt: Runtime):
    """``(train_set, eval_set)``: the training data set and the evaluation one (None without
    ``--eval_data``); with several adapters a :class:`~minimind.dataset.TaggedDatasets` over their data
    sets and a list of evaluation sets, one per adapter.

    Raises:
        CLIError: an unreadable data set, or one smaller than a batch (named).
    """
    from ..dataset import TaggedDatasets

    size = cfg.batch_size * rt.world_size
    if not cfg.multi:
        train_set = load_sft(cfg.data_path, tokenizer, cfg.max_seq_len, "--data_path")
        eval_set = load_sft(cfg.eval_data, tokenizer, cfg.max_seq_len, "--eval_data") if cfg.eval_data else None
        if len(train_set) < size:
            raise CLIError(f"--data_path has {len(train_set)} conversations, fewer than one batch of "
                           f"{size}; lower --batch_size")
        return train_set, eval_set
    train_sets = [load_sft(path, tokenizer, cfg.max_seq_len, "--data_path") for path in cfg.data_paths]
    eval_sets = [load_sft(path, tokenizer, cfg.max_seq_len, "--eval_data") for path in cfg.eval_paths]
    for name, path, data in zip(cfg.lora_names, cfg.data_paths, train_sets):
        if len(data) < size:
            raise CLIError(f"--data_path {path!r} (adapter {name!r}) has {len(data)} conversations, fewer than one "
                           f"batch of {size} (every step takes --batch_size rows of each data set); lower --batch_size")
    return TaggedDatasets(train_sets), eval_sets or None


def collate(batch, pad_id: int):
    """(input_ids, labels), padded on the right to the longest item; items tagged with their data set
    (several adapters) give (input_ids, labels, data set of each row)."""
    from ..dataset import pad_batch

    if batch and len(batch[0]) == 3:
        ids, labels = pad_batch([item[:2] for item in batch], pad_id)
        return ids, labels, torch.tensor([item[2] for item in batch], dtype=torch.long)
    return pad_batch(batch, pad_id)


def epoch_micro_batches(n: int, epoch: int, cfg: TrainConfig, rt: Runtime) -> List[List[int]]:
    """This process's micro-batches for one epoch, as dataset indices.

    One permutation per (seed, epoch), cut into global batches of ``batch_size × world_size`` (an
    incomplete last batch is dropped); process r takes positions r, r + W, ... of each global batch, so a
    run on W processes sees exactly the batches of a single process with W times its batch size.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)).tolist()
    size = cfg.batch_size * rt.world_size
    return [order[start:start + size][rt.rank::rt.world_size] for start in range(0, n - size + 1, size)]


def epoch_steps(cfg: TrainConfig, rt: Runtime, train_set, epoch: int) -> List[List[List[int]]]:
    """One epoch's optimizer steps, each a list of micro-batches of ``train_set`` indices.

    One data set: its micro-batches (:func:`epoch_micro_batches`) in windows of ``--accumulation_steps``.
    Several (one per adapter): every step takes ``--batch_size`` rows of each data set, the very rows a run
    of that adapter alone would take at that step: data set k follows its own epochs (its own shuffles,
    ``steps_per_epoch(k)`` steps each), the run's epoch is one pass over the largest data set, and the
    smaller ones go round again meanwhile. Micro-batch j of a step joins the j-th micro-batch of each data set.
    """
    acc = cfg.accumulation_steps

    def own_steps(n: int, own_epoch: int) -> List[List[List[int]]]:
        micro = epoch_micro_batches(n, own_epoch, cfg, rt)
        return [micro[i:i + acc] for i in range(0, len(micro), acc)]

    datasets = getattr(train_set, "datasets", None)
    if datasets is None:
        return own_steps(len(train_set), epoch)
    per_epoch = [len(own_steps(len(data), 0)) for data in datasets]
    cache: Dict[Tuple[int, int], List[List[List[int]]]] = {}
    steps = []
    for step in range(epoch * max(per_epoch), (epoch + 1) * max(per_epoch)):
        parts = []
        for k, (data, offset, count) in enumerate(zip(datasets, train_set.offsets, per_epoch)):
            key = (k, step // count)
            if key not in cache:
                cache[key] = own_steps(len(data), step // count)
            parts.append([[offset + i for i in micro] for micro in cache[key][step % count]])
        steps.append([sum((part[j] for part in parts if j < len(part)), [])
                      for j in range(max(len(part) for part in parts))])
    return steps


def data_loader(dataset, batches: List[List[int]], pad_id: int, num_workers: int) -> DataLoader:
    """A DataLoader over the given index batches; workers tokenize and pad ahead of the training step."""
    return DataLoader(dataset, batch_sampler=batches, collate_fn=partial(collate, pad_id=pad_id),
                      num_workers=num_workers, persistent_workers=False)


def windows(loader, sizes: Sequence[int]) -> Iterator[list]:
    """Groups consecutive micro-batches into optimizer steps of ``sizes[0]``, ``sizes[1]``, ... micro-batches."""
    window, sizes = [], iter(sizes)
    size = next(sizes, 0)
    for batch in loader:
        window.append(batch)
        if len(window) == size:
            yield window
            window, size = [], next(sizes, 0)
    if window:
        yield window
