"""MiniMind LoRA SFT: ``python -m minimind.train_lora [--fused] [...]``.

MiniMind's LoRA trainer on lora_kernels. It takes the arguments of both MiniMind generations with their
meaning: the 2025 interface of our design documents (``--out_dir --dim --n_layers --ddp --local_rank``)
and MiniMind's current one (``--save_dir --from_weight --from_resume --use_compile``, DDP switched on by
itself under torchrun). With no argument it fine-tunes the bundled tiny base on the bundled identity data
(about 30 s on a 2-core CPU).

Reads top to bottom: the configuration (``TrainConfig``, built from the command line), ``setup`` (device,
processes, base, LoRA, data, optimizer, output folder), ``train_step`` (one optimizer step), ``log_step``,
``save_checkpoint``/``load_checkpoint``, ``finish`` (adapters, curve, pictures, answers), then ``train``,
the loop itself.

Where the files go (``run_paths``): with ``--out_dir DIR`` (ours, the default ``out``)

* ``DIR/lora/{lora_name}_{hidden_size}[_moe].pth``: the adapter in MiniMind's format (MiniMind's
  ``load_lora`` reads it), and the same adapter as ``.safetensors`` (``lora_kernels.load_lora``);
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
MiniMind's layout take the stem ``a+b``.

The output is owned by one run at a time (a lock file naming the PID); every file is written to a
temporary name, fsynced and renamed, so a crash never leaves half a file (and the next run removes the
temporary files a killed one left). The loss of one optimizer step is the mean cross-entropy over all
assistant tokens of its micro-batches (on all processes), plus the MoE auxiliary loss.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from atomic_io import atomic_write, load_weights_only, remove_stale_temporaries
from lora_kernels import (
    LoRAConfig,
    add_adapter,
    disable_lora,
    lora_param_groups,
    lora_state_dict,
    lora_summary,
    replace_linear_with_fused_lora,
    save_lora,
    triton_available,
)
from lora_kernels.config import DEFAULT_ADAPTER
from lora_kernels.fsdp import gathered_lora, scatter_full

from .cli import ArgumentParser, CLIError, number, reading, run_cli, writing
from .run_dir import OutputLock, RunPaths, append_metrics, check_out_dir, read_metrics, run_paths
from .training import cosine_lr, evaluate, row_loss_sums, row_supervised_tokens, supervised_tokens, token_loss_sum

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_BASE = ASSETS / "base.safetensors"
BUNDLED_DATA = ASSETS / "lora_identity.jsonl"
MINIMIND_HIDDEN_SIZE, MINIMIND_LAYERS = 768, 8  # MiniMind's defaults, used to resolve --from_weight
DEFAULT_LR, MINIMIND_LR = 5e-3, 1e-4  # ours: the bundled job's (rank 16, a few hundred steps); MiniMind's train_lora.py


# ---------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Everything a run depends on; ``parse_args`` builds it from the command line."""

    out_dir: str = "out"
    layout: str = "ours"               # "ours" (--out_dir) or "minimind" (--save_dir)
    base: str = str(BUNDLED_BASE)      # resolved from --from_weight under MiniMind's interface
    random_base: bool = False          # --from_weight none
    tokenizer: Optional[str] = None
    data_path: str = str(BUNDLED_DATA)  # several, comma-separated: one adapter per data set (lora_names)
    eval_data: Optional[str] = None     # with several adapters: one per adapter, comma-separated
    lora_name: str = "lora_identity"    # several, comma-separated: train them at once
    arch: Optional[str] = None
    hidden_size: Optional[int] = None  # None: read from the base
    num_hidden_layers: Optional[int] = None
    use_moe: Optional[bool] = None
    fused: bool = False
    quantize: Optional[str] = None     # "nf4" / "int8": a frozen quantized base (QLoRA), with --fused
    rank: int = 16
    alpha: Optional[float] = None
    lora_dropout: float = 0.0
    targets: str = "square"
    epochs: int = 20
    batch_size: int = 16
    learning_rate: float = DEFAULT_LR
    default_lr: bool = False           # --learning_rate not given (the header says so: MiniMind's default differs)
    lr_schedule: str = "minimind2"
    warmup_iters: int = 0
    loraplus_lr_ratio: Optional[float] = None
    weight_decay: float = 0.01         # AdamW's default, which MiniMind uses
    accumulation_steps: int = 1
    grad_clip: float = 1.0
    max_seq_len: int = 160
    max_steps: int = 0
    seed: int = 42
    device: str = "cuda:0" if torch.cuda.is_available() else "cpu"
    dtype: str = "auto"
    ddp: bool = False
    fsdp: bool = False                 # FSDP2 (fully_shard per block) under torchrun, instead of DDP
    use_compile: bool = False
    num_workers: int = 0
    resume: Optional[str] = None       # None, "auto" (the run's own checkpoint, must exist), "if-present", a path
    log_interval: int = 10
    save_interval: int = 100
    answers: int = 3
    progress: bool = True
    use_wandb: bool = False
    wandb_project: str = "MiniMind-LoRA"

    @property
    def data_paths(self) -> List[str]:
        """``--data_path`` as a list: comma-separated, unless the whole value is an existing file."""
        return _comma_list(self.data_path)

    @property
    def lora_names(self) -> List[str]:
        """``--lora_name`` as a list (comma-separated): one adapter per data set."""
        return _comma_list(self.lora_name, files=False)

    @property
    def eval_paths(self) -> List[str]:
        return _comma_list(self.eval_data) if self.eval_data else []

    @property
    def multi(self) -> bool:
        """Several adapters train at once (``--lora_name a,b``)."""
        return len(self.lora_names) > 1


def _comma_list(text: str, files: bool = True) -> List[str]:
    if files and Path(text).is_file():  # a file whose name holds a comma stays one path
        return [text]
    return [part.strip() for part in str(text).split(",")]


# Settings that must not change when resuming (the run would otherwise silently become another run).
RESUME_KEYS = ("base", "data_path", "quantize", "rank", "alpha", "lora_dropout", "targets", "batch_size", "accumulation_steps",
               "epochs", "learning_rate", "lr_schedule", "warmup_iters", "loraplus_lr_ratio", "weight_decay",
               "max_seq_len", "seed", "max_steps")


def resume_keys(cfg: TrainConfig) -> Tuple[str, ...]:
    """The settings a training state records and a resumed run must repeat; several adapters add their names
    (which data set trains which adapter)."""
    return RESUME_KEYS + (("lora_name",) if cfg.multi else ())


def _flag(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0/1 (or true/false), got {text!r}")


def build_parser() -> ArgumentParser:
    count, positive = number(1, integer=True), number(0, low_open=True)
    p = ArgumentParser(prog="python -m minimind.train_lora",
                       description="MiniMind LoRA SFT on lora_kernels (both MiniMind generations' arguments).")
    g = p.add_argument_group("where things are (MiniMind-3: --save_dir/--from_weight; 2025: --out_dir)")
    g.add_argument("--out_dir", default=None, help="our layout: DIR/lora/, DIR/checkpoint.pt, ... (default: out)")
    g.add_argument("--save_dir", default=None, help="MiniMind's layout: the adapter in DIR, the training state in "
                   "DIR/../checkpoints; --from_weight reads DIR/{name}_{hidden_size}[_moe].pth")
    g.add_argument("--from_weight", default=None, help="base = {save_dir}/{NAME}_{hidden_size}[_moe].pth, as "
                   "MiniMind (hidden_size defaults to MiniMind's 768 there); 'none': a random base")
    g.add_argument("--base", default=None, help="a MiniMind checkpoint file (.pth or .safetensors; default: bundled)")
    g.add_argument("--tokenizer", default=None, help="tokenizer.json or its folder (default: bundled; with "
                   "--from_weight: {save_dir}/../model when it has one, as MiniMind)")
    g.add_argument("--data_path", default=str(BUNDLED_DATA), help="MiniMind SFT JSONL; several, comma-separated, "
                   "with as many --lora_name: one adapter per data set, trained at once")
    g.add_argument("--eval_data", default=None, help="SFT JSONL for an evaluation loss at each save and at the end "
                   "(several adapters: one per adapter, comma-separated)")
    g.add_argument("--lora_name", default="lora_identity", help="adapter file name stem; several, comma-separated "
                   "(a,b): adapters trained at once, each on its own --data_path, one file each")
    g.add_argument("--from_resume", type=int, choices=[0, 1], default=0,
                   help="1: continue from this run's training state when there is one (MiniMind-3)")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from this run's training state (or PATH); it must exist")
    m = p.add_argument_group("the base model (read from the weights; given values must match)")
    m.add_argument("--hidden_size", "--dim", dest="hidden_size", type=count, default=None)
    m.add_argument("--num_hidden_layers", "--n_layers", dest="num_hidden_layers", type=count, default=None)
    m.add_argument("--use_moe", type=_flag, default=None, help="0/1")
    m.add_argument("--arch", default=None, choices=["minimind2", "minimind3"])
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--fused", action="store_true", help="lora_kernels' fused LoRA (Triton on CUDA, fused torch on "
                    "CPU); without it, MiniMind's unfused LoRA semantics")
    lo.add_argument("--quantize", choices=["nf4", "int8"], default=None,
                    help="QLoRA: the adapted linears' frozen base in NF4 (4-bit, blockwise absmax) or int8 (per-row "
                    "absmax), dequantized inside the fused kernels; needs --fused")
    lo.add_argument("--rank", type=count, default=16)
    lo.add_argument("--alpha", type=positive, default=None, help="default: = rank (scaling 1, MiniMind's LoRA)")
    lo.add_argument("--lora_dropout", type=number(0, 1, high_open=True), default=0.0)
    lo.add_argument("--targets", default="square",
                    help="'square' (MiniMind), 'all-linear', or comma-separated module names (q_proj,v_proj)")
    o = p.add_argument_group("optimization")
    o.add_argument("--epochs", type=count, default=20)
    o.add_argument("--batch_size", type=count, default=16, help="sequences per step and process")
    o.add_argument("--learning_rate", type=positive, default=None,
                   help=f"peak learning rate (default {DEFAULT_LR:g}, for the bundled job; MiniMind's train_lora.py "
                        f"uses {MINIMIND_LR:g})")
    o.add_argument("--lr_schedule", choices=["minimind2", "minimind3"], default="minimind2",
                   help="minimind2: lr/10 + 0.5·lr·(1+cos(π·t/T)), t from 0; "
                        "minimind3: lr·(0.1 + 0.45·(1+cos(π·t/T))), t from 1")
    o.add_argument("--warmup_iters", type=number(0, integer=True), default=0)
    o.add_argument("--loraplus_lr_ratio", type=positive, default=None, help="LoRA+: lora_B learns R times faster")
    o.add_argument("--weight_decay", type=number(0), default=0.01)
    o.add_argument("--accumulation_steps", type=count, default=1)
    o.add_argument("--grad_clip", type=number(0), default=1.0, help="max gradient norm (0: off)")
    o.add_argument("--max_seq_len", type=number(8, integer=True), default=160)
    o.add_argument("--max_steps", type=number(0, integer=True), default=0, help="stop after this many steps (0: all)")
    o.add_argument("--seed", type=number(integer=True), default=42)
    r = p.add_argument_group("running")
    r.add_argument("--device", default=TrainConfig.device)
    r.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="autocast dtype; auto: bf16 on CUDA (fp16 without bf16), fp32 on CPU")
    r.add_argument("--ddp", action="store_true", help="DistributedDataParallel (also on by itself under torchrun)")
    r.add_argument("--fsdp", action="store_true", help="FSDP2 under torchrun: the base sharded across processes, "
                   "all-gathered one block at a time (for a base that does not fit on one device); not with --ddp")
    r.add_argument("--local_rank", type=int, default=-1, help="accepted for old launchers; LOCAL_RANK wins")
    r.add_argument("--use_compile", type=int, choices=[0, 1], default=0,
                   help="1: torch.compile the model (with CUDA graphs on CUDA: mode reduce-overhead)")
    r.add_argument("--num_workers", type=number(0, integer=True), default=0, help="DataLoader worker processes")
    r.add_argument("--log_interval", type=count, default=10)
    r.add_argument("--save_interval", type=count, default=100, help="steps between adapter and state saves")
    r.add_argument("--answers", type=number(0, integer=True), default=3, help="prompts answered before/after")
    r.add_argument("--no_progress", action="store_true", help="log lines instead of a progress bar")
    r.add_argument("--use_wandb", action="store_true")
    r.add_argument("--wandb_project", default="MiniMind-LoRA")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """The run's configuration from the command line (both generations' arguments, resolved).

    Raises:
        CLIError: a bad value (named) or arguments that contradict each other.
    """
    ns = build_parser().parse_args(argv)
    if ns.out_dir is not None and ns.save_dir is not None:
        raise CLIError("give --out_dir (our layout) or --save_dir (MiniMind's), not both")
    if ns.base is not None and ns.from_weight is not None:
        raise CLIError(f"give --base or --from_weight, not both (--base {ns.base!r}, --from_weight {ns.from_weight!r})")
    if ns.resume is not None and ns.from_resume:
        raise CLIError("give --resume or --from_resume 1, not both")
    if ns.quantize is not None and not ns.fused:
        raise CLIError(f"--quantize {ns.quantize} needs --fused (the eager path is MiniMind's LoRA on a 16-bit base)")
    cfg = TrainConfig(**{f.name: getattr(ns, f.name) for f in fields(TrainConfig) if hasattr(ns, f.name)})
    if ns.learning_rate is None:
        cfg.learning_rate, cfg.default_lr = DEFAULT_LR, True
    # MiniMind's layout with --save_dir, or with --from_weight alone (MiniMind's save_dir defaults to ../out).
    minimind_layout = ns.save_dir is not None or (ns.from_weight is not None and ns.out_dir is None)
    cfg.layout = "minimind" if minimind_layout else "ours"
    cfg.out_dir = ns.save_dir or ns.out_dir or ("../out" if minimind_layout else "out")
    cfg.use_compile, cfg.progress = bool(ns.use_compile), not ns.no_progress
    cfg.resume = "if-present" if ns.from_resume else ns.resume
    if ns.from_weight is not None:  # MiniMind's init_model: {save_dir}/{name}_{hidden}[_moe].pth
        hidden = ns.hidden_size or MINIMIND_HIDDEN_SIZE
        cfg.random_base = ns.from_weight == "none"
        cfg.base = str(Path(cfg.out_dir) / f"{ns.from_weight}_{hidden}{'_moe' if ns.use_moe else ''}.pth")
        if cfg.random_base:
            cfg.hidden_size, cfg.num_hidden_layers = hidden, ns.num_hidden_layers or MINIMIND_LAYERS
        if ns.tokenizer is None and (Path(cfg.out_dir).parent / "model" / "tokenizer.json").is_file():
            cfg.tokenizer = str(Path(cfg.out_dir).parent / "model")
    else:
        cfg.base = ns.base or str(BUNDLED_BASE)
    if ns.fsdp and ns.ddp:
        raise CLIError("give --fsdp (FSDP2: the base sharded across processes) or --ddp (a whole copy per process), "
                       "not both")
    # DDP is on by itself under torchrun, as MiniMind, unless --fsdp asks for FSDP2 instead.
    cfg.ddp = ns.ddp or (not ns.fsdp and "RANK" in os.environ and "WORLD_SIZE" in os.environ)
    check_adapters(cfg)
    return cfg


def check_adapters(cfg: TrainConfig) -> None:
    """Several adapters at once: one name per data set (and per evaluation set), names unique and usable as
    adapter names; nothing to check for one.

    Raises:
        CLIError: naming the counts or the bad name.
    """
    from lora_kernels.config import check_adapter_name

    names, paths = cfg.lora_names, cfg.data_paths
    if len(names) == 1 and len(paths) == 1:
        return
    if cfg.fsdp:
        raise CLIError(f"--fsdp trains one adapter per run; train several at once ({', '.join(names)}) on one "
                       "process or with --ddp")
    if len(names) != len(paths):
        raise CLIError(f"--data_path gives {len(paths)} data set(s) ({', '.join(paths)}) but --lora_name "
                       f"{len(names)} name(s) ({', '.join(names)}): give one adapter name per data set, in the "
                       "same order")
    for name in names:
        try:
            check_adapter_name(name)
        except ValueError as err:
            raise CLIError(f"--lora_name {cfg.lora_name!r}: {err}") from None
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise CLIError(f"--lora_name {cfg.lora_name!r}: the name {repeated[0]!r} is given twice; each adapter "
                       "needs its own name")
    if cfg.eval_data and len(cfg.eval_paths) != len(names):
        raise CLIError(f"--eval_data gives {len(cfg.eval_paths)} data set(s) for {len(names)} adapters "
                       f"({', '.join(names)}): give one per adapter, comma-separated, in the same order")


# ---------------------------------------------------------------------------------------------------
# Setup: processes, device, dtype, the output folder


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    autocast_dtype: Optional[torch.dtype] = None  # None: fp32
    notes: List[str] = field(default_factory=list)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 arithmetic (x86 AVX512-BF16/AMX, or Arm BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")
    return bool(set(flags.split()) & {"avx512_bf16", "amx_bf16", "bf16"})


def _checked_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: there are {torch.cuda.device_count()} GPUs (cuda:0 ...)")
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except Exception:  # each backend (mps, xpu, ...) says "not available" in its own way
            raise CLIError(f"--device {name}: no such device on this machine; use --device cpu")
    return device


def setup_runtime(cfg: TrainConfig) -> Runtime:
    if cfg.ddp or cfg.fsdp:
        if "RANK" not in os.environ:
            flag = "--fsdp" if cfg.fsdp else "--ddp"
            raise CLIError(f"{flag} needs torchrun (RANK is not set): torchrun --nproc_per_node N -m "
                           f"minimind.train_lora {flag} ...")
        use_cuda = torch.cuda.is_available() and not cfg.device.startswith("cpu")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        rt = Runtime(device, dist.get_rank(), dist.get_world_size())
    else:
        rt = Runtime(_checked_device(cfg.device))
    if cfg.dtype == "auto" and rt.device.type == "cuda":
        rt.autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif cfg.dtype in ("bfloat16", "float16"):
        wanted = getattr(torch, cfg.dtype)
        if rt.device.type == "cpu" and (wanted == torch.float16 or not cpu_supports_bf16()):
            rt.notes.append(f"--dtype {cfg.dtype}: not native on this CPU; running in float32 (as MiniMind does)")
        elif rt.device.type == "cuda" and wanted == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise CLIError("--dtype bfloat16: this GPU does not support bfloat16; use --dtype float16")
        else:
            rt.autocast_dtype = wanted
    return rt


# ---------------------------------------------------------------------------------------------------
# Model, tokenizer, data


def load_base(cfg: TrainConfig, rt: Runtime):
    """The base model (all parameters frozen) and its tokenizer, checked against the configuration."""
    from .checkpoint import load_minimind
    from .model import MiniMindConfig, MiniMindForCausalLM
    from .tokenizer import MiniMindTokenizer

    try:
        tokenizer = MiniMindTokenizer.from_pretrained(cfg.tokenizer)
    except Exception as err:  # tokenizers reports a malformed file as a bare Exception
        raise CLIError(f"--tokenizer {cfg.tokenizer or 'bundled'!r} is not a readable tokenizer.json: {err}")
    given = {k: v for k, v in (("hidden_size", cfg.hidden_size), ("num_hidden_layers", cfg.num_hidden_layers),
                               ("use_moe", cfg.use_moe), ("arch", cfg.arch)) if v is not None}
    if cfg.random_base:
        torch.manual_seed(cfg.seed)
        model = MiniMindForCausalLM(MiniMindConfig(vocab_size=tokenizer.vocab_size, **given))
    else:
        base = Path(cfg.base)
        if not base.is_file():
            near = sorted(p.name for p in base.parent.glob(base.name.split("_")[0] + "_*.pth"))[:5] if \
                base.parent.is_dir() else []
            raise CLIError(f"base {str(base)!r}: no such file" + (f" (there: {', '.join(near)})" if near else ""))
        fit = f" (with {', '.join(f'--{k} {v}' for k, v in given.items())})" if given else ""
        with reading(f"base {str(base)!r}{fit}"):
            model = load_minimind(base, **given)
        for name, value in given.items():
            if getattr(model.config, name) != value:
                raise CLIError(f"base {str(base)!r} has {name}={getattr(model.config, name)}, not --{name} {value}")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CLIError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                       f"{model.config.vocab_size}: they do not belong together (see --tokenizer)")
    model.requires_grad_(False)
    return model.to(rt.device), tokenizer


def lora_config(cfg: TrainConfig) -> LoRAConfig:
    """The adapter's settings (``--rank``, ``--alpha``, ``--lora_dropout``)."""
    return LoRAConfig(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.lora_dropout)


def add_lora(model, cfg: TrainConfig, rt: Runtime) -> str:
    """Adds the adapters in place; returns a description of the backend."""
    targets = cfg.targets if cfg.targets in ("square", "all-linear") else \
        [t.strip() for t in cfg.targets.split(",") if t.strip()]
    torch.manual_seed(cfg.seed)  # the same A on every process and in fused and eager runs
    names = model_adapters(cfg)
    try:
        replace_linear_with_fused_lora(model, config=lora_config(cfg), target_modules=targets,
                                       backend="auto" if cfg.fused else "eager", quantize=cfg.quantize,
                                       adapter_name=names[0])
    except (ValueError, TypeError) as err:
        raise CLIError(f"--targets {cfg.targets!r}: {err}")
    for name in names[1:]:  # each adapter starts where a run of it alone (same --seed) starts: the same A
        torch.manual_seed(cfg.seed)
        add_adapter(model, name, config=lora_config(cfg))
    if not cfg.fused:
        return "eager (MiniMind's unfused LoRA; add --fused for lora_kernels)"
    base = f", {cfg.quantize} base" if cfg.quantize else ""
    if rt.device.type == "cuda" and triton_available():
        return "fused: Triton kernels" + base
    return ("fused: torch backend (Triton kernels need a CUDA GPU; none is used here)"
            if rt.device.type != "cuda" else "fused: torch backend (Triton is not importable)") + base


def model_adapters(cfg: TrainConfig) -> List[str]:
    """The adapters the run trains, by their names in the model: ``"default"`` for one (as a plain run
    always had), the ``--lora_name`` names for several."""
    return cfg.lora_names if cfg.multi else [DEFAULT_ADAPTER]


def load_sft(path: str, tokenizer, max_seq_len: int, flag: str):
    from .dataset import SFTDataset

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
    from .dataset import TaggedDatasets

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
    from .dataset import pad_batch

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


# ---------------------------------------------------------------------------------------------------
# Everything a run holds


@dataclass
class Run:
    cfg: TrainConfig
    rt: Runtime
    model: torch.nn.Module          # the model (adapters inside); saved, evaluated, answers
    train_model: torch.nn.Module    # what the step calls: model, DDP(model), and/or torch.compile'd
    tokenizer: object
    train_set: object
    eval_set: object
    optimizer: torch.optim.Optimizer
    scaler: object
    paths: RunPaths
    lock: Optional[OutputLock]
    backend: str
    steps_per_epoch: int
    total_steps: int
    step: int = 0
    rows: List[dict] = field(default_factory=list)
    prompts: List[list] = field(default_factory=list)
    before: List[str] = field(default_factory=list)
    wandb: object = None
    tokens_since: int = 0
    time_since: float = field(default_factory=time.perf_counter)
    bar: object = None
    # The adapters trained (their names in the model), each one's (MiniMind .pth, .safetensors) files and last
    # step loss; with several adapters, the adapter each of ``prompts`` is answered with.
    names: List[str] = field(default_factory=lambda: [DEFAULT_ADAPTER])
    adapter_files: Dict[str, Tuple[Path, Path]] = field(default_factory=dict)
    last_losses: Dict[str, float] = field(default_factory=dict)
    prompt_adapters: List[Optional[str]] = field(default_factory=list)

    def log(self, text: str) -> None:
        if self.rt.main:
            from tqdm import tqdm

            tqdm.write(text)

    def lr_at(self, step: int) -> float:
        lr, total, warmup = self.cfg.learning_rate, self.total_steps, self.cfg.warmup_iters
        if self.cfg.lr_schedule == "minimind3":  # MiniMind-3 counts steps from 1: the last step gets lr/10
            return cosine_lr(step + 1, total, peak=lr, floor=lr / 10, warmup=warmup)
        return cosine_lr(step, total, peak=1.1 * lr, floor=lr / 10, warmup=warmup)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.lock is not None:
            self.lock.release()
        if self.wandb:
            self.wandb.finish()
        if self.rt.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def run_stem(cfg: TrainConfig) -> str:
    """The name the run's shared files take in MiniMind's layout: the adapter's, or ``a+b`` for several."""
    return "+".join(cfg.lora_names) if cfg.multi else cfg.lora_name


def adapter_files(cfg: TrainConfig, model, paths: RunPaths) -> Dict[str, Tuple[Path, Path]]:
    """``{adapter: (MiniMind .pth, .safetensors)}``; several adapters get the file names a run of each alone
    would write."""
    if not cfg.multi:
        return {DEFAULT_ADAPTER: (paths.adapter, paths.adapter_safetensors)}
    own = {name: run_paths(cfg.layout, cfg.out_dir, name, model.config.hidden_size, model.config.use_moe)
           for name in cfg.lora_names}
    return {name: (p.adapter, p.adapter_safetensors) for name, p in own.items()}


def param_groups(model, cfg: TrainConfig) -> List[dict]:
    """The optimizer's parameter groups (LoRA+ as asked); with several adapters one set of groups per adapter,
    each tagged ``"adapter"``, so the step clips each adapter's gradient on its own."""
    if not cfg.multi:
        return lora_param_groups(model, cfg.learning_rate, cfg.loraplus_lr_ratio, cfg.weight_decay)
    groups = []
    for name in cfg.lora_names:
        for group in lora_param_groups(model, cfg.learning_rate, cfg.loraplus_lr_ratio, cfg.weight_decay,
                                       adapter_names=[name]):
            groups.append({**group, "name": f"{name}/{group['name']}", "adapter": name})
    return groups


def _agree(rt: Runtime, error: Optional[CLIError]) -> None:
    """Under DDP, every process stops when one of them failed during setup (instead of waiting forever)."""
    if rt.world_size > 1:
        flag = torch.tensor([1.0 if error else 0.0])
        dist.all_reduce(flag)
        if flag.item() and error is None:
            raise CLIError("another process failed during setup (its message is above)")
    if error is not None:
        raise error


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
    _agree(rt, error)

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
            outputs = paths.outputs() + [f for files in run.adapter_files.values() for f in files]
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


def shard_model(model) -> None:
    """--fsdp: FSDP2 over each transformer block, then the rest (embeddings, norms, the tied head).

    Every process has loaded the whole base (and quantized it) before this; from here on each holds its
    shard, and a block's base is all-gathered for that block's forward and backward only.
    """
    from lora_kernels.fsdp import shard_lora_model

    # A block returns its KV cache (k, v) as views, which nothing writes in place: FSDP2's warning about in-place
    # ops on view outputs does not apply.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    shard_lora_model(model, model.model.layers)


def describe(run: Run) -> str:
    cfg, rt, c = run.cfg, run.rt, run.model.config
    summary = lora_summary(run.model)
    alpha = lora_config(cfg).lora_alpha
    return "\n".join([
        "MiniMind LoRA SFT",
        f"  base       {'random (--from_weight none)' if cfg.random_base else cfg.base}  ({c.arch}, hidden "
        f"{c.hidden_size}, {c.num_hidden_layers} layers{', MoE' if c.use_moe else ''}, "
        f"{summary.total - summary.trainable:,} base parameters)",
        f"  LoRA       rank {cfg.rank}, alpha {alpha:g}, dropout {cfg.lora_dropout:g}, targets {cfg.targets!r}: "
        f"{summary.lora_layers} layers" + (f", LoRA+ ratio {cfg.loraplus_lr_ratio:g}" if cfg.loraplus_lr_ratio else ""),
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
    let one adapter's gradient shrink another's, and training them together would differ from apart."""
    params: Dict[Optional[str], list] = {}
    for group in run.optimizer.param_groups:
        params.setdefault(group.get("adapter"), []).extend(group["params"])
    for group_params in params.values():
        torch.nn.utils.clip_grad_norm_(group_params, run.cfg.grad_clip)


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
    if not all(bool(torch.isfinite(p).all()) for g in run.optimizer.param_groups for p in g["params"]):
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


def eval_losses(run: Run) -> Dict[str, float]:
    """Several adapters: each one's evaluation loss on its own evaluation set (that adapter alone active)."""
    from lora_kernels import active_adapters, set_adapter

    active, losses = active_adapters(run.model), {}
    try:
        for name, eval_set in zip(run.names, run.eval_set):
            set_adapter(run.model, name)
            losses[name] = eval_loss(run, eval_set)
    finally:
        set_adapter(run.model, active)
    return losses


def loss_fields(run: Run, key: str, losses: Dict[str, float]) -> Dict[str, float]:
    """Metrics fields: ``key`` (their mean) and, with several adapters, ``key/<adapter>`` each."""
    row = {key: round(sum(losses.values()) / len(losses), 6)}
    if run.cfg.multi:
        row.update({f"{key}/{name}": round(value, 6) for name, value in losses.items()})
    return row


def log_step(run: Run, epoch: int, loss: float, first: bool) -> None:
    """Progress bar, and every --log_interval steps a metrics line (appended to the metrics file)."""
    cfg, rt, step = run.cfg, run.rt, run.step
    elapsed = max(time.perf_counter() - run.time_since, 1e-9)
    tok_s = run.tokens_since * rt.world_size / elapsed
    run.bar.update(1)
    shown = {f"loss_{name}": f"{value:.4f}" for name, value in run.last_losses.items()} if cfg.multi else \
        {"loss": f"{loss:.4f}"}
    run.bar.set_postfix(**shown, lr=f"{run.lr_at(step - 1):.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
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


def remove_earlier_plots(run: Run) -> None:
    """A fresh run removes the plots an earlier run drew in its output folder (the loss curve, the overview
    and statistics, also in the per-adapter sub-folders of a run with several adapters), so that none of them
    is taken for this run's; the earlier run's metrics are kept (start_metrics) and redraw its curve."""
    from .plot_lora import OVERVIEW_NAME, STATS_NAME

    plots = run.paths.plots
    folders = [plots] + ([d for d in plots.iterdir() if d.is_dir() and (d / OVERVIEW_NAME).is_file()]
                         if plots.is_dir() else [])
    found = [f for f in [run.paths.loss_curve] + [d / n for d in folders for n in (OVERVIEW_NAME, STATS_NAME)]
             if f.is_file()]
    for f in found:
        f.unlink()
    for d in folders[1:]:
        if not any(d.iterdir()):
            d.rmdir()
    if found:
        run.rt.notes.append(f"removed {len(found)} plot file(s) of an earlier run ({found[0].name}...)")


def start_metrics(run: Run) -> List[dict]:
    """The metrics rows this run continues: on resume the earlier rows up to the checkpoint's step; in a
    fresh run none, and an earlier run's file is kept under a new name instead of being overwritten."""
    path = run.paths.metrics
    if not path.is_file():
        return []
    if not run.cfg.resume or run.step == 0:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        kept = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
        for n in range(2, 1000):  # never replace an earlier archive
            if not kept.exists():
                break
            kept = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}")
        with writing(kept):
            os.replace(path, kept)
        run.rt.notes.append(f"an earlier run's {path.name} is kept as {kept.name}")
        return []
    rows = read_metrics(path)
    kept = [r for r in rows if r["step"] <= run.step]
    if len(kept) != len(rows):  # rows logged after the checkpoint are logged again
        text = "".join(json.dumps(r) + "\n" for r in kept)
        with writing(path):
            atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return kept


def is_save_step(run: Run) -> bool:
    return run.step % run.cfg.save_interval == 0 or run.step == run.total_steps


def trained_tensors(run: Run) -> Dict[str, torch.Tensor]:
    """The adapters' A and B (detached, sharing the parameters' storage), as the training state holds them:
    one adapter by module path, several as ``<adapter>/<module path>.lora_A``."""
    if not run.cfg.multi:
        return lora_state_dict(run.model)
    return {f"{name}/{key}": value for name in run.names for key, value in lora_state_dict(run.model, name).items()}


def optimizer_state(run: Run) -> dict:
    """The optimizer's state to save. Under --fsdp its moments are shards: every process takes part in
    gathering them whole (keyed by parameter name), and rank 0 receives them."""
    if not run.cfg.fsdp:
        return run.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(run.model, run.optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(run: Run, optimizer: Optional[dict] = None) -> None:
    """The training state (adapter, optimizer, scaler, RNG, step, the settings it depends on), atomically.

    Args:
        optimizer: the optimizer's state (:func:`optimizer_state`); None: ``run.optimizer.state_dict()``.
    """
    state = {
        "format": "minimind.train_lora",
        "lora": {k: v.cpu() for k, v in trained_tensors(run).items()},
        "optimizer": run.optimizer.state_dict() if optimizer is None else optimizer,
        "scaler": run.scaler.state_dict(),
        "step": run.step,
        "world_size": run.rt.world_size,
        "fsdp": run.cfg.fsdp,  # the optimizer state is keyed by parameter name then
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "config": {k: getattr(run.cfg, k) for k in resume_keys(run.cfg)},
    }
    with writing(run.paths.checkpoint):
        atomic_write(run.paths.checkpoint, lambda tmp: torch.save(state, tmp))


def load_checkpoint(run: Run) -> int:
    """Checks a training state against this run, then restores it; returns the steps already done.

    Raises:
        CLIError: no such file (except with --from_resume 1, which then starts afresh), an unreadable file,
            missing fields, other settings, or LoRA tensors that do not fit (all named).
    """
    cfg = run.cfg
    path = Path(cfg.resume) if cfg.resume not in ("auto", "if-present") else run.paths.checkpoint
    flag = "--from_resume 1" if cfg.resume == "if-present" else "--resume"
    if not path.is_file():
        if cfg.resume == "if-present":
            run.rt.notes.append(f"--from_resume 1: no training state at {path}; starting afresh")
            return 0
        raise CLIError(f"{flag}: no training state at {str(path)!r}")
    with reading(f"{flag}: training state {str(path)!r}"):
        state = load_weights_only(path)
    needed = ("lora", "optimizer", "scaler", "step", "rng_cpu", "config")
    missing = [k for k in needed if not isinstance(state, dict) or k not in state]
    if missing:
        raise CLIError(f"{flag}: {str(path)!r} is not a training state of this trainer (missing {', '.join(missing)})")
    if not isinstance(state["config"], dict) or not isinstance(state["lora"], dict) or \
            not isinstance(state["step"], int) or state["step"] < 0:
        raise CLIError(f"{flag}: {str(path)!r} has a malformed 'config', 'lora' or 'step' field")
    keys = resume_keys(cfg) + (("lora_name",) if "lora_name" in state["config"] and not cfg.multi else ())
    keys = tuple(k for k in keys if k != "max_steps")  # may change: the run is extended (or cut short)
    changed = [f"--{k} {state['config'].get(k)!r} -> {getattr(cfg, k)!r}" for k in keys
               if state["config"].get(k) != getattr(cfg, k)]
    if state.get("world_size", 1) != run.rt.world_size:  # the global batch is batch_size x processes
        changed.append(f"{state.get('world_size', 1)} -> {run.rt.world_size} processes")
    if state.get("fsdp", False) != cfg.fsdp:
        changed.append("without --fsdp -> --fsdp" if cfg.fsdp else "--fsdp -> without it")
    if changed:
        raise CLIError(f"{flag}: {path} was made with other settings: " + "; ".join(changed))
    if state["step"] > run.total_steps:
        raise CLIError(f"{flag}: {path} has trained {state['step']} steps, more than this run's {run.total_steps} "
                       "(--max_steps / --epochs); give a larger --max_steps")
    earlier = state["config"].get("max_steps")
    if earlier != cfg.max_steps:
        # The learning-rate schedule is a function of the run's total steps: the steps still to come follow
        # the schedule of the new total, as if the run had been planned that long from the start.
        run.rt.notes.append(f"{flag}: --max_steps {earlier} -> {cfg.max_steps}: steps {state['step'] + 1}-"
                            f"{run.total_steps} follow the learning-rate schedule over {run.total_steps} steps "
                            f"(the first {state['step']} followed the earlier run's)")
    params = trained_tensors(run)
    problems = [f"unknown tensor {k}" for k in state["lora"] if k not in params]
    problems += [f"missing tensor {k}" for k in params if k not in state["lora"]]
    problems += [f"{k} has shape {tuple(v.shape)}, the model needs {tuple(params[k].shape)}"
                 for k, v in state["lora"].items() if k in params and (not isinstance(v, torch.Tensor)
                                                                        or v.shape != params[k].shape)]
    if problems:
        raise CLIError(f"{flag}: {path} does not fit this model: {'; '.join(problems[:4])}"
                       + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""))
    try:
        if cfg.fsdp:  # saved whole (optimizer_state): each process keeps its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(run.model, run.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            run.optimizer.load_state_dict(state["optimizer"])
        run.scaler.load_state_dict(state["scaler"])
        rng_cpu = state["rng_cpu"]
        torch.get_rng_state().copy_(rng_cpu)  # a wrong size or dtype raises here, before anything is set
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as err:
        raise CLIError(f"{flag}: {path} has an optimizer or RNG state that does not fit: {err}")
    with torch.no_grad():
        for name, value in state["lora"].items():
            params[name].copy_(scatter_full(params[name], value))  # --fsdp: this process's shard
    torch.set_rng_state(rng_cpu)
    if state.get("rng_cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state["step"]


def save_adapters(run: Run) -> None:
    """Each adapter in MiniMind's format and as safetensors (several adapters: one pair of files each)."""
    from .lora_io import save_minimind_lora

    for name, (minimind_file, safetensors_file) in run.adapter_files.items():
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
        adapters = ", ".join(str(files[0]) for files in run.adapter_files.values())
        run.log(f"checkpoint: step {run.step} -> {run.paths.checkpoint}, {adapters}")


# ---------------------------------------------------------------------------------------------------
# Answers and the end of the run


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
    from .generate import decode_reply, generate, generate_batch

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


def plot_loss(rows: List[dict], path: Path, title: str) -> None:
    from .plot_lora import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    # Several adapters log "loss/<adapter>" (and "eval_loss/<adapter>"): one curve each instead of their mean.
    keys = [k for k in rows[0] if k.startswith("loss/")] or ["loss"]
    for key in keys:
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=f"train {key}".replace("/", " "))
    for key in dict.fromkeys(k for r in rows for k in r if k.startswith("eval_loss/")) or ["eval_loss"]:
        evals = [r for r in rows if key in r]
        if evals:
            ax.plot([r["step"] for r in evals], [r[key] for r in evals], "o-",
                    label=key.replace("eval_loss", "eval loss").replace("/", " "))
    ax.set(xlabel="optimizer step", ylabel="cross-entropy per assistant token", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with writing(path):
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def finish(run: Run) -> Dict[str, object]:
    """The final adapters, the loss curve, the overview of what LoRA learned, the answers after; a summary."""
    from .plot_lora import OVERVIEW_NAME, model_layers, plot_adapter, read_adapter_layers

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
        plot_loss(run.rows, paths.loss_curve, f"{run_stem(cfg)}: rank {cfg.rank}, {run.backend.split(':')[0]}")
        result.update(first_loss=run.rows[0]["loss"], last_loss=run.rows[-1]["loss"])
        for key in [k for k in run.rows[0] if k.startswith("loss/")] or ["loss"]:
            result[key.replace("loss", "first_loss")] = run.rows[0][key]
            result[key.replace("loss", "last_loss")] = run.rows[-1][key]
            which = f" {key[len('loss/'):]}" if cfg.multi else ""
            lines.append(f"loss{which} {run.rows[0][key]:.4f} (step {run.rows[0]['step']}) -> "
                         f"{run.rows[-1][key]:.4f} (step {run.rows[-1]['step']})")
    stats = {}
    for name, (minimind_file, safetensors_file) in run.adapter_files.items():
        # One adapter: the overview in the plots folder, as always; several: a sub-folder per adapter.
        folder = paths.plots / name if cfg.multi else paths.plots
        label = name if cfg.multi else cfg.lora_name
        # Under --fsdp the base is sharded: the overview reads the saved adapter (without the W statistics).
        layers = read_adapter_layers(safetensors_file) if cfg.fsdp else \
            model_layers(run.model, name if cfg.multi else None)
        with writing(folder / OVERVIEW_NAME):
            stats[name] = plot_adapter(layers, folder, str(minimind_file), per_layer=False,
                                       title=f"what {label} learned: ΔW = s·B·A per layer")
        beside = safetensors_file.parent == Path(minimind_file).parent
        lines.append(f"saved {minimind_file} (MiniMind format) and {safetensors_file.name if beside else safetensors_file}")
    result["lora_stats"] = stats[DEFAULT_ADAPTER] if not cfg.multi else stats
    if cfg.multi:
        result["adapters"] = dict(run.adapter_files)
    overview = " / ".join(str((paths.plots / name if cfg.multi else paths.plots) / OVERVIEW_NAME)
                          for name in run.adapter_files)
    lines.append(f"metrics {paths.metrics}, curve {paths.loss_curve}, LoRA overview {overview} (per layer: "
                 f"python -m minimind.plot_lora {next(iter(run.adapter_files.values()))[1]} --out DIR)")
    if run.prompts:
        result["answers"] = list(zip([p[-1]["content"] for p in run.prompts], run.before, after))
        lines.append("before -> after (adapter off / on):")
        for (question, old, new), name in zip(result["answers"], run.prompt_adapters):
            lines += [f"  Q: {question}" + (f"  [{name}]" if name else ""), f"     off: {old}", f"     on:  {new}"]
    run.log("\n".join(lines))
    return result


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
