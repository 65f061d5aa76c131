"""Quantized base formats (lora_kernels.quant): NF4 by its definition, and against bitsandbytes on the CPU."""
import math

import pytest
import torch
from helpers import TOLERANCES, bnb_nf4_weight, checked_bitsandbytes, nf4_definition

from lora_kernels.quant import (
    ABSMAX_BLOCKSIZE,
    BLOCKSIZE,
    NF4_CODE,
    INT8_SCALE,
    QuantizedWeight,
    dynamic_map,
    quantize,
    quantize_int8,
    quantize_nf4,
)

SHAPES = [(128, 96), (33, 71), (7, 5), (1, 1), (3, 64), (300, 257)]


def _nf4_by_definition(w: torch.Tensor, blocksize: int = BLOCKSIZE):
    """Codes and absmax computed element by element in float64 from the NF4 definition (nearest of the
    16 values, ties to the lower code): the independent reference for quantize_nf4."""
    flat = w.reshape(-1).double()
    code = torch.tensor(NF4_CODE, dtype=torch.float64)
    codes, absmax = [], []
    for b in range(math.ceil(flat.numel() / blocksize)):
        block = flat[b * blocksize:(b + 1) * blocksize]
        am = float(block.abs().max().float())  # stored as fp32
        absmax.append(am)
        inv = float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(max(am, 1e-38), dtype=torch.float32))
        for v in block.tolist():
            s = min(max(float(torch.tensor(v, dtype=torch.float32) * torch.tensor(inv, dtype=torch.float32)), -1), 1)
            d = (code - s).abs()
            codes.append(int(torch.nonzero(d == d.min())[0]))
    return codes, absmax


def test_nf4_code_values_and_symmetry():
    code = torch.tensor(NF4_CODE)
    assert len(NF4_CODE) == 16 and NF4_CODE[0] == -1.0 and NF4_CODE[7] == 0.0 and NF4_CODE[15] == 1.0
    assert torch.all(code[1:] > code[:-1]), "the codebook must be sorted"
    # 7 negative and 8 positive values (QLoRA's asymmetric construction with an exact zero)
    assert int((code < 0).sum()) == 7 and int((code > 0).sum()) == 8


@pytest.mark.parametrize("shape", [(7, 5), (3, 64), (5, 70)])
def test_nf4_quantize_matches_definition(shape):
    torch.manual_seed(0)
    w = torch.randn(shape)
    w.view(-1)[0] = 0.0
    q = quantize_nf4(w)
    codes, absmax = _nf4_by_definition(w)
    got = torch.stack((q.data >> 4, q.data & 15), dim=1).view(-1)[: w.numel()]
    assert got.tolist() == codes
    assert q.absmax.tolist() == pytest.approx(absmax, rel=0, abs=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nf4_dequantize_is_code_times_absmax(shape, dtype):
    torch.manual_seed(1)
    q = quantize_nf4(torch.randn(shape))
    n = shape[0] * shape[1]
    f = torch.arange(n)
    byte = q.data[f // 2].long()
    codes = torch.where(f % 2 == 0, byte >> 4, byte & 15)  # even element in the high nibble
    expected = (torch.tensor(NF4_CODE)[codes] * q.absmax[f // BLOCKSIZE]).view(shape).to(dtype)
    assert torch.equal(q.dequantize(dtype), expected)
    # rows of the dequantized weight, as the torch backend takes them chunk by chunk
    for start, end in [(0, 1), (1, shape[0]), (shape[0] // 2, shape[0])]:
        assert torch.equal(q.dequantize(dtype, (start, end)), expected[start:end])


def test_nf4_double_quant_definition():
    torch.manual_seed(2)
    w = torch.randn(600, 130)  # 1219 blocks: 5 second-level blocks, the last one partial
    plain, dq = quantize_nf4(w), quantize_nf4(w, double_quant=True)
    assert torch.equal(plain.data, dq.data), "double quantization changes only the scales"
    assert dq.absmax.dtype == torch.uint8 and dq.absmax2.shape == (math.ceil(plain.absmax.numel() / 256),)
    assert torch.equal(dq.offset, plain.absmax.mean().view(1))
    code2 = dynamic_map()
    assert code2.shape == (256,) and code2.min() >= -1.0 and code2.max() == 1.0
    b = torch.arange(plain.absmax.numel())
    scales = code2[dq.absmax.long()] * dq.absmax2[b // ABSMAX_BLOCKSIZE] + dq.offset
    assert torch.equal(dq.block_scales(), scales)
    # each 8-bit code is the nearest to (absmax - offset) / absmax2
    v = ((plain.absmax - dq.offset) * (1.0 / dq.absmax2[b // ABSMAX_BLOCKSIZE])).double()
    dist = (v[:, None] - code2.double()[None, :]).abs()
    assert torch.all(dist.gather(1, dq.absmax.long()[:, None]).squeeze(1) <= dist.min(dim=1).values + 1e-12)
    # and the weights it gives stay within one step of the dynamic map of the fp32 absmax
    assert (dq.block_scales() - plain.absmax).abs().max() <= 0.01 * plain.absmax.max()


def test_int8_definition():
    torch.manual_seed(3)
    w = torch.randn(9, 13)
    w[4] = 0.0  # an all-zero row stays zero (no 0/0)
    q = quantize_int8(w)
    absmax = w.abs().amax(dim=1)
    assert torch.equal(q.absmax, absmax)
    expected_q = torch.round(w * (127.0 / absmax.clamp(min=1e-38))[:, None]).to(torch.int8)
    assert torch.equal(q.data, expected_q) and torch.all(q.data[4] == 0)
    assert torch.equal(q.dequantize(), expected_q.float() * absmax[:, None] * INT8_SCALE)
    assert (q.dequantize() - w).abs().max() <= absmax.max() / 127


def test_errors_name_the_value():
    with pytest.raises(ValueError, match="got 'fp8'"):
        quantize(torch.ones(2, 2), "fp8")
    with pytest.raises(ValueError, match=r"got shape \(4,\)"):
        quantize_nf4(torch.ones(4))
    with pytest.raises(ValueError, match="double_quant"):
        quantize(torch.ones(2, 2), "int8", double_quant=True)
    with pytest.raises(ValueError, match="got 48"):
        quantize_nf4(torch.ones(2, 2), blocksize=48)


def test_chunked_products_equal_dense():
    torch.manual_seed(4)
    q = quantize_nf4(torch.randn(37, 29))
    x, dy, bias = torch.randn(5, 29, dtype=torch.float64), torch.randn(5, 37, dtype=torch.float64), torch.randn(37)
    w = q.dequantize(torch.float64)
    # tiny chunks (2 rows of 29: blocks straddle chunk boundaries) against the whole weight
    atol = TOLERANCES[torch.float64]  # float64 both ways: only the summation order differs
    assert torch.allclose(q.linear(x, bias.double(), chunk_elements=60), x @ w.t() + bias.double(), atol=atol)
    assert torch.allclose(q.grad_input(dy, chunk_elements=60), dy @ w, atol=atol)
    assert [c for c in q.row_chunks(60)][:2] == [(0, 2), (2, 4)]


# --------------------------------------------------------------------------------- against bitsandbytes


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nf4_bit_for_bit_with_bitsandbytes(shape, dtype):
    F = checked_bitsandbytes("quantize_4bit").functional
    torch.manual_seed(5)
    w = torch.randn(shape).to(dtype)
    w.view(-1)[:3] = 0.0
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = quantize_nf4(w)
    assert torch.equal(packed.view(-1), ours.data)
    assert torch.equal(state.absmax, ours.absmax)
    assert torch.equal(state.code, ours.code)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nf4_dequantize_against_bitsandbytes(shape, dtype):
    torch.manual_seed(5)
    w = torch.randn(shape).to(dtype)
    ours = quantize_nf4(w)
    definition = nf4_definition(ours.data, ours.absmax, torch.tensor(NF4_CODE), w.numel(), BLOCKSIZE)
    assert torch.equal(ours.dequantize(dtype), definition.view(shape).float().to(dtype))  # checked whatever follows
    F = checked_bitsandbytes("quantize_4bit", "dequantize_4bit").functional
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(F.dequantize_4bit(packed, state), ours.dequantize(dtype))


@pytest.mark.parametrize("shape", [(128, 96), (300, 257), (600, 130)])
def test_nf4_double_quant_against_bitsandbytes(shape):
    torch.manual_seed(6)
    w = torch.randn(shape)
    ours = quantize_nf4(w, double_quant=True)
    F = checked_bitsandbytes("quantize_4bit").functional
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(dynamic_map(), F.create_dynamic_map(signed=True))
    assert torch.equal(packed.view(-1), ours.data)
    assert torch.equal(state.offset.view(1), ours.offset) and torch.equal(state.state2.absmax, ours.absmax2)
    # bitsandbytes' CPU binary search and our nearest code agree except next to a midpoint of two codes
    differ = (state.absmax.long() - ours.absmax.long()).abs()
    assert int(differ.max()) <= 1 and float((differ > 0).float().mean()) < 0.01
    # bitsandbytes' own data, viewed by us, dequantizes by the definition (code · second-level scale)
    theirs = QuantizedWeight("nf4", shape, packed.view(-1), state.absmax, state.code, 64,
                             state.state2.absmax, state.state2.code, state.offset.view(1))
    # one fp32 rounding of each dequantized value against the float64 definition: not a dtype tolerance
    assert torch.allclose(theirs.dequantize().double(), bnb_nf4_weight(packed, state), rtol=0, atol=1e-6)
    F = checked_bitsandbytes("dequantize_4bit").functional
    assert torch.equal(theirs.dequantize(), F.dequantize_4bit(packed, state))


def test_int8_bit_for_bit_with_bitsandbytes():
    F = checked_bitsandbytes("int8_vectorwise_quant", "int8_vectorwise_dequant").functional
    torch.manual_seed(7)
    w = torch.randn(65, 31, dtype=torch.float16)
    cb, scb, _ = F.int8_vectorwise_quant(w)
    ours = quantize_int8(w)
    assert torch.equal(cb, ours.data) and torch.equal(scb, ours.absmax)
    assert torch.equal(F.int8_vectorwise_dequant(cb, scb), ours.dequantize())
