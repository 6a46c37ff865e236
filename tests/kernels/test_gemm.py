"""model/gemm.py: oneDNN's products equal BLAS's in every orientation `addmm` picks, `linear`'s forward and
backward equal F.linear's, small or non-training products stay on BLAS, and the library choice follows
$NANOSEEK_CPU_GEMM or the measured rates."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.model import gemm
from nanoseek.model.cross_entropy import linear_cross_entropy

needs_onednn = pytest.mark.skipif(gemm.onednn_product() is None, reason="this torch has no oneDNN")


@pytest.fixture
def library(monkeypatch):
    """Set the library `addmm` uses; count the oneDNN products."""
    calls = []
    real = gemm._ONEDNN

    def counted(x, w):
        calls.append((tuple(x.shape), tuple(w.shape)))
        return real(x, w)
    monkeypatch.setattr(gemm, "_ONEDNN", counted)

    def use(onednn: bool):
        monkeypatch.setattr(gemm, "_FASTER", onednn)
        return calls
    return use


def operand(rows, cols, transposed, g):
    """A (rows, cols) fp32 matrix, row-major or the transpose of a row-major one."""
    return torch.randn(cols, rows, generator=g).T if transposed else torch.randn(rows, cols, generator=g)


@needs_onednn
@pytest.mark.parametrize("M,K,N", [(384, 96, 256), (160, 512, 96)])  # N < M and N >= M, each >= MIN_MACS
@pytest.mark.parametrize("a_t,b_t", [(False, False), (False, True), (True, False), (True, True)])
def test_addmm_equals_blas_in_every_orientation(library, M, K, N, a_t, b_t):
    g = torch.Generator().manual_seed(0)
    a, b = operand(M, K, a_t, g), operand(K, N, b_t, g)
    ref = a.double() @ b.double()
    calls = library(True)
    for beta, alpha in [(0, 1.0), (1, 1.4426950408889634)]:
        out = torch.randn(M, N, generator=g)
        want = beta * out.double() + alpha * ref
        got = gemm.addmm(out, a, b, beta=beta, alpha=alpha)
        assert got is out and got.is_contiguous()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    new = gemm.addmm(None, a, b)
    assert new.is_contiguous() and new.shape == (M, N)
    torch.testing.assert_close(new.double(), ref, rtol=1e-5, atol=1e-4)
    assert len(calls) == 3
    # the orientation: X row-major where a or b^T is, else the larger of M, N as W
    x_rows = M if (not a_t or b_t and N >= M) else N
    assert {c[0][0] for c in calls} == {x_rows}


@needs_onednn
def test_small_products_and_other_dtypes_stay_on_blas(library):
    calls = library(True)
    a, b = torch.randn(64, 64), torch.randn(64, 64)  # 64^3 < MIN_MACS
    torch.testing.assert_close(gemm.addmm(None, a, b), a @ b)
    w = torch.randn(128, 256, requires_grad=True)
    x = torch.randn(4, 64, 256, requires_grad=True)
    gemm.linear(x.double(), w.double())  # fp64
    with torch.no_grad():
        gemm.linear(x, w)  # no training
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm.linear(x, w).dtype == torch.bfloat16  # autocast keeps its dtype
    assert not calls
    library(False)
    gemm.linear(x, w).sum().backward()  # BLAS chosen: nothing through oneDNN
    assert not calls


@needs_onednn
@pytest.mark.parametrize("seq", [96, 75])  # 192 rows: one oneDNN product; 150: 128 rows oneDNN, 22 BLAS
def test_linear_forward_and_backward_equal_f_linear(library, seq):
    calls = library(True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, seq, 256, generator=g, requires_grad=True)
    for w in (torch.randn(384, 256, generator=g), torch.randn(96, 256, generator=g)):  # O > I and O < I
        w.requires_grad_(True)
        dy = torch.randn(2, seq, w.shape[0], generator=g)
        y = gemm.Linear(256, w.shape[0], bias=False)
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
def test_the_heads_cross_entropy_through_onednn_equals_blas(library):
    """The head's products through oneDNN: per chunk of rows (2048 and 52 here) the logits, then dh and dW in
    blocks of vocabulary rows (2 blocks of 2048 at H = 1024)."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2100, 1024, generator=g)
    w = torch.randn(4096, 1024, generator=g) * 0.05
    t = torch.randint(0, 4096, (2100,), generator=g)
    t[::7] = -100
    results = []
    for onednn in (False, True):
        calls = library(onednn)
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = linear_cross_entropy(hh, ww, t)
        loss.backward()
        results.append((loss, hh.grad, ww.grad))
    assert len(calls) == 2 * (1 + 2 + 2)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_onednn
def test_the_experts_products_through_onednn_equal_blas(library):
    """Row blocks of 0, 5, 64, 100, 200 and 131 rows: oneDNN takes the multiples of ROWS (64, 64, 192, 128),
    BLAS the rest; the forward (x_j W_j^T), dX (dy_j W_j) and dW (dy_j^T x_j, zeros for the empty block) equal
    BLAS's grouped GEMM and float64 products."""
    g = torch.Generator().manual_seed(3)
    counts = [0, 5, 64, 100, 200, 131]
    E, K, N, T = len(counts), 256, 384, sum(counts)
    x, dy, w = torch.randn(T, K, generator=g), torch.randn(T, N, generator=g), torch.randn(E, N, K, generator=g)
    calls = library(True)
    y, dx = gemm.grouped(x, w, counts), gemm.grouped(dy, w, counts, transposed=False)
    dw = gemm.grouped_wgrad(dy, x, counts, torch.full((E, N, K), float("nan")))
    assert sorted(c[0][0] for c in calls[:4]) == [64, 64, 128, 192]  # the forward's oneDNN rows
    assert len(calls) == 12
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    torch.testing.assert_close(y, F.grouped_mm(x, w.transpose(1, 2), offs=offs), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dx, F.grouped_mm(dy, w, offs=offs), rtol=1e-5, atol=1e-4)
    starts = [0, *offs.tolist()]
    for j in range(E):
        rows = slice(starts[j], starts[j + 1])
        torch.testing.assert_close(dw[j].double(), dy[rows].double().T @ x[rows].double(), rtol=1e-5, atol=1e-4)
    library(False)
    torch.testing.assert_close(gemm.grouped(x, w, counts), y, rtol=1e-5, atol=1e-4)
    assert len(calls) == 12  # BLAS: no oneDNN product


def test_the_choice_follows_the_environment_and_the_rates(monkeypatch):
    monkeypatch.setattr(gemm, "keep_freed_memory", lambda: True)
    for env, rates, want in [("blas", None, False), ("onednn", None, gemm._ONEDNN is not None),
                             ("auto", {"blas": 1e11, "onednn": 2.2e11}, gemm._ONEDNN is not None),
                             ("auto", {"blas": 1e11, "onednn": 1.1e11}, False)]:
        monkeypatch.setenv("NANOSEEK_CPU_GEMM", env)
        monkeypatch.setattr(gemm, "_FASTER", None)
        monkeypatch.setattr(gemm, "rates", lambda r=rates, **_: r)
        assert gemm.onednn_faster() is want
    monkeypatch.setenv("NANOSEEK_CPU_GEMM", "mkl")
    monkeypatch.setattr(gemm, "_FASTER", None)
    with pytest.raises(ValueError, match="NANOSEEK_CPU_GEMM='mkl' is not one of auto, blas, onednn"):
        gemm.onednn_faster()


@needs_onednn
def test_rates_measure_both_libraries():
    r = gemm.rates(sizes=(128,), repeats=1)
    assert set(r) == {"blas", "onednn"} and all(v > 0 for v in r.values())
