"""PEFT modules injected into timm ViTs: identity at init where the init guarantees it, only their own parameters
train, checkpoints round-trip, LoRA merges exactly, and they work on ViT / DINOv2 (LayerScale) / register tokens."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from cil.layers import (
    PEFT_KINDS,
    FlatPEFT,
    LoRALinear,
    freeze_except_peft,
    inject,
    merge_lora,
    peft_parameters,
)

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


# SSF and VPT as in the authors' APER code (LAMDA-PILOT backbone/vit_ssf.py, backbone/vpt.py)
SSF_MODELS = {  # the ViT variants plus a patch-embedding norm and average pooling (final norm -> Identity)
    **VIT_VARIANTS,
    "vit_embed_norm": dict(VIT_VARIANTS["vit"], embed_norm_layer=nn.LayerNorm),
    "vit_avg_pool": dict(VIT_VARIANTS["vit"], global_pool="avg"),
}


def make_model(kwargs: dict) -> nn.Module:
    torch.manual_seed(0)
    kwargs = dict(kwargs)
    return timm.create_model(kwargs.pop("model_name"), num_classes=0, **kwargs).eval()


def record_outputs(modules: dict[str, nn.Module]) -> tuple[dict[str, torch.Tensor], list]:
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out.detach().clone()))
        for name, module in modules.items()
    ]
    return outputs, handles


def wrapper_of(injected: list, base: nn.Module) -> nn.Module:
    found = [module for module in injected if getattr(module, "base", None) is base]
    assert len(found) == 1, f"no SSF follows {type(base).__name__}"
    return found[0]


@pytest.mark.parametrize("model", SSF_MODELS)
def test_ssf_scales_and_shifts_patch_embedding_and_final_norm(model: str) -> None:
    """The authors' SSF ViT also modulates the patch projection (per channel, before the patch-embedding norm, and
    after that norm when there is one) and the final norm's output (every token, before pooling): identity at
    ``init_std=0``, and exactly ``y * gamma + beta`` at those points once gamma / beta move."""
    vit = make_model(SSF_MODELS[model])
    x = images(vit)
    proj, embed_norm, final_norm = vit.patch_embed.proj, vit.patch_embed.norm, vit.norm  # the original modules
    originals = {"proj": proj, "embed_norm": embed_norm, "final_norm": final_norm, "patch_embed": vit.patch_embed}
    with torch.no_grad():
        reference_embed, reference_tokens = vit.patch_embed(x), vit.forward_features(x)
    injected = inject(vit, "ssf", init_std=0.0)
    at_proj, at_final = wrapper_of(injected, proj), wrapper_of(injected, final_norm)
    has_embed_norm = not isinstance(embed_norm, nn.Identity)
    if has_embed_norm:
        at_embed_norm = wrapper_of(injected, embed_norm)
    else:
        assert not any(getattr(module, "base", None) is embed_norm for module in injected)
    with torch.no_grad():  # identity at init
        torch.testing.assert_close(vit.patch_embed(x), reference_embed)
        torch.testing.assert_close(vit.forward_features(x), reference_tokens)

    perturb([at_proj.scale, at_proj.shift, at_final.scale, at_final.shift])
    if has_embed_norm:
        perturb([at_embed_norm.scale, at_embed_norm.shift])
    outputs, handles = record_outputs(originals)
    with torch.no_grad():
        tokens = vit.forward_features(x)  # [B, N, D]
    for handle in handles:
        handle.remove()
    # after the patch projection: conv output [B, D, h, w] scaled and shifted per channel, then flattened
    projected = outputs["proj"].flatten(2).transpose(1, 2) * at_proj.scale + at_proj.shift  # [B, L, D]
    if has_embed_norm:
        torch.testing.assert_close(outputs["embed_norm"], embed_norm(projected))  # the norm sees the modulated tokens
        projected = outputs["embed_norm"] * at_embed_norm.scale + at_embed_norm.shift
    torch.testing.assert_close(outputs["patch_embed"], projected)
    # after the final norm (an Identity on average-pooling models), on every token
    torch.testing.assert_close(tokens, outputs["final_norm"] * at_final.scale + at_final.shift)
    assert not torch.allclose(tokens, reference_tokens, atol=1e-4)

    assert len(inject(make_model(SSF_MODELS[model]), "ssf", patch_embed=False, final_norm=False)) == 6 * 2


def test_ssf_model_level_parameters_train_and_are_peft() -> None:
    """The patch-embedding and final-norm scale / shift train, are PEFT parameters (FlatPEFT sees them), reach the
    state dict, and an APER-style copy (init N(1, 0.02) / N(0, 0.02)) moves the feature through them."""
    vit = make_vit("dinov2_layerscale")
    proj, final_norm = vit.patch_embed.proj, vit.norm
    injected = inject(vit, "ssf")
    freeze_except_peft(vit)
    model_level = [wrapper_of(injected, proj), wrapper_of(injected, final_norm)]
    new = [p for module in model_level for p in (module.scale, module.shift)]
    assert all(p.requires_grad for p in new)
    own = {id(p) for p in peft_parameters(vit)}
    assert all(id(p) in own for p in new)
    assert {id(p) for p in vit.parameters() if p.requires_grad} == own
    assert all(p.std() > 0 for p in new)  # the authors' random init, not an identity
    flat = FlatPEFT(vit)
    names = set(flat.names)
    assert {"patch_embed.proj.scale", "patch_embed.proj.shift", "norm.scale", "norm.shift"} <= names
    assert {"patch_embed.proj.scale", "norm.shift"} <= set(vit.state_dict())
    assert flat.numel() == sum(p.numel() for p in peft_parameters(vit))
    x = images(vit)
    vit.train()
    vit(x).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in new)
    vit.eval()
    with torch.no_grad():  # a flat vector with the final shift moved changes the feature by exactly that shift
        vector = flat.vector()
        start = sum(p.numel() for p in flat.parameters()[: flat.names.index("norm.shift")])
        moved = vector.clone()
        moved[start : start + vit.embed_dim] += 1.0
        torch.testing.assert_close(flat.run_with(moved, x), vit(x) + 1.0)


def authors_vpt_tokens(vit: nn.Module, x: torch.Tensor, prompts: list[torch.Tensor], deep: bool) -> torch.Tensor:
    """The VPT forward of the authors' APER code, on a plain timm ViT: after the patch embedding and position
    embedding, prompts ``[T, D]`` (no position embedding) are appended after all tokens; deep: fresh prompts before
    every block and that block's prompt outputs dropped right after it; shallow: appended once before the first block
    and dropped after the last. Then the final norm; the authors' feature is the class token ``[:, 0]``."""
    tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))  # [B, N, D]
    batch, count = x.shape[0], prompts[0].shape[0]
    if deep:
        for block, block_prompts in zip(vit.blocks, prompts, strict=True):
            tokens = block(torch.cat([tokens, block_prompts.expand(batch, -1, -1)], dim=1))[:, :-count]
    else:
        tokens = torch.cat([tokens, prompts[0].expand(batch, -1, -1)], dim=1)  # [B, N + T, D]
        tokens = vit.blocks(tokens)[:, :-count]
    return vit.norm(tokens)  # [B, N, D]


@pytest.mark.parametrize("variant", VIT_VARIANTS)
@pytest.mark.parametrize("kind", ["vpt_shallow", "vpt_deep"])
def test_vpt_starts_at_zero_and_follows_the_authors_forward(kind: str, variant: str) -> None:
    """Prompts start at zero (one set for shallow, one per block for deep), and the injected model's tokens after the
    final norm equal :func:`authors_vpt_tokens` with the same prompts, zero and trained (so does the pooled feature,
    the class token). Zero prompts are still not an identity."""
    deep = kind == "vpt_deep"
    plain, vit = make_vit(variant), make_vit(variant)
    x = images(vit)
    injected = inject(vit, kind, num_tokens=3)
    prompts = [module.prompts for module in injected if getattr(module, "prompts", None) is not None]
    assert len(prompts) == (len(vit.blocks) if deep else 1)
    assert all(p.shape == (3, vit.embed_dim) and p.requires_grad and not p.any() for p in prompts)
    for _ in ("zero", "trained"):
        with torch.no_grad():
            expected = authors_vpt_tokens(plain, x, [p.detach() for p in prompts], deep)
            torch.testing.assert_close(vit.forward_features(x), expected)
            torch.testing.assert_close(vit(x), expected[:, 0])
            assert not torch.allclose(vit(x), plain(x), atol=1e-4)  # zero tokens normalise to the LayerNorm bias
        perturb(prompts)


def test_vpt_paper_options() -> None:
    """``init="uniform"`` (the VPT paper's bound) and prompt dropout, which acts in training mode only."""
    vit = make_vit("vit")
    x = images(vit)
    injected = inject(vit, "vpt_deep", num_tokens=3, init="uniform", dropout=0.5)
    bound = (6.0 / (3 * 8 * 8 + vit.embed_dim)) ** 0.5
    prompts = [module.prompts for module in injected if getattr(module, "prompts", None) is not None]
    assert all(p.any() and p.abs().max() <= bound for p in prompts)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), vit(x))
        vit.train()
        torch.manual_seed(0)
        assert not torch.allclose(vit(x), vit(x))
    with pytest.raises(ValueError, match="VPT init"):
        inject(make_vit("vit"), "vpt_shallow", init="normal")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_trainable_prompts_run_under_inference_mode_with_flop_counting(dropout: float) -> None:
    """FLOP counting tracks modules; a module called on a trainable prompt parameter broke it in inference mode."""
    from cil.flops import flop_counter

    vit = make_vit("vit")
    inject(vit, "vpt_shallow", num_tokens=3, dropout=dropout)
    vit.eval()
    with torch.inference_mode(), flop_counter() as counter:
        features = vit(images(vit))
    assert torch.isfinite(features).all() and counter.get_total_flops() > 0
