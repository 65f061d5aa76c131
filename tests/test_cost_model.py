"""benchmarks/cost_model.py: its accounting, checked by hand on small cases."""
import pytest

from benchmarks.cost_model import GPUS, LAUNCH_US, Kernel, Shape, eager, frozen, ours, predict_us


def test_frozen_linear_bytes_and_flops_by_hand():
    s = Shape(m=4, k=3, n=2, r=1, dropout=0.0, element=2)
    fwd, dx = frozen(s)
    assert fwd.bytes == (4 * 3 + 3 * 2 + 4 * 2 + 2) * 2  # x, Wᵀ, y, bias
    assert fwd.flops == 2 * 4 * 2 * 3 and dx.flops == 2 * 4 * 3 * 2


def test_a_kernel_takes_the_slowest_of_its_three_limits():
    gpu = GPUS["h100"]
    memory = Kernel("m", bytes=gpu.bandwidth * 1e-6)  # 1 µs of memory traffic
    integer = Kernel("i", bytes=gpu.bandwidth * 1e-6, int_ops=gpu.int_ops * 3e-6)  # 3 µs of integer work
    assert predict_us([memory], gpu) == pytest.approx(1 + LAUNCH_US)
    assert predict_us([integer], gpu) == pytest.approx(3 + LAUNCH_US)


@pytest.mark.parametrize("width", [512, 4096])
def test_ours_moves_fewer_bytes_than_eager_and_more_than_the_floor(width):
    s = Shape(8192, width, width, 16, 0.1)
    moved = {name: sum(k.bytes for k in fn(s)) for name, fn in (("frozen", frozen), ("eager", eager), ("ours", ours))}
    assert moved["frozen"] < moved["ours"] < moved["eager"]
    # Our extra traffic over the floor is the rank-sized tensors, one more read of x and of dY: it cannot be
    # more than that.
    e = s.element
    bound = (2 * s.m * s.k + s.m * s.n) * e + 8 * s.m * s.r * e + 4 * s.n * s.r * 4 * (s.m // 128 + 1) + 4 * s.k * s.r * e
    assert moved["ours"] - moved["frozen"] <= bound


@pytest.mark.parametrize("fmt,w_bytes", [("nf4", 4 * 128 / 2 + 4 * 128 / 64 * 4), ("int8", 4 * 128 + 4 * 4)])
def test_quantized_gemms_read_the_packed_weight(fmt, w_bytes):
    from benchmarks.cost_model import DEQUANT_OPS, ours_quantized, quantized_weight_bytes

    s = Shape(m=300, k=128, n=4, r=2, dropout=0.0, element=2)
    assert quantized_weight_bytes(fmt, 4, 128) == w_bytes
    dense, quant = ours(s), ours_quantized(s, fmt)
    changed = [(a, b) for a, b in zip(dense, quant) if a != b]
    assert len(changed) == 2, "exactly the forward and dX GEMMs read W"
    for a, b in changed:
        assert b.bytes == a.bytes - 4 * 128 * 2 + w_bytes
        assert b.int_ops == a.int_ops + DEQUANT_OPS[fmt] * 4 * 128 * 3  # 3 M-tiles of 128 rows
        assert b.flops == a.flops


def test_dequantize_then_gemm_costs_two_more_kernels():
    from benchmarks.cost_model import dequant_then_ours

    s = Shape(8192, 4096, 4096, 16, 0.1)
    assert len(dequant_then_ours(s)) == len(ours(s)) + 2
    assert sum(k.bytes for k in dequant_then_ours(s)) > sum(k.bytes for k in ours(s))


def test_mixed_batch_is_ours_at_the_summed_rank_plus_its_small_tensors_and_the_loop_repeats_ours():
    import dataclasses

    from benchmarks.cost_model import GPUS, loop_over_adapters, mixed_table, ours_mixed

    s = Shape(m=1024, k=256, n=512, r=8, dropout=0.1, element=2)
    mixed = ours_mixed(s, 4)
    fused = ours(dataclasses.replace(s, r=32))
    assert mixed[:len(fused)] == fused
    extra = mixed[len(fused):]
    assert sum(k.bytes for k in extra) == (2 * (32 * 256 + 512 * 32) + 1024 * 32 + 2 * 3 * 1024 * 32) * 2
    assert all(k.flops == 0 for k in extra)
    loop = loop_over_adapters(s, 4)
    part = ours(dataclasses.replace(s, m=256))
    assert len(loop) == 1 + 4 * (len(part) + 4)
    assert sum(k.flops for k in loop) == pytest.approx(4 * sum(k.flops for k in part))
    # Four launches of everything cost more than one launch at the summed rank at this size.
    assert predict_us(loop, GPUS["h100"]) > predict_us(mixed, GPUS["h100"])
    assert mixed_table(1024, [256], 8, 4, [GPUS["h100"]]).count("\n") == 2


def test_launched_quantized_path_follows_the_launchers_rule():
    """The cost model predicts the path ops/quantized.py takes: dequantize-once for NF4 at large M on H100, in
    the loop at small M, for int8 and on A100."""
    from benchmarks.cost_model import dequant_then_ours, launched_quantized, ours_quantized

    big, small = Shape(8192, 4096, 4096, 16, 0.1), Shape(64, 4096, 4096, 16, 0.1)
    assert launched_quantized(big, "nf4", GPUS["h100"]) == dequant_then_ours(big, "nf4")
    assert launched_quantized(small, "nf4", GPUS["h100"]) == ours_quantized(small, "nf4")
    assert launched_quantized(big, "int8", GPUS["h100"]) == ours_quantized(big, "int8")
    assert launched_quantized(big, "nf4", GPUS["a100"]) == ours_quantized(big, "nf4")
    # where it switches, the switch is predicted to pay: once is faster than in-loop
    assert predict_us(dequant_then_ours(big, "nf4"), GPUS["h100"]) < predict_us(ours_quantized(big, "nf4"), GPUS["h100"])
