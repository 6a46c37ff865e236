"""kernels/gemm.py: oneDNN's products equal BLAS's in every orientation `addmm` picks, `linear`'s forward and
backward equal F.linear's, small or non-training products stay on BLAS, and `choose` resolves the setting."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.kernels import gemm
from nanoseek.kernels.head import linear_cross_entropies

needs_onednn = pytest.mark.skipif(gemm.onednn_product() is None, reason="this torch has no oneDNN")


@pytest.fixture
def calls(monkeypatch):
    """The oneDNN products run, counted (the products themselves unchanged)."""
    seen = []
    real = gemm._ONEDNN

    def counted(x, w):
        seen.append((tuple(x.shape), tuple(w.shape)))
        return real(x, w)
    monkeypatch.setattr(gemm, "_ONEDNN", counted)
    return seen


def operand(rows, cols, transposed, g):
    """A (rows, cols) fp32 matrix, row-major or the transpose of a row-major one."""
    return torch.randn(cols, rows, generator=g).T if transposed else torch.randn(rows, cols, generator=g)


@needs_onednn
@pytest.mark.parametrize("M,K,N", [(384, 96, 256), (160, 512, 96)])  # N < M and N >= M, each >= MIN_MACS
@pytest.mark.parametrize("a_t,b_t", [(False, False), (False, True), (True, False), (True, True)])
def test_addmm_equals_blas_in_every_orientation(calls, M, K, N, a_t, b_t):
    g = torch.Generator().manual_seed(0)
    a, b = operand(M, K, a_t, g), operand(K, N, b_t, g)
    ref = a.double() @ b.double()
    for beta, alpha in [(0, 1.0), (1, 1.4426950408889634)]:
        out = torch.randn(M, N, generator=g)
        want = beta * out.double() + alpha * ref
        got = gemm.addmm(out, a, b, beta=beta, alpha=alpha, onednn=True)
        assert got is out and got.is_contiguous()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    new = gemm.addmm(None, a, b, onednn=True)
    assert new.is_contiguous() and new.shape == (M, N)
    torch.testing.assert_close(new.double(), ref, rtol=1e-5, atol=1e-4)
    assert len(calls) == 3
    # the orientation: X row-major where a or b^T is, else the larger of M, N as W
    x_rows = M if (not a_t or b_t and N >= M) else N
    assert {c[0][0] for c in calls} == {x_rows}


@needs_onednn
def test_small_products_and_other_dtypes_stay_on_blas(calls):
    a, b = torch.randn(64, 64), torch.randn(64, 64)  # 64^3 < MIN_MACS
    torch.testing.assert_close(gemm.addmm(None, a, b, onednn=True), a @ b)
    w = torch.randn(128, 256, requires_grad=True)
    x = torch.randn(4, 64, 256, requires_grad=True)
    gemm.linear(x.double(), w.double(), onednn=True)  # fp64
    with torch.no_grad():
        gemm.linear(x, w, onednn=True)  # no training
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm.linear(x, w, onednn=True).dtype == torch.bfloat16  # autocast keeps its dtype
    assert not calls
    gemm.linear(x, w).sum().backward()  # BLAS: nothing through oneDNN
    assert not calls


@needs_onednn
@pytest.mark.parametrize("seq", [96, 75])  # 192 rows: one oneDNN product; 150: 128 rows oneDNN, 22 BLAS
def test_linear_forward_and_backward_equal_f_linear(calls, seq):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, seq, 256, generator=g, requires_grad=True)
    for w in (torch.randn(384, 256, generator=g), torch.randn(96, 256, generator=g)):  # O > I and O < I
        w.requires_grad_(True)
        dy = torch.randn(2, seq, w.shape[0], generator=g)
        y = gemm.Linear(256, w.shape[0], bias=False)
        y.onednn = True
        y.weight = torch.nn.Parameter(w.detach().clone())
        got = y(x)
        (got * dy).sum().backward()
        dx, dw = x.grad.clone(), y.weight.grad
        x.grad = None
        want = F.linear(x, w)
        (want * dy).sum().backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(dx, x.grad, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(dw, w.grad, rtol=1e-5, atol=1e-4)
        x.grad = None
    rows = 2 * seq - 2 * seq % gemm.ROWS  # through oneDNN: forward, dX and dW per weight, where large enough
    assert len(calls) == 3 * sum(rows * o * 256 >= gemm.MIN_MACS for o in (384, 96)) and calls[0][0][0] == rows


@needs_onednn
def test_the_heads_cross_entropy_through_onednn_equals_blas(calls):
    """The head's products through oneDNN: per chunk of rows (2048 and 52 here) the logits, then dh and dW in
    blocks of vocabulary rows (2 blocks of 2048 at H = 1024)."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2100, 1024, generator=g)
    w = torch.randn(4096, 1024, generator=g) * 0.05
    t = torch.randint(0, 4096, (2100,), generator=g)
    t[::7] = -100
    results = []
    for onednn in (False, True):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        (loss,) = linear_cross_entropies([(hh, t)], ww, onednn=onednn)
        loss.backward()
        results.append((loss, hh.grad, ww.grad))
    assert len(calls) == 2 * (1 + 2 + 2)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_onednn
def test_the_experts_products_through_onednn_equal_blas(calls):
    """Row blocks of 0, 5, 64, 100, 200 and 131 rows: oneDNN takes the multiples of ROWS (64, 64, 192, 128),
    BLAS the rest; the forward (x_j W_j^T), dX (dy_j W_j) and dW (dy_j^T x_j, zeros for the empty block) equal
    BLAS's grouped GEMM and float64 products."""
    g = torch.Generator().manual_seed(3)
    counts = [0, 5, 64, 100, 200, 131]
    E, K, N, T = len(counts), 256, 384, sum(counts)
    x, dy, w = torch.randn(T, K, generator=g), torch.randn(T, N, generator=g), torch.randn(E, N, K, generator=g)
    y, dx = gemm.grouped(x, w, counts, onednn=True), gemm.grouped(dy, w, counts, transposed=False, onednn=True)
    dw = gemm.grouped_wgrad(dy, x, counts, torch.full((E, N, K), float("nan")), onednn=True)
    assert sorted(c[0][0] for c in calls[:4]) == [64, 64, 128, 192]  # the forward's oneDNN rows
    assert len(calls) == 12
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    torch.testing.assert_close(y, F.grouped_mm(x, w.transpose(1, 2), offs=offs), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dx, F.grouped_mm(dy, w, offs=offs), rtol=1e-5, atol=1e-4)
    starts = [0, *offs.tolist()]
    for j in range(E):
        rows = slice(starts[j], starts[j + 1])
        torch.testing.assert_close(dw[j].double(), dy[rows].double().T @ x[rows].double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gemm.grouped(x, w, counts), y, rtol=1e-5, atol=1e-4)
    assert len(calls) == 12  # BLAS: no oneDNN product


def test_choose_resolves_the_setting(monkeypatch):
    """blas and onednn are taken as they are; auto takes oneDNN only at MARGIN times BLAS's measured rate."""
    measured = []
    for rates, want in [({"blas": 1e11, "onednn": 2.2e11}, "onednn"), ({"blas": 1e11, "onednn": 1.1e11}, "blas")]:
        monkeypatch.setattr(gemm, "rates", lambda r=rates, **_: measured.append(r) or r)
        assert gemm.choose("auto") == (want if gemm._ONEDNN is not None else "blas")
    assert gemm.choose("blas") == "blas"
    n = len(measured)
    if gemm._ONEDNN is not None:
        assert gemm.choose("onednn") == "onednn"
    assert len(measured) == n  # an explicit library is not measured
    with pytest.raises(ValueError, match="kernels.gemm='mkl' must be one of auto, blas, onednn"):
        gemm.choose("mkl")


@needs_onednn
def test_rates_measure_both_libraries():
    r = gemm.rates(sizes=(128,), repeats=1)
    assert set(r) == {"blas", "onednn"} and all(v > 0 for v in r.values())
