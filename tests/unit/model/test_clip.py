import json
import math

import pydantic
import pytest
import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from growclip_stream.model import ArchConfig, ByteTokenizer, ClipLoss, ClipOutput, GrowCLIP, TowerConfig
from growclip_stream.model.clip import same_caption


def small_arch(shared_depth: int = 1, **kw: int) -> ArchConfig:
    return ArchConfig(
        image=TowerConfig(16, 2, 32, head_dim=8),
        text=TowerConfig(32, 1, 48, head_dim=8),
        shared=TowerConfig(24, shared_depth, 40, head_dim=8),
        **{"embed_dim": 8, "image_size": 8, "patch_size": 4, "context_length": 8, **kw},
    )


ARCHS = [
    small_arch(0),
    small_arch(1),
    small_arch(2, channels=3, image_size=12, patch_size=3, embed_dim=16, context_length=12),
    ArchConfig(TowerConfig(32, 1, 64), TowerConfig(32, 2, 64), TowerConfig(64, 1, 128)),  # defaults
]


def batch(arch: ArchConfig, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(n, arch.channels, arch.image_size, arch.image_size)
    tokens = ByteTokenizer(arch.context_length).encode(["a cat", "", "a long caption " * 5, "dog"][:n])
    return images, tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_num_params_matches_built_model(arch: ArchConfig) -> None:
    model = GrowCLIP(arch)
    assert arch.num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHS[:3])
def test_flops_match_a_flop_counter(arch: ArchConfig) -> None:
    # The math SDPA backend decomposes attention into matmuls, which the counter sees.
    images, tokens = batch(arch, 1)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        GrowCLIP(arch)(images, tokens)
    assert counter.get_total_flops() == arch.flops_per_sample()


def test_forward_shapes_and_normalisation() -> None:
    arch = small_arch(1)
    model = GrowCLIP(arch)
    images, tokens = batch(arch)
    out = model(images, tokens)
    assert out.image_embeds.shape == out.text_embeds.shape == (4, arch.embed_dim)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(4))
    assert out.logit_scale.dim() == 0
    assert math.isclose(out.logit_scale.item(), 1 / 0.07, rel_tol=1e-5)
    loss = ClipLoss()(out)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert math.isclose(model(images, tokens).logit_scale.item(), 100.0, rel_tol=1e-6)


def test_text_pools_at_eos_with_causal_attention() -> None:
    arch = small_arch(1)
    model = GrowCLIP(arch)
    tokens = ByteTokenizer(arch.context_length).encode(["ab", "ab"])
    tokens[1, 4:] = torch.tensor([5, 6, 7, 8])  # after EOS (position 3): must not matter
    emb = model.encode_text(tokens)
    torch.testing.assert_close(emb[0], emb[1])
    other = model.encode_text(ByteTokenizer(arch.context_length).encode(["ac"]))
    assert (other[0] - emb[0]).abs().max() > 1e-4  # ... while the caption itself does


def test_clip_loss_prefers_matching_pairs() -> None:
    e = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    matched = ClipLoss()(ClipOutput(e, e, scale))
    shuffled = ClipLoss()(ClipOutput(e, e.roll(1, 0), scale))
    assert matched < shuffled


def test_bad_inputs_raise() -> None:
    arch = small_arch(1)
    model = GrowCLIP(arch)
    with pytest.raises(ValueError, match="images"):
        model.encode_image(torch.randn(2, 1, 9, 9))
    with pytest.raises(ValueError, match="tokens"):
        model.encode_text(torch.zeros(2, arch.context_length + 1, dtype=torch.int64))


def test_arch_dict_round_trip() -> None:
    for arch in ARCHS:
        d = arch.to_dict()
        assert ArchConfig.from_dict(json.loads(json.dumps(d))) == arch
    with pytest.raises(ValueError, match="unknown keys"):
        ArchConfig.from_dict({**ARCHS[0].to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="unknown keys"):
        ArchConfig.from_dict({**ARCHS[0].to_dict(), "text": {**ARCHS[0].to_dict()["text"], "heads": 2}})


def test_tower_and_replace_tower() -> None:
    arch = small_arch(1)
    assert arch.tower("text") is arch.text
    new = arch.replace_tower("shared", TowerConfig(48, 3, 40, head_dim=8))
    assert new.shared.width == 48 and new.image == arch.image and new.embed_dim == arch.embed_dim
    with pytest.raises(ValueError, match="tower"):
        arch.tower("audio")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"width": 30, "depth": 1, "mlp_hidden": 8}, "width"),  # not a multiple of head_dim 16
        ({"width": 0, "depth": 1, "mlp_hidden": 8}, "width"),
        ({"width": 16, "depth": -1, "mlp_hidden": 8}, "depth"),
        ({"width": 16, "depth": 1, "mlp_hidden": 0}, "mlp_hidden"),
        ({"width": 16, "depth": 1, "mlp_hidden": 8, "head_dim": 0}, "head_dim"),
        ({"width": 16, "depth": 1.5, "mlp_hidden": 8}, "depth"),
    ],
)
def test_invalid_tower_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"TowerConfig\.{field}\b"):
        TowerConfig(**kwargs)


def test_invalid_arch_config_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"ArchConfig\.image_size"):
        small_arch(1, image_size=10)
    with pytest.raises(ValueError, match=r"ArchConfig\.embed_dim"):
        small_arch(1, embed_dim=0)
    with pytest.raises(ValueError, match=r"ArchConfig\.context_length"):
        small_arch(1, context_length=1)


def test_pydantic_validates_and_rejects_unknown_keys() -> None:
    adapter = pydantic.TypeAdapter(ArchConfig)
    d = ARCHS[1].to_dict()
    assert adapter.validate_python(d) == ARCHS[1]
    with pytest.raises(pydantic.ValidationError):
        adapter.validate_python({**d, "bogus": 1})
    with pytest.raises(pydantic.ValidationError):
        adapter.validate_python({**d, "image": {**d["image"], "bogus": 1}})
    with pytest.raises(pydantic.ValidationError, match="head_dim"):
        adapter.validate_python({**d, "image": {**d["image"], "width": 20}})


def test_identical_captions_are_positives_not_negatives() -> None:
    # captions a, a, b, c, c, c: rows with one caption share one text embedding; each image sits on it
    tokens = ByteTokenizer(8).encode(["a", "a", "b", "c", "c", "c"])
    mask = same_caption(tokens)
    assert mask.tolist() == [
        [True, True, False, False, False, False],
        [True, True, False, False, False, False],
        [False, False, True, False, False, False],
        [False, False, False, True, True, True],
        [False, False, False, True, True, True],
        [False, False, False, True, True, True],
    ]
    cls = torch.eye(3)[[0, 0, 1, 2, 2, 2]]  # (6, 3)
    perfect = ClipOutput(cls, cls, torch.tensor(100.0), positives=mask)
    assert float(ClipLoss()(perfect)) < 1e-4  # a perfect model has no loss, however captions repeat
    # a wrong image costs: the loss is positive and falls as the image moves onto its caption
    wrong = ClipOutput(cls[[2, 1, 2, 3, 4, 5]], cls, torch.tensor(100.0), positives=mask)
    assert float(ClipLoss()(wrong)) > 1.0
    # unique captions: the usual one-hot InfoNCE
    e = F.normalize(torch.randn(6, 8), dim=-1)
    logits = 10.0 * e @ e.roll(1, 0).T
    labels = torch.arange(6)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    out = ClipOutput(e, e.roll(1, 0), torch.tensor(10.0), positives=torch.eye(6, dtype=torch.bool))
    torch.testing.assert_close(ClipLoss()(out), expected)


def test_forward_marks_identical_captions_as_positives() -> None:
    arch = small_arch(1)
    model = GrowCLIP(arch)
    images, _ = batch(arch)
    tokens = ByteTokenizer(arch.context_length).encode(["a shoe", "a bag", "a shoe", "a sho"])
    out = model(images, tokens)
    assert out.positives is not None
    assert out.positives.tolist() == [
        [True, False, True, False],
        [False, True, False, False],
        [True, False, True, False],
        [False, False, False, True],
    ]


@pytest.mark.parametrize("width", [32, 128])
def test_init_scales_with_width(width: int) -> None:
    # N(0, 1/fan_in) matrices (a fixed 0.02 is ~9x too small at width 32, and learning suffers),
    # residual writes a further sqrt(2 x depth) smaller, token embeddings N(0, 0.02)
    torch.manual_seed(0)
    tower = TowerConfig(width, 2, 4 * width, head_dim=16)
    model = GrowCLIP(ArchConfig(tower, tower, TowerConfig(width, 0, 64, head_dim=16)))
    block = model.text.blocks[1]
    for weight, std in [
        (block.attn.qkv.weight, width**-0.5),
        (block.mlp.fc1.weight, width**-0.5),
        (block.attn.out.weight, width**-0.5 / 2),  # depth 2: / sqrt(4)
        (block.mlp.fc2.weight, (4 * width) ** -0.5 / 2),
        (model.proj.weight, width**-0.5),
        (model.text.token_embed.weight, 0.02),
    ]:
        assert math.isclose(float(weight.detach().std()), std, rel_tol=0.1), (tuple(weight.shape), std)
