"""Pictures of what a LoRA adapter learned: ``python -m minimind.plot_lora ADAPTER [--base BASE] --out DIR``.

For every adapted layer the update the adapter adds to the weight, ``ΔW = s·B·A`` (out_features, in_features),
is drawn as a heatmap next to its singular values; one overview figure compares the layers. The numbers go
to ``DIR/lora_stats.json`` beside the PNGs:

* ``singular_values``: the ``rank`` largest singular values of ΔW (the others are zero: rank(ΔW) <= r);
* ``effective_rank``: ``exp(H(p))`` with ``p_i = σ_i / Σσ`` (Roy & Vetterli, 2007): 1 when one direction
  carries everything, r when all r directions are equal;
* ``energy_top_k``: ``Σ_{i<k} σ_i² / Σ σ_i²``, the share of ``‖ΔW‖_F²`` in the top k directions;
* ``fro_norm``, ``spectral_norm``, and with ``--base`` ``relative_update`` = ``‖ΔW‖_F / ‖W‖_F``.

ADAPTER is a MiniMind adapter (``.pth``), ours (``lora_kernels.save_lora``), or a PEFT adapter folder
(that one needs the base it was trained on: ``--base``). ``minimind.train_lora`` draws the overview at the
end of every run, and its loss curve with :func:`plot_loss`.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from atomic_io import atomic_write

from .cli import CLIError, number, reading, run_cli, writing

STATS_NAME = "lora_stats.json"
OVERVIEW_NAME = "lora_overview.png"


@dataclass
class LayerStats:
    """The spectrum of one layer's update ΔW = s·B·A."""

    name: str
    shape: Tuple[int, int]
    rank: int
    scaling: float
    singular_values: List[float]
    effective_rank: float
    energy_top_k: float
    fro_norm: float
    spectral_norm: float
    relative_update: Optional[float] = None
    top_k: int = field(default=1, repr=False)


def layer_stats(name: str, delta: torch.Tensor, rank: int, scaling: float, top_k: int,
                base_weight: Optional[torch.Tensor] = None) -> LayerStats:
    """The numbers of one layer, from its ΔW (fp32) and, optionally, its base weight W."""
    sigma = torch.linalg.svdvals(delta.float())[:rank]
    energy = sigma.double().square()
    total = energy.sum().item()
    p = sigma.double() / sigma.double().sum() if total > 0 else None
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item() if p is not None else 0.0
    relative = None
    if base_weight is not None:
        relative = (delta.double().norm() / base_weight.double().norm().clamp(min=1e-30)).item()
    return LayerStats(
        name=name, shape=tuple(delta.shape), rank=rank, scaling=scaling, singular_values=sigma.tolist(),
        effective_rank=math.exp(entropy) if total > 0 else 0.0,
        energy_top_k=energy[:top_k].sum().item() / total if total > 0 else 0.0,
        fro_norm=math.sqrt(total), spectral_norm=sigma[0].item() if len(sigma) else 0.0,
        relative_update=relative, top_k=top_k,
    )


# ---------------------------------------------------------------------------------------------------
# Reading an adapter: (name, ΔW, rank, scaling, W or None) per layer


def model_layers(model, adapter_name: Optional[str] = None) -> List[Tuple[str, torch.Tensor, int, float,
                                                                         Optional[torch.Tensor]]]:
    """``[(name, ΔW, rank, scaling, W)]`` of a model's :class:`FusedLoRALinear` layers, in module order:
    of the default adapter, or of adapter ``adapter_name`` (on the layers that have it)."""
    from lora_kernels import iter_lora_layers

    def base(layer):
        return layer.weight.detach() if layer.quantize is None else layer.qweight.dequantize()  # W in fp32

    if adapter_name is None:
        return [(name, layer.delta_weight(), layer.rank, layer.scaling, base(layer))
                for name, layer in iter_lora_layers(model)]
    return [(name, layer.delta_weight([adapter_name]), layer.lora_configs[adapter_name].rank,
             layer.lora_configs[adapter_name].scaling, base(layer))
            for name, layer in iter_lora_layers(model) if adapter_name in layer.lora_configs]


def read_adapter_layers(adapter: Path, base: Optional[Path] = None):
    """``[(name, ΔW, rank, scaling, W or None)]`` of an adapter file or folder, in module order.

    Without ``base`` the file alone is read (W is then None); a PEFT folder needs ``base``. A DoRA adapter's
    update ``g⊙(W + s·B·A) − W`` needs W: with ``base`` it is that, without it the direction term ``s·B·A``.

    Raises:
        CLIError: a missing or unreadable file, or an adapter that does not fit ``base``.
    """
    from lora_kernels.io import FORMAT, read_adapter

    from .lora_io import load_adapter, minimind_modules

    if not adapter.exists():
        raise CLIError(f"adapter {str(adapter)!r}: no such file or folder")
    with reading(f"adapter {str(adapter)!r}"):
        if base is not None or adapter.is_dir():
            from .checkpoint import BUNDLED_BASE, load_minimind

            model = load_minimind(base or BUNDLED_BASE)
            load_adapter(model, adapter)
            return model_layers(model)
        read = read_adapter(adapter)  # the file opened once; its format, metadata and tensors checked
        if read.format == FORMAT:
            pairs = {name: (pair["lora_A"], pair["lora_B"]) for name, pair in read.modules().items()}
        else:  # MiniMind's format: no scaling (s = 1)
            pairs = {name: (pair["A"], pair["B"]) for name, pair in minimind_modules(read.tensors, adapter).items()}
        layers = []
        for name, (a, b) in pairs.items():
            # The scaling rule (and the checks of the file's settings) are LoRAConfig's and io's own.
            scaling = read.layer_config(name, a.shape[0]).scaling
            delta = (b.float() @ a.float()) * scaling
            layers.append((name, delta, a.shape[0], scaling, None))
    return sorted(layers, key=lambda item: _natural_key(item[0]))


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------------------------------------------
# Figures


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def plot_layer(stats: LayerStats, delta: torch.Tensor, path: Path) -> None:
    """One layer: the heatmap of ΔW (diverging colours, 0 in white) and its singular values."""
    plt = pyplot()
    fig, (ax_map, ax_sv) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [1.25, 1]})
    limit = max(delta.abs().max().item(), 1e-12)
    image = ax_map.imshow(delta.float().numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto",
                          interpolation="nearest")
    fig.colorbar(image, ax=ax_map, fraction=0.046, pad=0.04)
    ax_map.set_title(f"ΔW = s·B·A  {stats.shape[0]}×{stats.shape[1]}, s = {stats.scaling:g}")
    ax_map.set_xlabel("input feature")
    ax_map.set_ylabel("output feature")

    sigma = stats.singular_values
    index = range(1, len(sigma) + 1)
    ax_sv.bar(index, sigma, color="tab:blue", label="singular value σᵢ")
    ax_sv.set_xlabel("i")
    ax_sv.set_ylabel("σᵢ")
    ax_energy = ax_sv.twinx()
    total = sum(s * s for s in sigma) or 1.0
    cumulative = [sum(s * s for s in sigma[:i]) / total for i in index]
    ax_energy.plot(index, cumulative, "o-", color="tab:orange", label="cumulative energy")
    ax_energy.set_ylim(0, 1.05)
    ax_energy.set_ylabel("share of ‖ΔW‖²_F")
    ax_sv.set_title(f"effective rank {stats.effective_rank:.2f} of {stats.rank}, "
                    f"top-{stats.top_k} energy {100 * stats.energy_top_k:.0f}%")
    fig.suptitle(stats.name)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_overview(stats: Sequence[LayerStats], path: Path, title: str = "LoRA update per layer") -> None:
    """All layers side by side: ‖ΔW‖_F (or ‖ΔW‖/‖W‖), effective rank, top-k energy, normalised spectra."""
    plt = pyplot()
    names = [s.name for s in stats]
    short = [re.sub(r"^model\.layers\.", "L", n).replace("self_attn.", "").replace("mlp.", "") for n in names]
    x = list(range(len(stats)))
    relative = all(s.relative_update is not None for s in stats)
    fig, axes = plt.subplots(2, 2, figsize=(max(10, 0.45 * len(stats) + 4), 8))
    bars = [(axes[0][0], [s.relative_update if relative else s.fro_norm for s in stats],
             "‖ΔW‖_F / ‖W‖_F" if relative else "‖ΔW‖_F", "size of the update"),
            (axes[0][1], [s.effective_rank for s in stats], "effective rank", "effective rank (max = r)"),
            (axes[1][0], [s.energy_top_k for s in stats], f"top-{stats[0].top_k if stats else 1} energy share",
             "share of ‖ΔW‖²_F in the top directions")]
    for ax, values, ylabel, subtitle in bars:
        ax.bar(x, values, color="tab:blue")
        ax.set_xticks(x)
        ax.set_xticklabels(short, rotation=90 if len(stats) > 6 else 0, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(subtitle)
        ax.grid(axis="y", alpha=0.3)
    axes[0][1].axhline(max((s.rank for s in stats), default=0), color="grey", ls="--", lw=1)
    axes[1][0].set_ylim(0, 1.05)

    width = max((len(s.singular_values) for s in stats), default=1)
    spectra = torch.zeros(len(stats), width)
    for i, s in enumerate(stats):
        sigma = torch.tensor(s.singular_values)
        if len(sigma) and sigma[0] > 0:
            spectra[i, : len(sigma)] = sigma / sigma[0]
    ax = axes[1][1]
    image = ax.imshow(spectra.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_yticks(x)
    ax.set_yticklabels(short, fontsize=7)
    ax.set_xticks(range(width))
    ax.set_xticklabels(range(1, width + 1), fontsize=7)
    ax.set_xlabel("i")
    ax.set_title("σᵢ / σ₁ per layer")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def write_stats(stats: Sequence[LayerStats], path: Path, source: str) -> None:
    rows = [{k: v for k, v in asdict(s).items() if k != "top_k"} for s in stats]
    document = {"adapter": source, "top_k": stats[0].top_k if stats else None, "layers": rows}
    text = json.dumps(document, indent=1, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def plot_adapter(layers, out_dir: Path, source: str, top_k: int = 1, per_layer: bool = True,
                 title: Optional[str] = None) -> List[LayerStats]:
    """Writes ``lora_stats.json``, ``lora_overview.png`` and (``per_layer``) one PNG per layer to ``out_dir``.

    Args:
        layers: ``[(name, ΔW, rank, scaling, W or None)]`` (see :func:`read_adapter_layers`).

    Returns:
        The statistics, one per layer.
    """
    if not layers:
        raise CLIError(f"adapter {source!r} has no LoRA layer")
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = [layer_stats(name, delta, rank, scaling, min(top_k, rank), base_weight)
             for name, delta, rank, scaling, base_weight in layers]
    if per_layer:
        for s, (_, delta, *_rest) in zip(stats, layers):
            plot_layer(s, delta, out_dir / f"{s.name.replace('.', '_')}.png")
    plot_overview(stats, out_dir / OVERVIEW_NAME, title or f"LoRA update per layer: {Path(source).name}")
    write_stats(stats, out_dir / STATS_NAME, source)
    return stats


NAMED_CURVES = 3  # up to this many adapters' curves, each in the legend in the plot; more: see plot_loss


def plot_loss(rows: List[dict], path: Path, title: str) -> None:
    """The loss curve of a run's metrics rows (``minimind.train_lora``): train loss per logged step, and the
    evaluation loss where there is one; several adapters' rows give one curve per adapter. More than
    :data:`NAMED_CURVES` adapters (16 curves would hide each other under their legend): a wider figure, one
    thin curve per adapter in its own colour (its evaluation loss dashed, in the same colour), their mean
    thick and black, and the legend beside the plot.

    Raises:
        CLIError: the picture could not be written (named).
    """
    plt = pyplot()
    # Several adapters log "loss/<adapter>" (and "eval_loss/<adapter>"): one curve each instead of their mean.
    keys = [k for k in rows[0] if k.startswith("loss/")] or ["loss"]
    eval_keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith("eval_loss/"))) or ["eval_loss"]
    steps = [r["step"] for r in rows]
    if len(keys) > NAMED_CURVES:
        fig, ax = plt.subplots(figsize=(10, 4.8))
        cmap = plt.get_cmap("tab20" if len(keys) <= 20 else "viridis")
        for i, key in enumerate(keys):
            color = cmap(i if len(keys) <= 20 else i / (len(keys) - 1))
            name = key[len("loss/"):]
            ax.plot(steps, [r[key] for r in rows], color=color, lw=1.0, alpha=0.85, label=name)
            evals = [r for r in rows if f"eval_loss/{name}" in r]
            if evals:
                ax.plot([r["step"] for r in evals], [r[f"eval_loss/{name}"] for r in evals], "o--", color=color,
                        lw=1.0, ms=3)
        ax.plot(steps, [r["loss"] for r in rows], color="black", lw=2.5, label=f"mean of {len(keys)}")
        ax.set(xlabel="optimizer step", ylabel="cross-entropy per assistant token", title=title)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", ncol=-(-(len(keys) + 1) // 24),
                  title="train (eval: dashed)" if any(k in r for r in rows for k in eval_keys) else "train",
                  title_fontsize="small")
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            ax.plot(steps, [r[key] for r in rows], label=f"train {key}".replace("/", " "))
        for key in eval_keys:
            evals = [r for r in rows if key in r]
            if evals:
                ax.plot([r["step"] for r in evals], [r[key] for r in evals], "o-",
                        label=key.replace("eval_loss", "eval loss").replace("/", " "))
        ax.set(xlabel="optimizer step", ylabel="cross-entropy per assistant token", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with writing(path):
        _save(fig, path)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (see the module docstring); returns the exit status."""
    return run_cli("plot_lora", _main, argv)


def _main(argv: Optional[Sequence[str]]) -> None:
    p = argparse.ArgumentParser(prog="python -m minimind.plot_lora", description=__doc__.split("\n")[0])
    p.add_argument("adapter", type=Path, help="adapter: MiniMind .pth, lora_kernels .safetensors/.pth, PEFT folder")
    p.add_argument("--base", type=Path, default=None,
                   help="the base the adapter belongs to: adds ‖ΔW‖/‖W‖ (needed for a PEFT folder; default there: "
                        "the bundled base)")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs and lora_stats.json")
    p.add_argument("--top_k", type=number(1, integer=True), default=1,
                   help="energy share reported for the top k singular directions")
    p.add_argument("--no_layers", action="store_true", help="only the overview, no per-layer figures")
    args = p.parse_args(argv)
    layers = read_adapter_layers(args.adapter, args.base)
    try:
        stats = plot_adapter(layers, args.out, str(args.adapter), top_k=args.top_k, per_layer=not args.no_layers)
    except OSError as err:
        raise CLIError(f"--out {str(args.out)!r}: could not write: {err.strerror or err}")
    print(f"{len(stats)} layers -> {args.out / OVERVIEW_NAME}, {args.out / STATS_NAME}"
          + ("" if args.no_layers else f" and {len(stats)} per-layer PNGs"))
    for s in stats:
        print(f"  {s.name:<40} ‖ΔW‖_F {s.fro_norm:.3g}  effective rank {s.effective_rank:.2f}/{s.rank}  "
              f"top-{s.top_k} energy {100 * s.energy_top_k:.0f}%")


if __name__ == "__main__":
    raise SystemExit(main())
