"""MiniMind LoRA SFT: ``python -m minimind.train_lora [--fused] [...]``.

MiniMind's LoRA trainer on lora_kernels. It takes the arguments of both MiniMind generations with their
meaning: the 2025 interface of our design documents (``--out_dir --dim --n_layers --ddp --local_rank``)
and MiniMind's current one (``--save_dir --from_weight --from_resume --use_compile``, DDP switched on by
itself under torchrun). With no argument it fine-tunes the bundled tiny base on the bundled identity data
(about 30 s on a 2-core CPU).

This file orchestrates and reads top to bottom: ``setup`` (device, processes, base, LoRA, data, optimizer,
output folder), ``train_step`` (one optimizer step), ``log_step`` (progress bar, metrics, evaluation),
``checkpoint`` (the training state, then the adapters), then ``train``, the loop, and ``main``. What it
orchestrates lives in ``minimind.lora_trainer``, one job per file:

* ``config.py``: ``TrainConfig`` and the command line (``parse_args``, both generations' arguments),
  ``check_adapters``, ``resume_keys``;
* ``runtime.py``: ``Runtime`` (device, processes, autocast), the DDP/FSDP process setup, ``shard_model``;
* ``model.py``: the frozen base and tokenizer (``load_base``), the adapters (``add_lora``), ``param_groups``;
* ``batches.py``: the data sets, each epoch's steps as micro-batches, the DataLoader, ``windows``;
* ``run.py``: ``Run``, everything a run holds, and the adapter files it writes;
* ``state.py``: the training-state file (``save_checkpoint``, ``load_checkpoint``), the metrics a run continues;
* ``report.py``: the header (``describe``), the answers before and after, the end-of-run summary (``finish``);

and beside it ``minimind.run_dir`` (where a run's files go, the lock, the metrics file), ``minimind.training``
(the learning-rate schedule, the loss, ``evaluate``) and ``minimind.plot_lora`` (the loss curve, the overview).

Where the files go (``run_paths``): with ``--out_dir DIR`` (ours, the default ``out``)

* ``DIR/lora/{lora_name}_{hidden_size}[_moe].pth``: the adapter in MiniMind's format (MiniMind's
  ``load_lora`` reads it), and the same adapter as ``.safetensors`` (``lora_kernels.load_lora``); with
  ``--use_dora`` (DoRA: a trained magnitude per output row) the ``.safetensors`` alone, since MiniMind's format
  has no magnitude (and MiniMind's layout, which names a ``.pth`` adapter, is refused then);
* ``DIR/checkpoint.pt``: the training state, for ``--resume``; ``DIR/metrics.jsonl``: one JSON object per
  log step, appended; ``DIR/loss_curve.png``, ``DIR/lora_overview.png`` and ``DIR/lora_stats.json``
  (``minimind.plot_lora``) at the end;

with ``--save_dir DIR`` (MiniMind's layout) the adapter is ``DIR/{lora_name}_{hidden_size}[_moe].pth`` and
the training state ``DIR/../checkpoints/{lora_name}_{hidden_size}[_moe]_resume.pth``, as MiniMind writes
them; our extra files sit beside the training state, named after the same stem. The adapter is saved every
``--save_interval`` steps and at the end, the training state every ``--save_interval`` steps.

Several adapters at once: ``--data_path a.jsonl,b.jsonl --lora_name a,b`` trains adapter ``a`` on ``a.jsonl``
and ``b`` on ``b.jsonl`` on one base. Every step takes ``--batch_size`` rows of each data set (equal rows per
data set, whatever their sizes: data set k follows its own shuffled epochs, the rows a run of adapter k alone
would take at that step; the run's epoch is one pass over the largest data set) and runs them as one batch
through the model under ``lora_kernels.mixed_adapters``: the base once per batch, each row through its own
adapter. The loss back-propagated is the sum of each adapter's own mean loss, gradients are clipped per
adapter, and AdamW is per parameter, so each adapter trains exactly as it would alone (tested: fp32, 1e-5;
with ``--lora_dropout`` the masks differ from a run alone, and an MoE base's auxiliary loss is the mixed
batch's). Each adapter gets the files of a run of it alone (``DIR/lora/a_{hidden_size}.pth``, ...), the
metrics ``loss/a``, ``loss/b`` beside their mean ``loss``, the overview in ``DIR/a/``; the shared files of
MiniMind's layout take the stem ``a+b``. Past three adapters (tested with 16) the progress bar shows their mean
``loss`` and the ``worst`` adapter instead of a ``loss_<name>`` each, the shared files take the stem
``a+15more_<hash>`` (``run_stem``), and one prompt per adapter is answered by default.

The output is owned by one run at a time (a lock file naming the PID); every file is written to a
temporary name, fsynced and renamed, so a crash never leaves half a file (and the next run removes the
temporary files a killed one left). The loss of one optimizer step is the mean cross-entropy over all
assistant tokens of its micro-batches (on all processes), plus the MoE auxiliary loss.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from atomic_io import remove_stale_temporaries
from lora_kernels import disable_lora, save_lora
from lora_kernels.fsdp import gathered_lora

from .cli import CLIError, run_cli, writing
from .lora_trainer.batches import data_loader, epoch_steps, load_data, windows
from .lora_trainer.config import NAMED_ADAPTERS, TrainConfig, check_adapters, model_adapters, parse_args, run_stem
from .lora_trainer.model import add_lora, load_base, param_groups
from .lora_trainer.report import answer, answer_prompts, describe, finish
from .lora_trainer.run import Run, adapter_files
from .lora_trainer.runtime import agree, setup_runtime, shard_model
from .lora_trainer.state import load_checkpoint, optimizer_state, remove_earlier_plots, save_checkpoint, start_metrics
from .run_dir import OutputLock, append_metrics, check_out_dir, run_paths
from .training import evaluate, row_loss_sums, row_supervised_tokens, supervised_tokens, token_loss_sum


# ---------------------------------------------------------------------------------------------------
# Setup


def setup(cfg: TrainConfig) -> Run:
    """Validates everything, then takes the output folder: nothing is written before the checks pass."""
    from tqdm import tqdm

    rt = setup_runtime(cfg)
    error, lock, note = None, None, None
    try:
        check_adapters(cfg)
        if rt.main:
            check_out_dir(Path(cfg.out_dir))
        model, tokenizer = load_base(cfg, rt)
        backend = add_lora(model, cfg, rt)
        train_set, eval_set = load_data(cfg, tokenizer, rt)
        paths = run_paths(cfg.layout, cfg.out_dir, run_stem(cfg), model.config.hidden_size, model.config.use_moe)
        if rt.main:
            paths.lock.parent.mkdir(parents=True, exist_ok=True)
            lock = OutputLock(paths.lock)
            note = lock.acquire()
    except CLIError as err:
        error = err
    agree(rt, error)

    run = None
    try:  # from here on the lock is held: give it back whatever fails
        per_epoch = len(epoch_steps(cfg, rt, train_set, 0))
        total = min(per_epoch * cfg.epochs, cfg.max_steps or per_epoch * cfg.epochs)
        if cfg.fsdp:  # before the optimizer: sharding replaces every parameter by a DTensor one
            shard_model(model)
        groups = param_groups(model, cfg)
        train_model = model
        if rt.world_size > 1 and not cfg.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda"
                                                  else None, find_unused_parameters=bool(model.config.use_moe))
        if cfg.use_compile:
            # Padded lengths vary: one dynamic graph for all. On CUDA, CUDA graphs as well ("reduce-overhead"):
            # the fused LoRA path draws its dropout seed on the GPU and reads nothing back, so a captured step
            # replays with fresh masks and no per-launch host cost.
            mode = "reduce-overhead" if rt.device.type == "cuda" else None
            train_model = torch.compile(train_model, dynamic=True, mode=mode)
        run = Run(cfg, rt, model, train_model, tokenizer, train_set, eval_set, torch.optim.AdamW(groups),
                  torch.amp.GradScaler(rt.device.type, enabled=rt.autocast_dtype == torch.float16), paths, lock,
                  backend, per_epoch, total)
        run.names, run.adapter_files = model_adapters(cfg), adapter_files(cfg, model, paths)
        if rt.main:
            outputs = paths.outputs() + [f for files in run.adapter_files.values() for f in files if f is not None]
            stale = [p for path in outputs for p in remove_stale_temporaries(path)]
            rt.notes += [note] if note else []
            if stale:
                rt.notes.append(f"removed {len(stale)} temporary file(s) a killed run left: {stale[0].name}...")
        if cfg.resume:
            run.step = load_checkpoint(run)
        if rt.main:
            run.rows = start_metrics(run)
            if not run.rows and run.step == 0:
                remove_earlier_plots(run)
        # Under --fsdp every process takes part in each forward, so all of them answer (rank 0 prints), and
        # only at the end: FSDP2 keeps the all-gather buffers it allocates under generation's inference mode,
        # which training could not write afterwards (the base is frozen, so "adapter off" is the same then).
        if rt.main or cfg.fsdp:
            run.prompts, run.prompt_adapters = answer_prompts(run)
        if run.prompts and not cfg.fsdp:
            with disable_lora(model):
                run.before = answer(run, run.prompts, adapters=[None] * len(run.prompts) if cfg.multi else None)
        run.log(describe(run))
        if cfg.use_wandb and rt.main:
            run.wandb = start_wandb(run)
        run.bar = tqdm(total=total, initial=run.step, disable=not rt.main or not cfg.progress, unit="step",
                       dynamic_ncols=True)
    except BaseException:
        if run is not None:
            run.close()
        elif lock is not None:
            lock.release()
        raise
    return run


def start_wandb(run: Run):
    try:
        import wandb
    except ImportError:
        run.log("--use_wandb: wandb is not installed (pip install wandb); continuing without it")
        return None
    wandb.init(project=run.cfg.wandb_project, config=asdict(run.cfg))
    return wandb


# ---------------------------------------------------------------------------------------------------
# One optimizer step


def adapter_token_counts(run: Run, micro_batches: list) -> torch.Tensor:
    """(adapters,) float: the supervised tokens of each adapter's rows over the step's micro-batches."""
    counts = torch.zeros(len(run.names))
    for micro in micro_batches:
        if len(micro) == 3:  # (ids, labels, data set of each row): one adapter per data set
            counts.index_add_(0, micro[2], row_supervised_tokens(micro[1]).float())
        else:
            counts[0] += supervised_tokens(micro[1])
    return counts


def adapter_loss_sums(run: Run, ids: torch.Tensor, labels: torch.Tensor,
                      sources: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of each adapter's rows, (adapters,), and the MoE auxiliary loss. Several adapters:
    call it inside ``mixed_adapters`` (see :func:`rows_through_adapters`): one forward of the whole batch."""
    if sources is None:
        ce_sum, aux = token_loss_sum(run.train_model, ids, labels)
        return ce_sum.reshape(1), aux
    row_sums, aux = row_loss_sums(run.train_model, ids, labels)
    sums = torch.zeros(len(run.names), device=row_sums.device, dtype=row_sums.dtype)
    return sums.index_add(0, sources.to(row_sums.device), row_sums), aux


def rows_through_adapters(run: Run, sources: Optional[torch.Tensor]):
    """Several adapters: ``mixed_adapters`` with each row's adapter (the base runs once for the whole batch,
    each row adds its own adapter's term, and each adapter's gradient comes from its own rows only)."""
    if sources is None:
        return contextlib.nullcontext()
    from lora_kernels import mixed_adapters

    return mixed_adapters(run.model, [run.names[k] for k in sources.tolist()])


def clip_per_adapter(run: Run) -> None:
    """Clips each adapter's gradient norm to ``--grad_clip`` on its own: one norm over all adapters would
    let one adapter's gradient shrink another's, and training them together would differ from apart.

    One adapter: ``clip_grad_norm_``. Several: what ``clip_grad_norm_`` does for each, batched over the
    adapters: one ``_foreach_norm`` over every gradient, each adapter's norm of its gradients' norms, and one
    ``_foreach_mul_`` per adapter by its (device-side) factor min(1, clip / (norm + 1e-6)): a few kernels
    whatever the count of adapters, and no wait for the device.
    """
    grads: Dict[Optional[str], list] = {}
    for group in run.optimizer.param_groups:
        grads.setdefault(group.get("adapter"), []).extend(p.grad for p in group["params"] if p.grad is not None)
    if len(grads) == 1:
        torch.nn.utils.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]], run.cfg.grad_clip)
        return
    per_adapter = [g for g in grads.values() if g]
    counts = {len(g) for g in per_adapter}
    if len(counts) != 1 or len({(t.device, t.dtype) for g in per_adapter for t in g}) != 1:
        for adapter_grads in per_adapter:  # unequal parameter lists (or mixed devices): one adapter at a time
            torch.nn.utils.clip_grads_with_norm_(adapter_grads, run.cfg.grad_clip,
                                                 torch.nn.utils.get_total_norm(adapter_grads))
        return
    flat = [t for g in per_adapter for t in g]
    norms = torch.stack(torch._foreach_norm(flat)).view(len(per_adapter), -1)
    factors = (run.cfg.grad_clip / (torch.linalg.vector_norm(norms, dim=1) + 1e-6)).clamp_(max=1.0)
    for k, adapter_grads in enumerate(per_adapter):
        torch._foreach_mul_(adapter_grads, factors[k])


def all_finite(tensors: Sequence[torch.Tensor], across_processes: bool = False) -> bool:
    """Whether every element of ``tensors`` is finite, with one read from the device: the max-norm of each
    tensor is NaN or inf exactly when the tensor holds a NaN or an inf (a max cannot overflow). A sharded
    (FSDP2, DTensor) tensor is checked on this process's shard; ``across_processes``: every process gets the
    answer for all shards (one all-reduce), so that all of them stop together."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    if not local:
        return True
    finite = torch.stack(torch._foreach_norm(local, float("inf"))).isfinite().all().float()
    if across_processes:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def train_step(run: Run, micro_batches: list) -> float:
    """Forward and backward over the step's micro-batches, clip, step; returns the step's loss.

    With several adapters each micro-batch holds rows of every data set and runs once through the model,
    each row through its own adapter. What is back-propagated is the sum over adapters of each adapter's
    own mean loss, so each adapter gets exactly the gradient of a run of it alone on its rows; gradients
    are clipped per adapter and ``run.last_losses`` holds each adapter's loss (the return value: their mean).

    Raises:
        CLIError: the loss is not finite (nothing is written; the last saved files stay as they were), or
            the step has no assistant token (every answer truncated away by --max_seq_len).
    """
    cfg, rt = run.cfg, run.rt
    n_tokens = adapter_token_counts(run, micro_batches)
    if rt.world_size > 1:
        dist.all_reduce(n_tokens)
    for k, count in enumerate(n_tokens.tolist()):
        if count == 0:
            where = f"{cfg.data_paths[k]} (adapter {run.names[k]!r})" if cfg.multi else cfg.data_path
            raise CLIError(f"step {run.step + 1}: no assistant token left after truncating to --max_seq_len "
                           f"{cfg.max_seq_len} in {where}; raise --max_seq_len")
    lr = run.lr_at(run.step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    loss_sum, aux_sum = torch.zeros(len(run.names), device=rt.device), torch.zeros((), device=rt.device)
    for j, micro in enumerate(micro_batches):
        ids, labels = micro[0].to(rt.device), micro[1].to(rt.device)
        sources = micro[2] if len(micro) == 3 else None
        # FSDP2 has no no_sync: it reduce-scatters the (small) LoRA gradients after every micro-batch.
        sync = j == len(micro_batches) - 1 or rt.world_size == 1 or cfg.fsdp
        with rows_through_adapters(run, sources):
            with (contextlib.nullcontext() if sync else run.train_model.no_sync()), rt.autocast():
                ce_sums, aux = adapter_loss_sums(run, ids, labels, sources)
                loss = (ce_sums * rt.world_size / n_tokens.to(rt.device)).sum() + aux / len(micro_batches)
            run.scaler.scale(loss).backward()
        loss_sum += ce_sums.detach()
        aux_sum += aux.detach() / len(micro_batches)
        run.tokens_since += int((ids != run.tokenizer.pad_token_id).sum())  # real tokens, not padding
    if rt.world_size > 1:
        dist.all_reduce(loss_sum)
    aux_loss = aux_sum.item()
    losses = [total / count + aux_loss for total, count in zip(loss_sum.tolist(), n_tokens.tolist())]
    run.last_losses = dict(zip(cfg.lora_names if cfg.multi else [cfg.lora_name], losses))
    step_loss = sum(losses) / len(losses)
    bad = [name for name, value in run.last_losses.items() if not math.isfinite(value)]
    if bad:
        which = f" of adapter {bad[0]!r}" if cfg.multi else ""
        raise CLIError(f"the loss{which} is {run.last_losses[bad[0]]} at step {run.step + 1} (learning rate "
                       f"{lr:.3g}): stopped before updating or writing anything; lower --learning_rate (the last "
                       "saved files are intact)")
    if cfg.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        clip_per_adapter(run)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    if not all_finite([p for g in run.optimizer.param_groups for p in g["params"]], across_processes=cfg.fsdp):
        raise CLIError(f"the update of step {run.step} (learning rate {lr:.3g}) made the adapter non-finite: "
                       "stopped before writing it; lower --learning_rate (the last saved files are intact)")
    return step_loss


# ---------------------------------------------------------------------------------------------------
# Log, evaluate, checkpoint


def eval_loss(run: Run, eval_set=None) -> float:
    eval_set = run.eval_set if eval_set is None else eval_set
    batches = [list(range(i, min(i + run.cfg.batch_size, len(eval_set))))
               for i in range(0, len(eval_set), run.cfg.batch_size)]
    loader = data_loader(eval_set, batches, run.tokenizer.pad_token_id, 0)
    return evaluate(run.model, loader, run.rt.device, run.rt.autocast)


@torch.no_grad()
def eval_losses(run: Run) -> Dict[str, float]:
    """Several adapters: each one's evaluation loss on its own evaluation set (the mean cross-entropy per
    assistant token, as :func:`eval_loss` of a run of it alone), all in mixed batches: batch j holds rows
    ``j·batch_size ...`` of every evaluation set that has them, each row through its own adapter
    (``mixed_adapters``), so 16 adapters take the forwards of the largest set alone, not of all 16 sets."""
    from lora_kernels import mixed_adapters

    from .dataset import TaggedDatasets

    cfg, rt, model = run.cfg, run.rt, run.model
    tagged = TaggedDatasets(run.eval_set)
    size = cfg.batch_size
    batches = [[offset + i for offset, data in zip(tagged.offsets, tagged.datasets)
                for i in range(start, min(start + size, len(data)))]
               for start in range(0, max(len(data) for data in tagged.datasets), size)]
    sums = torch.zeros(len(run.names), dtype=torch.float64, device=rt.device)
    counts = torch.zeros(len(run.names), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for ids, labels, sources in data_loader(tagged, batches, run.tokenizer.pad_token_id, 0):
            with mixed_adapters(model, [run.names[k] for k in sources.tolist()]), rt.autocast():
                row_sums, _ = row_loss_sums(model, ids.to(rt.device), labels.to(rt.device))
            sums.index_add_(0, sources.to(rt.device), row_sums.double())
            counts.index_add_(0, sources, row_supervised_tokens(labels).double())
    finally:
        model.train(was_training)
    return {name: total / count if count else math.nan
            for name, total, count in zip(run.names, sums.tolist(), counts.tolist())}


def loss_fields(run: Run, key: str, losses: Dict[str, float]) -> Dict[str, float]:
    """Metrics fields: ``key`` (their mean) and, with several adapters, ``key/<adapter>`` each."""
    row = {key: round(sum(losses.values()) / len(losses), 6)}
    if run.cfg.multi:
        row.update({f"{key}/{name}": round(value, 6) for name, value in losses.items()})
    return row


def bar_losses(run: Run, loss: float) -> Dict[str, str]:
    """The progress bar's losses: ``loss`` for one adapter; ``loss_<name>`` each for up to
    ``NAMED_ADAPTERS`` adapters; for more (16 fields would not fit a line), ``loss`` (their mean, as in the
    metrics) and ``worst`` (the adapter with the highest loss, and its loss). metrics.jsonl has every one."""
    if not run.cfg.multi:
        return {"loss": f"{loss:.4f}"}
    if len(run.last_losses) <= NAMED_ADAPTERS:
        return {f"loss_{name}": f"{value:.4f}" for name, value in run.last_losses.items()}
    worst = max(run.last_losses, key=run.last_losses.get)
    return {"loss": f"{loss:.4f}", "worst": f"{worst} {run.last_losses[worst]:.4f}"}


def log_step(run: Run, epoch: int, loss: float, first: bool) -> None:
    """Progress bar, and every --log_interval steps a metrics line (appended to the metrics file)."""
    cfg, rt, step = run.cfg, run.rt, run.step
    elapsed = max(time.perf_counter() - run.time_since, 1e-9)
    tok_s = run.tokens_since * rt.world_size / elapsed
    run.bar.update(1)
    shown = {**bar_losses(run, loss), "lr": f"{run.lr_at(step - 1):.2e}", "tok_s": f"{tok_s:,.0f}"}
    run.bar.set_postfix(ordered_dict=shown, refresh=False)  # in this order (keyword arguments would be sorted)
    logged = step % cfg.log_interval == 0 or step == run.total_steps or first
    evaluated = logged and run.eval_set is not None and is_save_step(run)
    losses_eval = None
    if evaluated and (rt.main or cfg.fsdp):  # under --fsdp every process takes part in the evaluation's forwards
        losses_eval = eval_losses(run) if cfg.multi else eval_loss(run)
    if not rt.main or not logged:
        return
    row = {"step": step, "epoch": epoch + 1, "loss": round(loss, 6), "lr": run.lr_at(step - 1),
           "tokens_per_s": round(tok_s, 1)}
    if cfg.multi:
        row.update(loss_fields(run, "loss", run.last_losses))
    if evaluated:
        if cfg.multi:
            row.update(loss_fields(run, "eval_loss", losses_eval))
        else:
            row["eval_loss"] = round(losses_eval, 6)
    run.rows.append(row)
    append_metrics(run.paths.metrics, row)
    if run.wandb:
        run.wandb.log(row, step=step)
    if not cfg.progress:
        run.log(json.dumps(row))
    run.tokens_since, run.time_since = 0, time.perf_counter()


def is_save_step(run: Run) -> bool:
    return run.step % run.cfg.save_interval == 0 or run.step == run.total_steps


def save_adapters(run: Run) -> None:
    """Each adapter in MiniMind's format and as safetensors (several adapters: one pair of files each); under
    --use_dora as safetensors only (MiniMind's format has no magnitude)."""
    from .lora_io import save_minimind_lora

    for name, (minimind_file, safetensors_file) in run.adapter_files.items():
        if minimind_file is not None:
            with writing(minimind_file):
                save_minimind_lora(run.model, minimind_file, adapter_name=name)
        with writing(safetensors_file):
            save_lora(run.model, safetensors_file, adapter_name=name)


def checkpoint(run: Run) -> None:
    """At every save step: the training state first, then the adapters (MiniMind saves its adapter here too).

    Every process calls it: under --fsdp all of them gather the whole adapter and optimizer state (FSDP2
    shards them), then rank 0 writes.
    """
    if not (run.rt.main or run.cfg.fsdp):
        return
    optimizer = optimizer_state(run)  # first: inside gathered_lora the model's LoRA parameters are copies
    with gathered_lora(run.model):
        if not run.rt.main:
            return
        save_checkpoint(run, optimizer)
        save_adapters(run)
    if not run.cfg.progress:
        adapters = ", ".join(str(files[0] or files[1]) for files in run.adapter_files.values())
        run.log(f"checkpoint: step {run.step} -> {run.paths.checkpoint}, {adapters}")


# ---------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig) -> Dict[str, object]:
    """Runs the whole job; returns a summary (steps, paths, first and last loss, answers).

    Raises:
        CLIError: bad input, a busy output folder, a full disk, a non-finite loss (one line each).
    """
    run = setup(cfg)
    try:
        first = True
        while run.step < run.total_steps:
            epoch = run.step // run.steps_per_epoch
            steps = epoch_steps(cfg, run.rt, run.train_set, epoch)[run.step - epoch * run.steps_per_epoch:]
            loader = data_loader(run.train_set, [micro for step in steps for micro in step],
                                 run.tokenizer.pad_token_id, cfg.num_workers)
            for micro_batches in windows(loader, [len(step) for step in steps]):
                loss = train_step(run, micro_batches)
                log_step(run, epoch, loss, first)
                first = False
                if is_save_step(run):
                    checkpoint(run)
                if run.step >= run.total_steps:
                    break
        run.bar.close()  # the summary comes below the finished bar
        result = finish(run)
        if run.rt.world_size > 1:
            dist.barrier()
    finally:
        run.close()
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point: exit status 0, 2 on bad input (one line on stderr), 130 on Ctrl-C."""
    return run_cli("train_lora", _main, argv,
                   interrupted="interrupted; the files saved so far are intact (continue with --resume)")


def _main(argv: Optional[Sequence[str]]) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
