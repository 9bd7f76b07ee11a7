"""Each perturbation op against a direct computation written out here; the perturbed processor on real layers."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from pagkit.attention.ops import OPS, Blur, Dropout, Noise, Perturbation, Pool, RandomMask, Soft, make_perturbation
from pagkit.interventions.attention import FastProcessor, perturbed_self_attention
from pagkit.interventions.rows import BatchLayoutError, CallRows, marked

B, H, GRID, D = 2, 3, 4, 5
N = GRID * GRID
SCALE = D**-0.5


def qkv(seed: int = 0, d: int = D) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(2 * torch.randn(B, H, N, d, generator=g) for _ in range(3))  # type: ignore[return-value]


def attention_map(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    logits = torch.einsum("bhnd,bhmd->bhnm", q, k) * SCALE
    e = (logits - logits.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


def plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return attention_map(q, k) @ v


def the_map(op: Perturbation, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The op's attention map itself: attend to one-hot values (``v = I``)."""
    eye = torch.eye(N).expand(B, H, N, N)
    return op.attend(q, k, eye, SCALE, (GRID, GRID))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_ops_registry() -> None:
    assert set(OPS) == {"identity", "soft", "mask", "dropout", "blur", "pool", "noise"}
    for name, cls in OPS.items():
        assert cls().name == name
    assert [n for n, cls in OPS.items() if not cls().needs_qk] == ["identity"]


def test_identity_returns_v_without_q_or_k() -> None:
    _, _, v = qkv()
    op = make_perturbation("identity")
    assert op.attend(None, None, v, SCALE) is v


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_soft_is_lerp_of_attention_and_v(alpha: float) -> None:
    q, k, v = qkv()
    expected = (1 - alpha) * plain(q, k, v) + alpha * v
    close(Soft(alpha=alpha).attend(q, k, v, SCALE), expected)


def test_mask_p0_is_plain_attention_p1_is_identity() -> None:
    q, k, v = qkv()
    close(RandomMask(p=0.0).attend(q, k, v, SCALE), plain(q, k, v))
    close(RandomMask(p=1.0).attend(q, k, v, SCALE), v)


@pytest.mark.parametrize("p", [0.4, 0.999])
def test_mask_matches_direct_masked_softmax_and_keeps_diagonal(p: float) -> None:
    q, k, v = qkv()
    op = RandomMask(p=p, seed=7)
    out = op.attend(q, k, v, SCALE)
    # the same draw, from the op's documented seed
    drop = torch.rand((B, H, N, N), generator=torch.Generator().manual_seed(7)) < p
    drop &= ~torch.eye(N, dtype=torch.bool)
    logits = torch.einsum("bhnd,bhmd->bhnm", q, k) * SCALE
    expected = logits.masked_fill(drop, -math.inf).softmax(-1) @ v
    close(out, expected)
    p_map = the_map(RandomMask(p=p, seed=7), q, k)
    assert (torch.diagonal(p_map, dim1=-2, dim2=-1) > 0).all()
    assert torch.isfinite(p_map).all()
    close(p_map.sum(-1), torch.ones(B, H, N))


def test_dropout_p0_is_plain_attention() -> None:
    q, k, v = qkv()
    close(Dropout(p=0.0).attend(q, k, v, SCALE), plain(q, k, v))


def test_dropout_matches_direct_computation() -> None:
    q, k, v = qkv()
    out = Dropout(p=0.3, seed=3).attend(q, k, v, SCALE)
    keep = torch.rand((B, H, N, N), generator=torch.Generator().manual_seed(3)) >= 0.3
    close(out, (attention_map(q, k) * keep / 0.7) @ v)


def _reflect(i: int, n: int) -> int:
    return -i if i < 0 else (2 * (n - 1) - i if i > n - 1 else i)


def blur_reference(p: torch.Tensor, sigma: float) -> torch.Tensor:
    """Each query's map over the key grid, blurred by an explicit 2-D Gaussian sum (reflect borders)."""
    r = max(1, math.ceil(3 * sigma))
    w = [math.exp(-0.5 * (x / sigma) ** 2) for x in range(-r, r + 1)]
    w = [x / sum(w) for x in w]
    maps = p.reshape(B, H, N, GRID, GRID)
    out = torch.zeros_like(maps)
    for i in range(GRID):
        for j in range(GRID):
            for a in range(-r, r + 1):
                for b in range(-r, r + 1):
                    out[..., i, j] += w[a + r] * w[b + r] * maps[..., _reflect(i + a, GRID), _reflect(j + b, GRID)]
    out = out.reshape(B, H, N, N)
    return out / out.sum(-1, keepdim=True)


def test_blur_matches_direct_computation_and_rows_sum_to_one() -> None:
    q, k, v = qkv()
    op = Blur(sigma=0.7)
    expected_map = blur_reference(attention_map(q, k), 0.7)
    close(the_map(op, q, k), expected_map)
    close(the_map(op, q, k).sum(-1), torch.ones(B, H, N))
    close(op.attend(q, k, v, SCALE, (GRID, GRID)), expected_map @ v)
    assert (the_map(op, q, k) - attention_map(q, k)).abs().max() > 1e-3  # it did blur


def test_blur_with_tiny_sigma_is_plain_attention() -> None:
    q, k, v = qkv()
    close(Blur(sigma=1e-3).attend(q, k, v, SCALE, (GRID, GRID)), plain(q, k, v))
    close(Blur(sigma=1e-3).attend(q, k, v, SCALE), plain(q, k, v))  # square grid inferred from N


def test_pool_kernel_1_is_plain_attention() -> None:
    q, k, v = qkv()
    close(Pool(kernel=1).attend(q, k, v, SCALE, (GRID, GRID)), plain(q, k, v))


def test_pool_matches_direct_window_mean() -> None:
    q, k, v = qkv()
    maps = attention_map(q, k).reshape(B, H, N, GRID, GRID)
    pooled = torch.zeros_like(maps)
    for i in range(GRID):
        for j in range(GRID):  # mean over the in-grid part of the 3x3 window
            pooled[..., i, j] = maps[..., max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2].mean((-1, -2))
    pooled = pooled.reshape(B, H, N, N)
    pooled = pooled / pooled.sum(-1, keepdim=True)
    close(Pool(kernel=3).attend(q, k, v, SCALE, (GRID, GRID)), pooled @ v)


def test_noise_sigma_0_is_plain_attention_and_matches_direct_computation() -> None:
    q, k, v = qkv()
    close(Noise(sigma=0.0).attend(q, k, v, SCALE), plain(q, k, v))
    out = Noise(sigma=0.8, seed=5).attend(q, k, v, SCALE)
    logits = torch.einsum("bhnd,bhmd->bhnm", q, k) * SCALE
    logits = logits + 0.8 * torch.randn((B, H, N, N), generator=torch.Generator().manual_seed(5))
    close(out, logits.softmax(-1) @ v)


@pytest.mark.parametrize("spec", ["mask:0.5", "dropout:0.5", "noise:1.0"])
def test_random_ops_are_reproducible(spec: str) -> None:
    q, k, v = qkv()
    a, b = make_perturbation(spec), make_perturbation(spec)
    assert torch.equal(a.attend(q, k, v, SCALE), b.attend(q, k, v, SCALE))


def test_grid_ops_need_a_grid() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 8, 4, generator=g) for _ in range(3))
    with pytest.raises(ValueError, match="square token grid"):
        Blur().attend(q, k, v, 0.5)
    out = Pool(kernel=1).attend(q, k, v, 0.5, (2, 4))  # an explicit 2x4 grid works
    close(out, (q @ k.transpose(-1, -2) * 0.5).softmax(-1) @ v)


# -- make_perturbation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "cls", "field", "value"),
    [
        ("soft:0.7", Soft, "alpha", 0.7),
        ("mask:0.25", RandomMask, "p", 0.25),
        ("dropout:0.1", Dropout, "p", 0.1),
        ("blur:2", Blur, "sigma", 2.0),
        ("pool:5", Pool, "kernel", 5),
        ("noise:0.5", Noise, "sigma", 0.5),
    ],
)
def test_make_perturbation_parses_parameters(spec: str, cls: type, field: str, value: float) -> None:
    op = make_perturbation(spec)
    assert type(op) is cls and getattr(op, field) == value
    assert type(make_perturbation(spec.split(":")[0])) is cls


def test_make_perturbation_passes_ops_through() -> None:
    op = Soft(alpha=0.2)
    assert make_perturbation(op) is op


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("gaussian", "unknown perturbation"),
        ("", "unknown perturbation"),
        ("Identity", "unknown perturbation"),
        ("identity:1", "takes no parameter"),
        ("dropout:abc", "expected a number"),
        ("pool:2.5", "expected a number"),
        ("soft:nan", "finite"),
        ("blur:inf", "finite"),
        ("dropout:1", r"in \[0, 1\)"),
        ("mask:1.5", r"in \[0, 1\]"),
        ("soft:-0.1", r"in \[0, 1\]"),
        ("blur:0", "positive"),
        ("pool:2", "odd"),
        ("pool:0", "odd"),
        ("noise:-1", "non-negative"),
    ],
)
def test_make_perturbation_errors(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_perturbation(spec)


# -- perturbed_self_attention on diffusers layers ---------------------------------------------------------------


class Forbidden(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("PAG's identity perturbation must not compute Q or K")


def group_norm_attention() -> Attention:
    torch.manual_seed(0)
    attn = Attention(
        query_dim=16,
        heads=2,
        dim_head=8,
        norm_num_groups=4,
        residual_connection=True,
        rescale_output_factor=2.0,
        bias=True,
        processor=AttnProcessor2_0(),
    )
    with torch.no_grad():  # non-trivial group-norm affine parameters
        attn.group_norm.weight.uniform_(0.5, 1.5)
        attn.group_norm.bias.uniform_(-0.5, 0.5)
    return attn.eval()


def test_identity_equals_to_out_of_to_v_with_group_norm_and_residual() -> None:
    attn = group_norm_attention()
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = x.flatten(2).transpose(1, 2)  # [B, N, C]
        normed = nn.functional.group_norm(
            tokens.transpose(1, 2), 4, attn.group_norm.weight, attn.group_norm.bias, attn.group_norm.eps
        ).transpose(1, 2)
        expected = attn.to_out[0](attn.to_v(normed)).transpose(1, 2).reshape(x.shape)
        expected = (expected + x) / 2.0
        attn.to_q, attn.to_k = Forbidden(), Forbidden()
        out = perturbed_self_attention(attn, x, make_perturbation("identity"))
    close(out, expected)


def test_identity_on_token_input_without_norms() -> None:
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=4, dim_head=4).eval()
    x = torch.randn(3, 9, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = attn.to_out[0](attn.to_v(x))
        attn.to_q, attn.to_k = Forbidden(), Forbidden()
        close(perturbed_self_attention(attn, x, make_perturbation("identity")), expected)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_soft_on_a_layer_with_qk_norm(alpha: float) -> None:
    """An ablation op sees Q and K after the layer's qk-norms; alpha 0 reproduces the layer itself."""
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, qk_norm="layer_norm", processor=AttnProcessor2_0()).eval()
    x = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        q = attn.norm_q(attn.to_q(x).unflatten(-1, (2, 8)).transpose(1, 2))
        k = attn.norm_k(attn.to_k(x).unflatten(-1, (2, 8)).transpose(1, 2))
        v = attn.to_v(x).unflatten(-1, (2, 8)).transpose(1, 2)
        mixed = (1 - alpha) * (torch.softmax(q @ k.transpose(-1, -2) * 8**-0.5, -1) @ v) + alpha * v
        expected = attn.to_out[0](mixed.transpose(1, 2).flatten(2))
        out = perturbed_self_attention(attn, x, Soft(alpha=alpha))
        close(out, expected)
        if alpha == 0.0:
            close(out, attn(x))


@pytest.mark.parametrize("rows", [[False, True, False, True], [False, False, True, True], [True, True, True, True]])
def test_processor_runs_original_on_unmarked_rows_and_op_on_marked_rows(rows: list[bool]) -> None:
    attn = group_norm_attention()
    x = torch.randn(4, 16, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain_out = attn(x)
        ptb_out = perturbed_self_attention(attn, x, make_perturbation("identity"))
        attn.set_processor(FastProcessor(attn.processor, make_perturbation("identity"), 0, "attn", joint=False))
        mask = torch.tensor(rows)
        with marked(CallRows(4, {0: mask})):
            out = attn(x)
        assert torch.equal(attn(x), plain_out)  # no rows declared: the original processor, untouched
    close(out[mask], ptb_out[mask])
    close(out[~mask], plain_out[~mask])


def test_processor_rejects_a_batch_that_does_not_match_the_plan() -> None:
    attn = group_norm_attention()
    attn.set_processor(FastProcessor(attn.processor, make_perturbation("identity"), 0, "attn", joint=False))
    with marked(CallRows(3, {0: torch.tensor([False, True, True])})), pytest.raises(BatchLayoutError, match="2 rows"):
        attn(torch.randn(2, 16, 4, 4))
    with pytest.raises(TypeError, match="bool"), marked(CallRows(2, {0: torch.tensor([0, 1])})):
        pass
