"""The run's configuration: ``TrainConfig`` and the command line that builds it (``parse_args``).

Both MiniMind generations' arguments are taken with their meaning (``--out_dir --dim --n_layers --ddp
--local_rank`` of 2025, ``--save_dir --from_weight --from_resume --use_compile`` of MiniMind-3) and resolved
here into one ``TrainConfig``; ``check_adapters`` checks several adapters' names against their data sets;
``resume_keys`` names the settings a training state records; ``model_adapters`` and ``run_stem`` name the
adapters and the run's shared files.
"""
from __future__ import annotations

import argparse
import hashlib
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from lora_kernels.config import DEFAULT_ADAPTER

from ..cli import ArgumentParser, CLIError, number

ASSETS = Path(__file__).resolve().parents[1] / "assets"


BUNDLED_BASE = ASSETS / "base.safetensors"
BUNDLED_DATA = ASSETS / "lora_identity.jsonl"
MINIMIND_HIDDEN_SIZE, MINIMIND_LAYERS = 768, 8  # MiniMind's defaults, used to resolve --from_weight
DEFAULT_LR, MINIMIND_LR = 5e-3, 1e-4  # ours: the bundled job's (rank 16, a few hundred steps); MiniMind's train_lora.py
# Up to this many adapters trained at once, the progress bar shows each one's loss and the shared files of
# MiniMind's layout are named after all of them (``a+b+c``); with more, the bar shows their mean and the worst
# one, and the shared files take a short stem (``run_stem``).
NAMED_ADAPTERS = 3
# A file name holds at most 255 bytes: an adapter's files add "_<hidden>[_moe].safetensors" and a temporary
# file's ".<name>.XXXXXXXX.tmp" to its name (about 35 characters), the shared files of MiniMind's layout less.
MAX_NAME_CHARS = 200
STEM_CHARS = 100  # the longest ``a+b+c`` stem of the shared files


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
    use_dora: bool = False             # DoRA: a trained magnitude per output row; the adapter in our format only
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
RESUME_KEYS = ("base", "data_path", "quantize", "rank", "alpha", "lora_dropout", "use_dora", "targets", "batch_size",
               "accumulation_steps", "epochs", "learning_rate", "lr_schedule", "warmup_iters", "loraplus_lr_ratio",
               "weight_decay", "max_seq_len", "seed", "max_steps")
# Settings added to RESUME_KEYS after training states were first written: a state without one was made with this value.
RESUME_DEFAULTS = {"use_dora": False}


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
    lo.add_argument("--use_dora", action="store_true",
                    help="DoRA (weight-decomposed LoRA, PEFT's use_dora): a trained magnitude per output row beside A "
                    "and B; the adapter is saved in lora_kernels' format only (.safetensors), MiniMind's .pth has "
                    "no DoRA")
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
    r.add_argument("--answers", type=number(0, integer=True), default=None,
                   help=f"prompts answered before/after (several adapters: per adapter; default 3, with more than "
                        f"{NAMED_ADAPTERS} adapters 1)")
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
    if ns.use_dora and minimind_layout:
        raise CLIError("--use_dora saves the adapter in lora_kernels' format (.safetensors, with the DoRA magnitudes); "
                       "MiniMind's layout (--save_dir, or --from_weight without --out_dir) saves MiniMind's .pth, which "
                       "has no DoRA: give --out_dir DIR (the adapter is then DIR/lora/NAME_HIDDEN.safetensors)")
    cfg.out_dir = ns.save_dir or ns.out_dir or ("../out" if minimind_layout else "out")
    cfg.use_compile, cfg.progress = bool(ns.use_compile), not ns.no_progress
    if ns.answers is None:  # many adapters: one prompt each (16 adapters x 3 prompts would be 144 lines)
        cfg.answers = 1 if len(cfg.lora_names) > NAMED_ADAPTERS else TrainConfig.answers
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
    long = next((name for name in names if len(name) > MAX_NAME_CHARS), None)
    if long is not None:  # its files are {name}_{hidden}.pth etc.: a file name has at most 255 bytes
        raise CLIError(f"--lora_name: the name {long[:40]!r}... has {len(long)} characters, more than the "
                       f"{MAX_NAME_CHARS} a file name can take with the suffixes; give a shorter name")
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


def model_adapters(cfg: TrainConfig) -> List[str]:
    """The adapters the run trains, by their names in the model: ``"default"`` for one (as a plain run
    always had), the ``--lora_name`` names for several."""
    return cfg.lora_names if cfg.multi else [DEFAULT_ADAPTER]


def run_stem(cfg: TrainConfig) -> str:
    """The name the run's shared files (training state, metrics, lock, plots) take in MiniMind's layout: the
    adapter's; ``a+b`` for a few adapters; for more than :data:`NAMED_ADAPTERS`, or names too long to join into
    a file name, ``<first>+<n-1>more_<hash>``: the first name (cut to 40 characters), how many follow and 8 hex
    digits of the SHA-1 of all the names in order, so that the same adapters in the same order find the same
    training state (``--from_resume 1``) and no other run does."""
    if not cfg.multi:
        return cfg.lora_name
    names = cfg.lora_names
    joined = "+".join(names)
    if len(names) <= NAMED_ADAPTERS and len(joined) <= STEM_CHARS:
        return joined
    digest = hashlib.sha1(joined.encode("utf-8")).hexdigest()[:8]
    return f"{names[0][:40]}+{len(names) - 1}more_{digest}"
