"""PEFT modules injected into timm ViTs: identity at init where the init guarantees it, only their own parameters
train, checkpoints round-trip, LoRA merges exactly, and they work on ViT / DINOv2 (LayerScale) / register tokens."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from cil.layers import PEFT_KINDS, LoRALinear, freeze_except_peft, inject, merge_lora, peft_parameters

VIT_VARIANTS = {
    "vit": dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2),
    "dinov2_layerscale": dict(model_name="vit_small_patch14_dinov2", img_size=28, depth=2, init_values=0.1),
    "vit_registers": dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, reg_tokens=2),
}
# case -> (kind, hyper-parameters, does the injected model equal the pre-trained one at initialisation?)
KINDS = {
    "adapter": ("adapter", {"bottleneck": 8}, True),
    "adapter_attn": ("adapter", {"bottleneck": 8, "position": "attn"}, True),  # beside attention, as LAE
    "lora": ("lora", {"targets": ("q", "k", "v", "proj", "fc1", "fc2"), "rank": 4}, True),
    "prefix": ("prefix", {"length": 3}, False),
    "vpt_shallow": ("vpt_shallow", {"num_tokens": 3}, False),
    "vpt_deep": ("vpt_deep", {"num_tokens": 3}, False),
    "ssf": ("ssf", {"init_std": 0.0}, True),
}


def make_vit(variant: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs = dict(VIT_VARIANTS[variant])
    return timm.create_model(kwargs.pop("model_name"), num_classes=0, **kwargs).eval()


def images(vit: nn.Module) -> torch.Tensor:
    size = vit.patch_embed.img_size[0]
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def perturb(parameters: list[nn.Parameter]) -> None:
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(0.05 * torch.randn_like(parameter))


def test_every_kind_is_tested() -> None:
    assert {kind for kind, _, _ in KINDS.values()} == set(PEFT_KINDS)


@pytest.mark.parametrize("variant", VIT_VARIANTS)
@pytest.mark.parametrize("case", KINDS)
def test_injection(case: str, variant: str) -> None:
    kind, hp, identity_at_init = KINDS[case]
    vit = make_vit(variant)
    x = images(vit)
    with torch.no_grad():
        reference = vit(x)
    injected = inject(vit, kind, **hp)
    assert injected
    with torch.no_grad():
        out = vit(x)
    assert out.shape == reference.shape  # prompts never reach the pooled feature
    if identity_at_init:
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)

    # only the injected modules' own parameters train, and all of them get a gradient
    freeze_except_peft(vit)
    own = list(peft_parameters(vit))
    trainable = [p for p in vit.parameters() if p.requires_grad]
    assert own and {id(p) for p in own} == {id(p) for p in trainable}
    perturb(own)  # leave the zero init so that every parameter's gradient is informative
    vit.train()
    vit(x).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in own)

    # a checkpoint round trip reproduces the outputs
    vit.eval()
    with torch.no_grad():
        trained = vit(x)
    restored = make_vit(variant)
    inject(restored, kind, **hp)
    restored.load_state_dict(vit.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), trained)
        assert not torch.allclose(trained, reference, atol=1e-4)


def test_lora_merge_is_exact_and_targets_slices() -> None:
    vit = make_vit("vit")
    x = images(vit)
    inject(vit, "lora", targets=("k", "v"), rank=4, alpha=8.0)
    qkv = vit.blocks[0].attn.qkv
    assert isinstance(qkv, LoRALinear) and set(qkv.slices) == {"k", "v"}
    perturb(list(peft_parameters(vit)))
    tokens = torch.randn(2, 5, 192)
    with torch.no_grad():
        before = vit(x)
        q_slice = qkv(tokens)[..., :192]
        torch.testing.assert_close(q_slice, qkv.base(tokens)[..., :192])  # q is untouched by K/V-only LoRA
    assert merge_lora(vit) == 2
    with torch.no_grad():
        torch.testing.assert_close(vit(x), before, atol=1e-5, rtol=1e-5)
        assert all(b.abs().sum() == 0 for b in qkv.lora_B.values())  # reset: ready for a fresh update


def test_layer_selection_and_errors() -> None:
    vit = make_vit("vit")
    assert len(inject(vit, "adapter", layers=[-1], bottleneck=4)) == 1
    assert type(vit.blocks[0].mlp).__name__ == "Mlp"
    with pytest.raises(ValueError, match="does not exist"):
        inject(vit, "adapter", layers=[5])
    with pytest.raises(KeyError, match="unknown PEFT kind"):
        inject(vit, "lorra")
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        inject(vit, "lora", targets=("x",))
    with pytest.raises(ValueError, match="not a timm VisionTransformer"):
        inject(nn.Linear(2, 2), "adapter")


def test_kinds_compose() -> None:
    """An adapter beside the MLP and LoRA / SSF inside it can coexist (MOS, LAE stack modules like this)."""
    vit = make_vit("dinov2_layerscale")
    x = images(vit)
    with torch.no_grad():
        reference = vit(x)
    inject(vit, "adapter", bottleneck=4)
    inject(vit, "lora", targets=("v", "fc1"), rank=2)
    inject(vit, "ssf", init_std=0.0)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), reference, atol=1e-5, rtol=1e-5)
