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
