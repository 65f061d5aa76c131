"""What a run tells: the header before training (``describe``), the prompts answered before and after
(``answer_prompts``, ``answer``) and the end-of-run summary (``finish``: the loss curve, the overview of
what each adapter learned, the answers).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from lora_kernels import disable_lora, lora_summary
from lora_kernels.config import DEFAULT_ADAPTER

from ..cli import writing
from .config import MINIMIND_LR, NAMED_ADAPTERS, run_stem
from .model import lora_config
from .run import Run


def describe(run: Run) -> str:
    cfg, rt, c = run.cfg, run.rt, run.model.config
    summary = lora_summary(run.model)
    alpha = lora_config(cfg).lora_alpha
    return "\n".join([
        "MiniMind LoRA SFT",
        f"  base       {'random (--from_weight none)' if cfg.random_base else cfg.base}  ({c.arch}, hidden "
        f"{c.hidden_size}, {c.num_hidden_layers} layers{', MoE' if c.use_moe else ''}, "
        f"{summary.total - summary.trainable:,} base parameters)",
        f"  {'DoRA' if cfg.use_dora else 'LoRA'}       rank {cfg.rank}, alpha {alpha:g}, dropout {cfg.lora_dropout:g}, "
        f"targets {cfg.targets!r}: {summary.lora_layers} layers"
        + (", a trained magnitude per output row (saved as .safetensors only: MiniMind's .pth has no DoRA)"
           if cfg.use_dora else "")
        + (f", LoRA+ ratio {cfg.loraplus_lr_ratio:g}" if cfg.loraplus_lr_ratio else ""),
        f"  trainable  {summary.trainable:,} parameters ({summary.percent:.2f}% of {summary.total:,})",
        f"  optimizer  AdamW, learning rate {cfg.learning_rate:g}"
        + (f" (the default; MiniMind's train_lora.py uses {MINIMIND_LR:g}: give --learning_rate to choose)"
           if cfg.default_lr and cfg.layout == "minimind" else " (the default)" if cfg.default_lr else "")
        + f", {cfg.lr_schedule} cosine schedule to {cfg.learning_rate / 10:g}"
        + (f" after {cfg.warmup_iters} warm-up steps" if cfg.warmup_iters else "")
        + f", weight decay {cfg.weight_decay:g}, gradient clip {cfg.grad_clip:g}",
        f"  backend    {run.backend}" + (", torch.compile" if cfg.use_compile else ""),
        f"  device     {rt.device}" + (f" x {rt.world_size} processes" if rt.world_size > 1 else "")
        + (" (FSDP2, the base sharded)" if cfg.fsdp else " (DDP)" if rt.world_size > 1 else "")
        + f", dtype {str(rt.autocast_dtype or torch.float32).replace('torch.', '')}",
        *describe_data(run),
        f"  output     {run.paths.adapter.parent} (adapter{'s' if cfg.multi else ''}), {run.paths.checkpoint} "
        "(training state)",
        *[f"  note       {n}" for n in rt.notes],
    ])


def describe_data(run: Run) -> List[str]:
    cfg, rt = run.cfg, run.rt
    steps = (f"{cfg.epochs} epochs = {run.steps_per_epoch * cfg.epochs} steps"
             + (f", stopped at --max_steps {run.total_steps}" if run.total_steps < run.steps_per_epoch * cfg.epochs
                else "")
             + (f" (resuming after step {run.step})" if run.step else ""))
    if not cfg.multi:
        return [f"  data       {cfg.data_path}: {len(run.train_set)} conversations, batch {cfg.batch_size * rt.world_size}"
                f" x {cfg.accumulation_steps} accumulation, {steps}"]
    lines = [f"  adapters   {len(run.names)} trained at once, each on its own data set: every step takes batch "
             f"{cfg.batch_size * rt.world_size} of each (one forward of {cfg.batch_size * rt.world_size * len(run.names)} "
             f"rows) x {cfg.accumulation_steps} accumulation; an epoch is one pass over the largest, {steps}"]
    lines += [f"  data {name:<6} {path}: {len(data)} conversations"
              for name, path, data in zip(run.names, cfg.data_paths, run.train_set.datasets)]
    return lines


def sample_prompts(dataset, k: int) -> List[List[dict]]:
    """The first k distinct opening user turns of the data (with their system message, if any)."""
    prompts, seen = [], set()
    for i in range(len(dataset)):
        if len(prompts) >= k:
            break
        messages = dataset.conversation(i)
        head = [m for m in messages[:2] if m["role"] == "system"]
        user = next((m for m in messages if m["role"] == "user"), None)
        if user is None or user["content"] in seen:
            continue
        seen.add(user["content"])
        prompts.append(head + [user])
    return prompts


def answer_prompts(run: Run) -> Tuple[List[List[dict]], List[Optional[str]]]:
    """The prompts answered before and after training, and the adapter each is answered with after (several
    adapters: ``--answers`` prompts of each adapter's own data set; one adapter: None, the active one)."""
    data = run.train_set
    if not run.cfg.multi:
        prompts = sample_prompts(data, run.cfg.answers)
        return prompts, [None] * len(prompts)
    pairs = [(prompt, name) for name, own in zip(run.names, data.datasets)
             for prompt in sample_prompts(own, run.cfg.answers)]
    return [prompt for prompt, _ in pairs], [name for _, name in pairs]


@torch.no_grad()
def answer(run: Run, prompts: List[List[dict]], max_new_tokens: int = 48,
           adapters: Optional[List[Optional[str]]] = None) -> List[str]:
    """Greedy answers, one per prompt (the uncompiled model: generation has other shapes than training).

    With ``adapters`` (one name or None per prompt) all prompts are answered in one batch, each through its
    own adapter (:func:`minimind.generate.generate_batch`); without, one by one with the active adapters.
    """
    from ..generate import decode_reply, generate, generate_batch

    model, tok = run.model, run.tokenizer
    was_training = model.training
    model.eval()
    if adapters is not None:
        with run.rt.autocast():
            answers = generate_batch(model, tok, prompts, adapters=adapters, max_new_tokens=max_new_tokens,
                                     temperature=0.0)
        model.train(was_training)
        return [text.strip() for text in answers]
    answers = []
    for messages in prompts:
        ids = torch.tensor([tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)],
                           device=run.rt.device)
        with run.rt.autocast():
            out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=0.0,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        answers.append(decode_reply(tok, out[0, ids.shape[1]:].tolist()).strip())
    model.train(was_training)
    return answers


def finish(run: Run) -> Dict[str, object]:
    """The final adapters, the loss curve, the overview of what LoRA learned, the answers after; a summary."""
    from ..plot_lora import OVERVIEW_NAME, model_layers, plot_adapter, plot_loss, read_adapter_layers

    result: Dict[str, object] = {"steps": run.step, "paths": run.paths}
    after = []
    if run.prompts:  # rank 0's, or under --fsdp every process's (see setup)
        if run.cfg.fsdp:
            with disable_lora(run.model):
                run.before = answer(run, run.prompts, adapters=[None] * len(run.prompts) if run.cfg.multi else None)
        after = answer(run, run.prompts, adapters=run.prompt_adapters if run.cfg.multi else None)
    if not run.rt.main:
        return result
    cfg, paths = run.cfg, run.paths
    lines = []
    if run.rows:
        names = run_stem(cfg) if len(run.names) <= NAMED_ADAPTERS else \
            f"{len(run.names)} adapters ({run.names[0]} ... {run.names[-1]})"
        plot_loss(run.rows, paths.loss_curve, f"{names}: rank {cfg.rank}, {run.backend.split(':')[0]}")
        result.update(first_loss=run.rows[0]["loss"], last_loss=run.rows[-1]["loss"])
        for key in [k for k in run.rows[0] if k.startswith("loss/")] or ["loss"]:
            result[key.replace("loss", "first_loss")] = run.rows[0][key]
            result[key.replace("loss", "last_loss")] = run.rows[-1][key]
            which = f" {key[len('loss/'):]}" if cfg.multi else ""
            lines.append(f"loss{which} {run.rows[0][key]:.4f} (step {run.rows[0]['step']}) -> "
                         f"{run.rows[-1][key]:.4f} (step {run.rows[-1]['step']})")
    stats, saved = {}, []
    # DoRA's update needs the base W, which the model has (the file alone, read under --fsdp, gives s·B·A).
    update = "ΔW = g⊙(W + s·B·A) − W" if cfg.use_dora and not cfg.fsdp else "ΔW = s·B·A"
    for name, (minimind_file, safetensors_file) in run.adapter_files.items():
        # One adapter: the overview in the plots folder, as always; several: a sub-folder per adapter.
        folder = paths.plots / name if cfg.multi else paths.plots
        label = name if cfg.multi else cfg.lora_name
        # Under --fsdp the base is sharded: the overview reads the saved adapter (without the W statistics).
        layers = read_adapter_layers(safetensors_file) if cfg.fsdp else \
            model_layers(run.model, name if cfg.multi else None)
        with writing(folder / OVERVIEW_NAME):
            stats[name] = plot_adapter(layers, folder, str(minimind_file or safetensors_file), per_layer=False,
                                       title=f"what {label} learned: {update} per layer")
        if minimind_file is None:
            saved.append(f"saved {safetensors_file} (lora_kernels format, with the DoRA magnitudes; MiniMind's .pth "
                         "format has no DoRA)")
            continue
        beside = safetensors_file.parent == Path(minimind_file).parent
        saved.append(f"saved {minimind_file} (MiniMind format) and {safetensors_file.name if beside else safetensors_file}")
    files = list(run.adapter_files.values())
    if len(files) > NAMED_ADAPTERS:  # many adapters: one line for their files and one for their overviews
        first, last = files[0][0] or files[0][1], files[-1][0] or files[-1][1]
        kinds = ("MiniMind format, and .safetensors each" if files[0][0] is not None else
                 "lora_kernels format, with the DoRA magnitudes; MiniMind's .pth format has no DoRA")
        saved = [f"saved {len(files)} adapters: {first} ... {last} ({kinds})"]
        overview = f"{paths.plots / '<adapter>' / OVERVIEW_NAME} ({len(files)} adapters)"
    else:
        overview = " / ".join(str((paths.plots / name if cfg.multi else paths.plots) / OVERVIEW_NAME)
                              for name in run.adapter_files)
    lines += saved
    result["lora_stats"] = stats[DEFAULT_ADAPTER] if not cfg.multi else stats
    if cfg.multi:
        result["adapters"] = dict(run.adapter_files)
    lines.append(f"metrics {paths.metrics}, curve {paths.loss_curve}, LoRA overview {overview} (per layer: "
                 f"python -m minimind.plot_lora {next(iter(run.adapter_files.values()))[1]} --out DIR)")
    if run.prompts:
        result["answers"] = list(zip([p[-1]["content"] for p in run.prompts], run.before, after))
        lines.append("before -> after (adapter off / on):")
        for (question, old, new), name in zip(result["answers"], run.prompt_adapters):
            lines += [f"  Q: {question}" + (f"  [{name}]" if name else ""), f"     off: {old}", f"     on:  {new}"]
    run.log("\n".join(lines))
    return result
