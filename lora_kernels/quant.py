"""Frozen quantized base weights for QLoRA: NF4 (blockwise absmax, optional double quantization) and int8.

Formats (W is (N, K) = (out_features, in_features), flattened row-major to f = n·K + k):

* **NF4**, the QLoRA paper's 4-bit NormalFloat, laid out exactly as bitsandbytes' ``quantize_4bit`` /
  ``Params4bit`` (``quant_type="nf4"``), so a bitsandbytes-quantized weight converts without requantizing:

  - blocks of ``blocksize`` (64) consecutive elements of the flattened W (a block may span two rows when
    K is not a multiple of 64); ``absmax[b] = max |W_f|`` over block b, fp32;
  - ``code_f = argmin_j |W_f·(1/absmax[b]) - NF4[j]|`` over the 16 values :data:`NF4_CODE` (ties to the
    lower code), i.e. ``bucketize`` on the midpoints of the sorted codebook;
  - packing: two codes per byte, element f in byte f // 2, the even element in the high nibble:
    ``byte = code_{2i} << 4 | code_{2i+1}`` (an odd element count is padded with
    code 7, the code of 0.0);
  - dequantization: ``W_f = NF4[code_f] · absmax[f // blocksize]`` in fp32, then rounded to the
    compute dtype once.
  - double quantization (bitsandbytes' ``compress_statistics=True``): ``offset = mean(absmax)``, and
    ``absmax - offset`` is quantized blockwise (blocks of 256) to 8 bits with the signed dynamic map
    (:func:`dynamic_map`): ``absmax2[c] = max |absmax_b - offset|`` over block c, ``qabsmax_b`` = nearest
    code of ``(absmax_b - offset)·(1/absmax2[c])``; then ``absmax_b = DYN[qabsmax_b]·absmax2[b // 256] +
    offset``. This cuts the scales from 32 bits per 64 weights (0.5 bit/weight) to about 0.127.
    Dequantization of bitsandbytes' double-quantized data is bit-exact; our own 8-bit absmax codes are
    the nearest ones, where bitsandbytes' CPU binary search picks the neighbouring code for about 0.2% of
    absmax values lying within ~1e-4 of the midpoint between two codes (one code step, ≈0.5% of that
    absmax): bitsandbytes' own packed data is never requantized, so conversions are unaffected.

* **int8**, per-row absmax as bitsandbytes' ``int8_vectorwise_quant`` (``Linear8bitLt``'s CB/SCB):
  ``scale[n] = max_k |W[n, k]|``, ``q = round(W·(127/scale))``, ``W = (q·scale[n])·(1/127)``.

:class:`QuantizedWeight` holds the packed bytes and scales; :class:`lora_kernels.FusedLoRALinear` keeps its
tensors as buffers (so they follow ``state_dict``, ``.to()`` and ``deepcopy``) and builds the view per call.
The torch backend multiplies by it in row chunks (:meth:`QuantizedWeight.linear`, :meth:`grad_input`): at
most :data:`CHUNK_ELEMENTS` weights are dequantized at a time, never the whole 16-bit W of a large layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Tuple

import torch

FORMATS = ("nf4", "int8")

# The 16 NF4 values (QLoRA, Dettmers et al. 2023, appendix E): quantiles of N(0, 1) normalised to [-1, 1],
# with an exact zero; the same float32 values as bitsandbytes' ``get_4bit_type("nf4")``.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCKSIZE = 64  # NF4 elements per absmax (bitsandbytes' default for quantize_4bit)
ABSMAX_BLOCKSIZE = 256  # absmax values per second-level scale under double quantization
INT8_SCALE = 7.874015718698502e-3  # 1/127 as bitsandbytes multiplies by it (fp32)
# Rows of W are dequantized in chunks of at most this many elements by the torch backend (8 MiB in bf16).
CHUNK_ELEMENTS = 1 << 22


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 values as a float32 tensor (sorted, code 7 is 0.0)."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic (tree) quantization map, 256 sorted float32 values in [-1, 1].

    For exponent i = 0..6, 2^i fraction values ``10^(i-6) · mid`` (mid the midpoints of ``2^i + 1``
    evenly spaced points in [0.1, 1]) on each side of zero, then 0 and 1: 2·127 + 2 = 256 values. This is
    the map bitsandbytes' ``create_dynamic_map(signed=True)`` builds and double quantization uses.
    """
    values = [0.0, 1.0]
    for i in range(7):
        points = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (points[:-1] + points[1:]) / 2.0
        # scaled in fp32, as bitsandbytes does (the fp32 products are the map's values)
        values += (10.0 ** (i - 6) * mids).tolist() + (-(10.0 ** (i - 6)) * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted ``code`` to each element (ties to the lower index)."""
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2)


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block, flat scaled into [-1, 1] by its block's absmax), as bitsandbytes computes them:
    ``x·(1/absmax)`` in fp32, clamped (an all-zero block scales by 1/1e-38 to zeros)."""
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, -n % blocksize)).view(-1, blocksize)
    absmax = padded.abs().amax(dim=1)
    if n % blocksize:  # bitsandbytes stores a partial last block's absmax clamped to 1e-38 (full ones not)
        absmax[-1] = absmax[-1].clamp(min=1e-38)
    scaled = torch.clamp(padded * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)[:n]
    return absmax, scaled


@dataclass
class QuantizedWeight:
    """A frozen (N, K) weight in NF4 or int8 (see the module docstring for the layouts).

    Attributes:
        format: ``"nf4"`` or ``"int8"``.
        shape: (N, K) = (out_features, in_features).
        data: nf4: uint8 (ceil(N·K / 2),) packed codes; int8: int8 (N, K).
        absmax: nf4: fp32 (ceil(N·K / blocksize),), or uint8 of the same length when double-quantized;
            int8: fp32 (N,) row absmax.
        code: nf4: the fp32 (16,) codebook (NF4 values; kept as a tensor so the kernels can read it).
        blocksize: elements per absmax (nf4).
        absmax2, code2, offset: double quantization's fp32 (ceil(blocks / 256),) scales, (256,) dynamic map
            and (1,) offset; None otherwise.
    """

    format: str
    shape: Tuple[int, int]
    data: torch.Tensor
    absmax: torch.Tensor
    code: Optional[torch.Tensor] = None
    blocksize: int = BLOCKSIZE
    absmax2: Optional[torch.Tensor] = None
    code2: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None
    _scales: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    # --- what the rest of the library asks of a weight
    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    def dim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the format stores (codes, scales, codebooks)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The tensors of the format by name (``data``, ``absmax``, and those that are set of ``code``,
        ``absmax2``, ``code2``, ``offset``): what a module registers as buffers."""
        names = ("data", "absmax", "code", "absmax2", "code2", "offset")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    # --- dequantization
    def block_scales(self) -> torch.Tensor:
        """The fp32 absmax per block (nf4; double quantization resolved) or per row (int8)."""
        if not self.double_quant:
            return self.absmax
        if self._scales is None:  # cached: a QuantizedWeight is rebuilt per call, so this lives for one call
            blocks = self.absmax.numel()
            scaled = self.code2[self.absmax.long()].view(-1)
            padded = torch.nn.functional.pad(scaled, (0, -blocks % ABSMAX_BLOCKSIZE)).view(-1, ABSMAX_BLOCKSIZE)
            self._scales = (padded * self.absmax2[:, None]).reshape(-1)[:blocks] + self.offset
        return self._scales

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """W (or its rows ``[start, end)``) as a dense ``dtype`` tensor: computed in fp32, rounded once."""
        n, k = self.shape
        start, end = rows if rows is not None else (0, n)
        if self.format == "int8":
            w = self.data[start:end].float() * self.absmax[start:end, None].float() * INT8_SCALE
            return w.to(dtype)
        e0, e1 = start * k, end * k
        if e1 == e0:
            return torch.empty((end - start, k), dtype=dtype, device=self.device)
        # Bytes covering elements [e0, e1), each looked up in a 256-entry table of its two values (high nibble
        # first): no per-element index tensor, just one int32 index per byte; trimmed to the range.
        packed = self.data.view(-1)[e0 // 2:(e1 + 1) // 2]
        pairs = torch.stack((self.code.repeat_interleave(16), self.code.repeat(16)), dim=1)  # byte -> (hi, lo)
        values = pairs.index_select(0, packed.int()).view(-1)[e0 % 2:e0 % 2 + e1 - e0]
        # Blocks covering the range: pad the front to the first block's start so rows of blocksize line up.
        b0, lead = e0 // self.blocksize, e0 % self.blocksize
        values = torch.nn.functional.pad(values, (lead, -(lead + e1 - e0) % self.blocksize)).view(-1, self.blocksize)
        scales = self.block_scales()[b0:b0 + values.shape[0]]
        w = (values * scales[:, None]).view(-1)[lead:lead + e1 - e0]
        return w.view(end - start, k).to(dtype)

    def row_chunks(self, chunk_elements: Optional[int] = None) -> Iterator[Tuple[int, int]]:
        """Row ranges [start, end) of at most ``chunk_elements`` weights (at least one row each)."""
        n, k = self.shape
        rows = max(1, (chunk_elements or CHUNK_ELEMENTS) // max(k, 1))
        for start in range(0, n, rows):
            yield start, min(n, start + rows)

    # --- the two products the torch backend needs, a row chunk of W at a time
    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
               chunk_elements: Optional[int] = None) -> torch.Tensor:
        """``x·Wᵀ (+ bias)`` for x (M, K), in x's dtype, dequantizing at most ``chunk_elements`` at a time."""
        n, k = self.shape
        chunks = list(self.row_chunks(chunk_elements))
        if len(chunks) == 1:  # a small layer: one dequantization, one GEMM into a contiguous output
            w = self.dequantize(x.dtype)
            return torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())
        y = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
        for start, end in chunks:
            w = self.dequantize(x.dtype, (start, end))
            out = y[:, start:end]
            if bias is None:
                out.copy_(torch.mm(x, w.t()))
            else:
                out.copy_(torch.addmm(bias[start:end], x, w.t()))
        return y

    def grad_input(self, grad_y: torch.Tensor, out: Optional[torch.Tensor] = None,
                   chunk_elements: Optional[int] = None) -> torch.Tensor:
        """``dY·W`` for dY (M, N), accumulated into ``out`` (M, K) when given, chunk by chunk of W's rows."""
        n, k = self.shape
        if out is None:
            out = torch.zeros((grad_y.shape[0], k), dtype=grad_y.dtype, device=grad_y.device)
        for start, end in self.row_chunks(chunk_elements):
            out.addmm_(grad_y[:, start:end], self.dequantize(grad_y.dtype, (start, end)))
        return out

    @classmethod
    def from_tensors(cls, format: str, shape: Tuple[int, int], tensors: Dict[str, torch.Tensor],
                     blocksize: int = BLOCKSIZE) -> "QuantizedWeight":
        """The view over tensors named as by :meth:`tensors` (a module's buffers)."""
        return cls(format, (int(shape[0]), int(shape[1])), tensors["data"], tensors["absmax"],
                   tensors.get("code"), blocksize, tensors.get("absmax2"), tensors.get("code2"),
                   tensors.get("offset"))


def quantize_nf4(weight: torch.Tensor, blocksize: int = BLOCKSIZE, double_quant: bool = False) -> QuantizedWeight:
    """NF4-quantizes a 2-D weight (any float dtype) as bitsandbytes' ``quantize_4bit(quant_type="nf4")``.

    Raises:
        ValueError: weight is not 2-D, or blocksize is not a power of two in [32, 4096].
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize!r}")
    flat = weight.detach().reshape(-1).float()
    code = nf4_code(weight.device)
    absmax, scaled = _blockwise_absmax(flat, blocksize)
    # An odd element count is padded with a scaled 0.0 (code 7), as bitsandbytes pads.
    codes = _nearest_code(torch.nn.functional.pad(scaled, (0, scaled.numel() % 2)), code).to(torch.uint8)
    data = (codes[0::2] << 4) | codes[1::2]
    q = QuantizedWeight("nf4", tuple(weight.shape), data, absmax, code, blocksize)
    if double_quant:
        q.offset = absmax.mean().view(1)
        code2 = dynamic_map().to(weight.device)
        absmax2, scaled2 = _blockwise_absmax(absmax - q.offset, ABSMAX_BLOCKSIZE)
        q.absmax, q.absmax2, q.code2 = _nearest_code(scaled2, code2).to(torch.uint8), absmax2, code2
    return q


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Per-row absmax int8 as bitsandbytes' ``int8_vectorwise_quant`` (an all-zero row stays zero).

    Raises:
        ValueError: weight is not 2-D.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    q = torch.round(w * (127.0 / absmax.clamp(min=1e-38))[:, None]).to(torch.int8)
    return QuantizedWeight("int8", tuple(weight.shape), q, absmax)


def quantize(weight: torch.Tensor, format: str, double_quant: bool = False) -> QuantizedWeight:
    """``quantize_nf4`` (``format="nf4"``) or ``quantize_int8`` (``"int8"``) of a 2-D weight.

    Raises:
        ValueError: an unknown format, or double quantization asked of int8.
    """
    if format == "nf4":
        return quantize_nf4(weight, double_quant=double_quant)
    if format == "int8":
        if double_quant:
            raise ValueError("double_quant applies to nf4's blockwise absmax; int8 has one fp32 scale per row")
        return quantize_int8(weight)
    raise ValueError(f"quantize must be one of {FORMATS} or None, got {format!r}")


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the base weights of a model: quantized formats' tensors plus every other parameter and
    buffer of dense layers, LoRA adapters excluded (``lora_A``/``lora_B``)."""
    total = 0
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if "lora_" in name.rsplit(".", 1)[-1]:
            continue
        total += t.numel() * t.element_size()
    return total


def _unpack_bnb_cpu_layout(packed: torch.Tensor, shape: Tuple[int, int], block_n: int = 32) -> torch.Tensor:
    """NF4 codes in bitsandbytes' CPU layout (``packing_format_for_cpu``: (N, K/2) bytes, each group of 32 rows
    by 2 columns stored as 32 low nibbles then 32 high nibbles) back to the row-major packing (two codes per
    byte, the even element in the high nibble)."""
    n, k = shape
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (n, k // 2) or n % block_n or k % 2:
        raise ValueError(f"bitsandbytes' CPU NF4 layout of a ({n}, {k}) weight must be ({n}, {k // 2}) uint8 with "
                         f"N a multiple of {block_n}; got {tuple(packed.shape)} {packed.dtype}")
    groups = packed.reshape(-1, block_n)
    pairs = torch.cat((groups & 15, groups >> 4), dim=1)  # (N/32 · K/2, 64): (row, column of the pair)
    codes = pairs.reshape(n // block_n, k // 2, block_n, 2).transpose(1, 2).reshape(-1)  # (N·K,) row-major
    return ((codes[0::2] << 4) | codes[1::2]).contiguous()


def from_bitsandbytes(layer: torch.nn.Module) -> Optional[Tuple[QuantizedWeight, torch.dtype]]:
    """The packed data of a bitsandbytes ``Linear4bit`` (NF4) or ``Linear8bitLt`` (int8, frozen) as a
    :class:`QuantizedWeight` sharing its tensors (no requantization, no copy), with the dtype the layer
    computes in; None when ``layer`` is not one of them. bitsandbytes is not imported: the layer is read
    by its attributes, and never changed. A ``Linear4bit`` that bitsandbytes repacked for its CPU kernel
    (at an eval forward on an AVX-512 CPU) is read from that layout into a copy, with the bf16 absmax the
    repack left it (what the layer itself computes with from then on).

    Raises:
        ValueError: a bitsandbytes layer that cannot be converted (FP4, a weight not yet quantized,
            8-bit weights kept in fp16 for training), with what was found.
    """
    kind = type(layer).__name__
    weight = getattr(layer, "weight", None)
    if kind == "Linear4bit" and type(weight).__name__ == "Params4bit":
        state = weight.quant_state
        if state is None or not getattr(weight, "bnb_quantized", True):
            raise ValueError(f"the {kind} weight is not quantized yet (move the layer to its device first)")
        if state.quant_type != "nf4":
            raise ValueError(f"only NF4 converts without requantizing; this {kind} holds {state.quant_type!r}")
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacked the layer for its AVX-512 kernel at an eval forward: read that layout as it
            # stands, without changing the layer (its own inverse rewrites the layer's state in place and
            # leaves the layer unusable). The repack rounded absmax to bf16 and folded double quantization in.
            return QuantizedWeight("nf4", tuple(state.shape), _unpack_bnb_cpu_layout(weight.data, state.shape),
                                   state.absmax.t().reshape(-1).float(), state.code, state.blocksize), \
                state.original_dtype
        q = QuantizedWeight("nf4", tuple(state.shape), weight.data.view(torch.uint8).reshape(-1), state.absmax,
                            state.code, state.blocksize)
        if state.nested:
            if state.state2.blocksize != ABSMAX_BLOCKSIZE:
                raise ValueError(f"double quantization with absmax blocks of {state.state2.blocksize}; expected "
                                 f"{ABSMAX_BLOCKSIZE}")
            q.absmax2, q.code2, q.offset = state.state2.absmax, state.state2.code, state.offset.reshape(1)
        return q, state.dtype
    if kind == "Linear8bitLt" and type(weight).__name__ == "Int8Params":
        data = weight.CB if getattr(weight, "CB", None) is not None else weight.data
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else getattr(layer.state, "SCB", None)
        if data.dtype != torch.int8 or scb is None:
            raise ValueError(f"the {kind} weight is not int8-quantized (dtype {data.dtype}, has_fp16_weights="
                             f"{getattr(weight, 'has_fp16_weights', None)}); quantize it (move it to its device)")
        # LLM.int8()'s outlier threshold concerns activations; the weight is CB·SCB/127 either way, which
        # the kernels use without quantizing activations.
        return QuantizedWeight("int8", (data.shape[0], data.shape[1]), data.contiguous(), scb.float()), torch.float16
    return None


__all__ = ["FORMATS", "NF4_CODE", "BLOCKSIZE", "QuantizedWeight", "dynamic_map", "from_bitsandbytes", "nf4_code",
           "quantize", "quantize_int8", "quantize_nf4", "weight_bytes"]
