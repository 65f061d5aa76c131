"""What ``minimind.train_lora`` orchestrates, one job per file (read in this order):

* ``config.py``: ``TrainConfig``, the command line (``parse_args``), ``check_adapters``, ``resume_keys``;
* ``runtime.py``: ``Runtime`` (device, processes, autocast), the DDP/FSDP process setup, ``shard_model``;
* ``model.py``: the frozen base and its tokenizer, the adapters added to it, the optimizer's parameter groups;
* ``batches.py``: the data sets, each epoch's steps as micro-batches, the DataLoader, ``windows``;
* ``run.py``: ``Run``, everything a run holds, and the adapter files it writes;
* ``state.py``: the training-state file format (``save_checkpoint``, ``load_checkpoint``), the metrics a run
  continues;
* ``report.py``: the header, the answers before and after, the end-of-run summary (``finish``).

Each file imports only the ones above it (and ``minimind``'s modules); none imports ``train_lora``.
"""
