"""The layer-spec parser selects exactly what the user named (property tests over model trees).

diffusers selects PAG layers by ``re.search``: ``"blocks.1"`` also hits ``blocks.10``-``19`` (diffusers #13594).
pagkit matches whole dotted components, fullmatches ``re:`` patterns, and fails loudly when nothing matches.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from diffusers.models.attention_processor import Attention
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import pagkit
from pagkit.layers import LayerSpecError, attention_layers, list_layers, select_layers
from tiny import tiny_pixart, tiny_sd3_transformer, tiny_unet2d_condition

N_BLOCKS = 23  # blocks 1 and 2 have namesakes 10-19 and 20-22


class Block(nn.Module):
    """A DiT block: self-attention ``attn1`` and cross-attention ``attn2``."""

    def __init__(self) -> None:
        super().__init__()
        self.attn1 = Attention(query_dim=8, heads=1, dim_head=8)
        self.attn2 = Attention(query_dim=8, cross_attention_dim=4, heads=1, dim_head=8)


class Transformer(nn.Module):
    """A U-Net's attention module: ``transformer_blocks.K``."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList(Block() for _ in range(depth))


class UNetBlock(nn.Module):
    def __init__(self, n_attentions: int, depth: int = 1) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(nn.Linear(2, 2) for _ in range(max(n_attentions, 1)))
        self.attentions = nn.ModuleList(Transformer(depth) for _ in range(n_attentions))


class FakeDiT(nn.Module):
    def __init__(self, n: int = N_BLOCKS) -> None:
        super().__init__()
        self.pos_embed = nn.Linear(2, 2)
        self.transformer_blocks = nn.ModuleList(Block() for _ in range(n))


class FakeUNet(nn.Module):
    """A U-Net-shaped tree: down blocks 0-2 (block 0 without attention), mid block, up blocks 0-2."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(block_out_channels=(8, 16, 32), sample_size=16)
        self.down_blocks = nn.ModuleList([UNetBlock(0), UNetBlock(2), UNetBlock(2, depth=2)])
        self.mid_block = UNetBlock(1, depth=2)
        self.up_blocks = nn.ModuleList([UNetBlock(3, depth=2), UNetBlock(3), UNetBlock(0)])


DIT = FakeDiT()
UNET = FakeUNet()
MODELS = [DIT, UNET]


def names(model: nn.Module, spec: object) -> list[str]:
    return [layer.name for layer in select_layers(model, spec)]  # type: ignore[arg-type]


def self_names(model: nn.Module) -> list[str]:
    return [layer.name for layer in list_layers(model)]


def beneath(model: nn.Module, path: str) -> list[str]:
    return [n for n in self_names(model) if n == path or n.startswith(path + ".")]


def test_kinds_of_the_fake_trees() -> None:
    kinds = {layer.name: layer.kind for layer in attention_layers(DIT)}
    assert kinds["transformer_blocks.1.attn1"] == "self" and kinds["transformer_blocks.1.attn2"] == "cross"
    assert len(self_names(DIT)) == N_BLOCKS
    assert all(n.endswith("attn1") for n in self_names(UNET))


@given(st.integers(0, N_BLOCKS - 1))
@settings(max_examples=40, deadline=None)
def test_blocks_i_selects_that_block_only(i: int) -> None:
    expected = [f"transformer_blocks.{i}.attn1"]
    assert names(DIT, f"blocks.{i}") == expected
    assert names(DIT, f"transformer_blocks.{i}") == expected
    assert names(DIT, [f"transformer_blocks.{i}.attn1"]) == expected


def test_blocks_1_is_not_blocks_10_to_19_in_a_real_dit() -> None:
    pixart = tiny_pixart(num_layers=12, num_attention_heads=1, attention_head_dim=4)
    assert names(pixart, "blocks.1") == ["transformer_blocks.1.attn1"]
    assert names(pixart, "transformer_blocks.1") == ["transformer_blocks.1.attn1"]
    # what a regex search (diffusers' selector) would have picked
    searched = [n for n in self_names(pixart) if re.search("blocks.1", n)]
    assert len(searched) == 3  # blocks 1, 10, 11


@given(st.sampled_from([(m, n) for m in MODELS for n in self_names(m)]))
@settings(max_examples=60, deadline=None)
def test_exact_path_selects_exactly_that_layer(case: tuple[nn.Module, str]) -> None:
    model, name = case
    assert names(model, name) == [name]


def _module_paths(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


@given(st.sampled_from([(m, p) for m in MODELS for p in _module_paths(m)]))
@settings(max_examples=120, deadline=None)
def test_block_path_selects_self_attention_beneath_on_whole_components(case: tuple[nn.Module, str]) -> None:
    model, path = case
    expected = beneath(model, path)
    if expected:
        assert names(model, path) == expected
    else:  # a resnet, a cross-attention layer, a block without self-attention: loud
        with pytest.raises(LayerSpecError, match="Valid self-attention layers"):
            select_layers(model, path)


@given(st.sampled_from([(m, p) for m in MODELS for p in _module_paths(m)]), st.integers(1, 6))
@example((UNET, "mid_block"), 6)  # "mid": a preset, skipped
@example((DIT, "transformer_blocks.12.attn1"), 1)
@settings(max_examples=80, deadline=None)
def test_truncated_component_matches_nothing(case: tuple[nn.Module, str], cut: int) -> None:
    """A path cut inside a component (``transformer_blocks.1`` -> ``transformer_bl``) names no module."""
    model, path = case
    prefix = path[:-cut]
    preset = re.fullmatch(r"mid|all|blocks\.\d+|(down|up)\.\d+(\.\d+)?", prefix)
    if not prefix or prefix.endswith(".") or prefix in _module_paths(model) or preset:
        return
    with pytest.raises(LayerSpecError):
        select_layers(model, prefix)


@given(st.lists(st.sampled_from(self_names(UNET)), min_size=1, max_size=6))
@settings(max_examples=40, deadline=None)
def test_lists_union_in_model_order_without_duplicates(items: list[str]) -> None:
    order = self_names(UNET)
    expected = sorted(set(items), key=order.index)
    assert names(UNET, items) == expected
    assert names(UNET, ", ".join(items)) == expected


@pytest.mark.parametrize(
    ("spec", "block"),
    [
        ("mid", "mid_block"),
        ("down.1", "down_blocks.1"),
        ("down.2", "down_blocks.2"),
        ("up.0", "up_blocks.0"),
        ("down.1.1", "down_blocks.1.attentions.1"),
        ("up.0.2", "up_blocks.0.attentions.2"),
        ("up.1.0", "up_blocks.1.attentions.0"),
        ("paper:sd15", "mid_block"),
        ("paper:sdxl", "mid_block"),
    ],
)
def test_unet_presets(spec: str, block: str) -> None:
    assert names(UNET, spec) == beneath(UNET, block)
    assert names(UNET, spec)


def test_paper_adm_is_lowest_resolution_down_block_and_mid() -> None:
    assert names(UNET, "paper:adm") == beneath(UNET, "down_blocks.2") + beneath(UNET, "mid_block")


def test_all_selects_every_self_attention_layer() -> None:
    assert names(UNET, "all") == self_names(UNET)
    assert names(DIT, "all") == self_names(DIT)


def test_dit_paper_presets() -> None:
    assert names(DIT, "paper:pixart") == ["transformer_blocks.14.attn1"]
    assert names(DIT, "paper:sd3") == ["transformer_blocks.13.attn1"]
    sd3 = tiny_sd3_transformer(num_layers=14, num_attention_heads=1, attention_head_dim=4)
    assert [(layer.name, layer.kind) for layer in select_layers(sd3, "paper:sd3")] == [
        ("transformer_blocks.13.attn", "joint")
    ]
    with pytest.raises(LayerSpecError, match="matches no self-attention layer"):
        select_layers(FakeDiT(8), "paper:pixart")  # a DiT too shallow for the paper's block


def test_unet_presets_on_a_real_unet() -> None:
    unet = tiny_unet2d_condition()
    assert names(unet, "mid") == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert names(unet, "up.1.1") == ["up_blocks.1.attentions.1.transformer_blocks.0.attn1"]
    assert names(unet, "down.0") == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1"]


@pytest.mark.parametrize("bad", ["paper:sd2", "paper:"])
def test_unknown_paper_preset(bad: str) -> None:
    with pytest.raises(LayerSpecError, match="paper:sd15"):
        select_layers(UNET, bad)


@given(
    st.sampled_from(self_names(DIT) + self_names(UNET)),
    st.sampled_from(["{}", "{}.*", ".*{}", r"{}\d*", "(?:{})?x"]),
    st.integers(0, 4),
)
@settings(max_examples=80, deadline=None)
def test_regex_is_fullmatch(name: str, template: str, cut: int) -> None:
    piece = re.escape(name.split(".", cut)[-1])
    pattern = template.format(piece)
    for model in MODELS:
        expected = [n for n in self_names(model) if re.fullmatch(pattern, n)]
        if expected:
            assert names(model, "re:" + pattern) == expected
        else:
            with pytest.raises(LayerSpecError, match="Valid self-attention layers"):
                select_layers(model, "re:" + pattern)


def test_regex_is_not_search() -> None:
    with pytest.raises(LayerSpecError):
        select_layers(DIT, r"re:blocks\.1")  # re.search would find it in every transformer_blocks.1x name
    assert names(DIT, r"re:transformer_blocks\.1\d\.attn1") == [f"transformer_blocks.{i}.attn1" for i in range(10, 20)]
    with pytest.raises(LayerSpecError, match="bad regular expression"):
        select_layers(DIT, "re:blocks.(")


@pytest.mark.parametrize(
    "spec", ["transformer_blocks.3.attn2", "down_blocks.1.attentions.0.transformer_blocks.0.attn2"]
)
def test_cross_attention_layer_is_refused(spec: str) -> None:
    model = DIT if spec.startswith("transformer") else UNET
    with pytest.raises(LayerSpecError, match="cross-attention") as info:
        select_layers(model, spec)
    assert self_names(model)[0] in str(info.value)


@pytest.mark.parametrize("spec", ["nothing", "blocks.99", "mid_blocks", "down.0", "up.2", "down_blocks.1.attentions.5"])
def test_spec_matching_nothing_lists_valid_layers(spec: str) -> None:
    with pytest.raises(LayerSpecError) as info:
        select_layers(UNET, spec)
    message = str(info.value)
    assert "matches no self-attention layer" in message
    assert all(n in message for n in self_names(UNET))


def test_long_valid_list_is_truncated() -> None:
    with pytest.raises(LayerSpecError, match=r"\.\.\. and \d+ more"):
        select_layers(FakeDiT(50), "nothing")


@pytest.mark.parametrize("spec", ["", "   ", ",", " , ,", []])
def test_empty_spec_raises(spec: object) -> None:
    with pytest.raises(LayerSpecError, match="empty layer spec"):
        select_layers(UNET, spec)  # type: ignore[arg-type]


def test_layer_spec_error_is_a_value_error_and_exported() -> None:
    assert issubclass(pagkit.LayerSpecError, ValueError)
    assert pagkit.LayerSpecError is LayerSpecError


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("ltx", {"transformer_blocks.0.attn1": "self", "transformer_blocks.0.attn2": "cross"}),
        ("mochi", {"transformer_blocks.0.attn1": "joint"}),
        ("flux", {"transformer_blocks.0.attn": "joint", "single_transformer_blocks.0.attn": "single"}),
        ("cogvideox", {"transformer_blocks.0.attn1": "joint"}),
        ("hunyuanvideo", {"transformer_blocks.0.attn": "joint", "single_transformer_blocks.0.attn": "single"}),
        ("auraflow", {"joint_transformer_blocks.0.attn": "joint", "single_transformer_blocks.0.attn": "single"}),
        ("lumina2", {"noise_refiner.0.attn": "self", "layers.0.attn": "single", "context_refiner.0.attn": "text"}),
        ("wan", {"blocks.0.attn1": "self", "blocks.0.attn2": "cross"}),
        ("sd35", {"transformer_blocks.0.attn": "joint", "transformer_blocks.0.attn2": "self"}),
    ],
)
def test_layer_kinds_of_modern_families(family: str, expected: dict[str, str]) -> None:
    """list_layers classifies each family's attention: self, cross, joint (own text projections or a processor
    that joins the streams), single (one stream of text and image tokens) or text (prompt-only refiners)."""
    from pagkit.layers import attention_layers
    from pagkit.testing import families

    fam = families.get(family)
    model = getattr(fam.build(), fam.denoiser)
    kinds = {layer.name: layer.kind for layer in attention_layers(model)}
    for name, kind in expected.items():
        assert kinds[name] == kind, (name, kinds[name])
    listed = {layer.name for layer in list_layers(model)}
    assert all((kinds[n] in ("self", "joint", "single")) == (n in listed) for n in kinds)


def test_kandinsky3_self_attention_is_listed() -> None:
    from pagkit.testing import families

    fam = families.get("kandinsky3")
    model = getattr(fam.build(), fam.denoiser)
    assert [layer for layer in list_layers(model) if layer.kind == "self"]
