"""lse.attend's kernel table, and its CUDA glue run on CPU against stand-ins for the CUDA kernels.

No GPU here, so the real CUDA calls never run in this suite (bench/gpu_check.py runs them on a GPU).
What can be checked is everything around them: which kernel each (device, dtype, mask) gets, the
bias layout the efficient kernel demands, and that the kernels' return conventions (flash: lse
[B, h, Lq]; efficient: lse padded to a multiple of 32 rows, output a token-major view) are undone
correctly, by stand-ins that enforce the real kernels' documented input checks and return their
documented layouts. The whole grouped backend then runs through that glue against the oracle.
Tolerances as tests/test_attention.py: 1e-5 float32, 1e-2 bf16.
"""

import pytest
import torch
from _tiny import rel_err

from freeloc_dist.attention import lse
from freeloc_dist.attention.reference import reference_attention
from freeloc_dist.attention.sdpa import grouped_attention
from freeloc_dist.plan import layer_plan
from freeloc_dist.rope import TemporalRope

pytestmark = pytest.mark.unit

T_ROPE = TemporalRope(t_dim=4)


@pytest.fixture
def cuda_ok(monkeypatch):
    monkeypatch.setattr(lse, "_cuda_flash_ok", lambda index: True)


@pytest.mark.parametrize(
    "impl, device, dtype, masked, expected",
    [
        ("auto", "cpu", torch.float32, False, "cpu-flash"),
        ("auto", "cpu", torch.bfloat16, True, "cpu-flash"),
        ("auto", "cuda", torch.bfloat16, False, "cuda-flash"),
        ("auto", "cuda", torch.float16, False, "cuda-flash"),
        ("auto", "cuda", torch.bfloat16, True, "cuda-efficient"),
        ("auto", "cuda", torch.float32, False, "cuda-efficient"),
        ("auto", "cuda:1", torch.float32, True, "cuda-efficient"),
        ("auto", "cuda", torch.float64, False, "math"),
        ("auto", "meta", torch.bfloat16, False, "math"),
        ("flash", "cuda", torch.bfloat16, True, "cuda-efficient"),
        ("math", "cpu", torch.float32, False, "math"),
        ("math", "cuda", torch.bfloat16, False, "math"),
        ("auto", "cuda", None, False, "cuda-flash"),  # device-only question: fused, no score matrix
    ],
)
def test_kernel_table(impl, device, dtype, masked, expected, cuda_ok):
    assert lse.kernel_for(impl, device, dtype, masked) == expected


def test_kernel_table_pre_ampere_and_errors(monkeypatch):
    monkeypatch.setattr(lse, "_cuda_flash_ok", lambda index: False)
    assert lse.kernel_for("auto", "cuda", torch.bfloat16, False) == "cuda-efficient"
    assert lse.uses_flash("auto", "cuda") and lse.uses_flash("auto", "cpu") and not lse.uses_flash("math", "cpu")
    with pytest.raises(ValueError, match="no fused kernel"):
        lse.kernel_for("flash", "meta", torch.float32)
    with pytest.raises(ValueError, match="must be auto, flash or math"):
        lse.kernel_for("fast", "cpu")


@pytest.mark.parametrize("cols", [13, 32, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aligned_bias(cols, dtype):
    bias = torch.zeros(7, cols, dtype=dtype)
    bias[:, ::3] = float("-inf")
    out = lse.aligned_bias(bias, 2, 3)
    assert out.shape == (2, 3, 7, cols) and out.stride()[:2] == (0, 0) and out.stride(-1) == 1
    assert out.stride(-2) % 16 == 0
    assert torch.equal(out[1, 2], bias)
    if cols % 16 == 0:
        assert out.data_ptr() == bias.data_ptr()  # already aligned: no copy


def _check_qkv(q, k, v):
    for x in (q, k, v):
        assert x.stride(-1) == 1, "kernels need a contiguous last dimension"
        assert x.dtype == q.dtype
    assert q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape[2] == v.shape[2]


def fake_flash_cuda(calls):
    """aten._scaled_dot_product_flash_attention: half precision, no mask; 9 outputs, lse [B, h, Lq]."""

    def op(q, k, v, dropout_p, is_causal, return_debug_mask, *, scale=None):
        _check_qkv(q, k, v)
        assert q.dtype in (torch.float16, torch.bfloat16), "flash takes fp16/bf16 only"
        assert dropout_p == 0.0 and not is_causal and not return_debug_mask
        out, l = lse.attend_math(q, k, v, None, scale)
        calls.append("flash")
        return out, l, None, None, q.shape[2], k.shape[2], torch.empty(2), torch.empty(()), torch.empty(0)

    return op


def fake_efficient_cuda(calls):
    """aten._scaled_dot_product_efficient_attention: bias 4-D [B, h, Lq, Lk], q's dtype, keys
    contiguous, rows 16 bytes aligned; returns a token-major output view and lse padded to 32 rows
    (padding filled with junk, as the real buffer is uninitialised)."""

    def op(q, k, v, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *, scale=None):
        _check_qkv(q, k, v)
        assert compute_log_sumexp and dropout_p == 0.0 and not is_causal
        b, h, m, _ = q.shape
        bias2d = None
        if attn_bias is not None:
            assert attn_bias.dim() == 4 and tuple(attn_bias.shape) == (b, h, m, k.shape[2]), "Bias expected in BMHK"
            assert attn_bias.dtype == q.dtype and attn_bias.stride(-1) == 1
            assert attn_bias.stride(2) % (16 // q.element_size()) == 0, "attn_bias is not correctly aligned"
            bias2d = attn_bias[0, 0]
        out, l = lse.attend_math(q, k, v, bias2d, scale)
        padded = torch.full((b, h, -(-m // 32) * 32), 1e30)
        padded[..., :m] = l
        calls.append("efficient-bias" if attn_bias is not None else "efficient")
        return out.transpose(1, 2).contiguous().transpose(1, 2), padded, torch.empty(()), torch.empty(())

    return op


@pytest.fixture
def as_if_cuda(monkeypatch, cuda_ok):
    """attend picks kernels as on a CUDA device, and the CUDA ops are the stand-ins above."""
    calls = []
    monkeypatch.setattr(lse, "_FLASH_CUDA", fake_flash_cuda(calls))
    monkeypatch.setattr(lse, "_EFFICIENT_CUDA", fake_efficient_cuda(calls))
    real = lse.kernel_for
    monkeypatch.setattr(lse, "kernel_for", lambda impl, device, dtype=None, masked=False:
                        real(impl, "cuda", dtype, masked))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_through_cuda_glue(dtype, as_if_cuda):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 16, generator=g).to(dtype) for _ in range(3))
    bias = torch.zeros(37, 37, dtype=dtype).masked_fill(torch.rand(37, 37, generator=g) < 0.5, float("-inf"))
    bias.fill_diagonal_(0.0)
    for b in (None, bias):
        out, l = lse.attend(q, k, v, b)
        ref_out, ref_lse = lse.attend_math(q, k, v, b)
        assert l.shape == (2, 3, 37) and l.dtype == torch.float32
        assert torch.equal(l, ref_lse) and torch.equal(out, ref_out)
    expected = ["efficient", "efficient-bias"] if dtype == torch.float32 else ["flash", "efficient-bias"]
    assert as_if_cuda == expected


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("kind", ["vrpr", "tsa"])
def test_grouped_backend_through_cuda_glue(kind, dtype, tol, as_if_cuda):
    grid, trained = (19, 3, 4), 4
    tsa = {"dense_frames": 1, "stripe_frames": 3, "stripe_width": 3, "sink_frames": [0]}
    plan = layer_plan(kind, grid, trained, tsa=tsa if kind == "tsa" else None)
    g = torch.Generator().manual_seed(1)
    q0, k0, v = (torch.randn(2, 3, 19 * 12, 12, generator=g) for _ in range(3))
    frames = torch.arange(19).repeat_interleave(12)
    q_nat, k_nat = T_ROPE.rotate(q0, frames), T_ROPE.rotate(k0, frames)
    out, l = grouped_attention(*(x.to(dtype) for x in (q_nat, k_nat, q0, k0, v)), plan, T_ROPE)
    assert torch.isfinite(l).all()
    assert rel_err(out.float(), reference_attention(q0, k0, v, plan, T_ROPE)) < tol
    assert ("efficient-bias" in as_if_cuda) == (kind == "tsa")
