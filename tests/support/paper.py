"""Direct, slow implementations of the paper's conventions, used as test oracles.

Written from the description in Gandelsman, Efros and Steinhardt (ICLR 2024) and of its
code's conventions: a plain forward pass through an open_clip ViT written out block by block,
recording each head's contribution from each source token at the class token, each MLP's and
the embedding's; then `ln_post` applied term by term with its mean μ and bias β shared
equally among the K = 2L + 1 additive blocks (an attention layer's share split equally among
its H heads and T tokens), the per-image 1/σ, γ, the projection, and 1/‖r‖. Everything in
float64, nothing clever.
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def paper_terms(model: torch.nn.Module, images: torch.Tensor):
    """(tokens [B, L, T, H, D], mlps [B, L+1, D], r / ‖r‖ [B, D]) by the paper's convention,
    for a native open_clip ViT with class-token pooling and batch-first blocks."""
    v = model.visual.double()
    try:
        x = v.conv1(images.double()).flatten(2).transpose(1, 2)  # [B, P, W]
        cls = v.class_embedding.expand(x.shape[0], 1, -1)
        x = v.ln_pre(torch.cat([cls, x], 1) + v.positional_embedding)
        b, t, w = x.shape
        embedding = x[:, 0]
        tokens, mlps = [], [embedding]
        for block in v.transformer.resblocks:
            attn = block.attn
            h = attn.num_heads
            dh = w // h
            y = block.ln_1(x)
            q, k, val = (y @ attn.in_proj_weight.T + attn.in_proj_bias).split(w, -1)
            q, k, val = (z.reshape(b, t, h, dh) for z in (q, k, val))
            a = torch.softmax(torch.einsum("bqhe,bkhe->bhqk", q, k) / dh**0.5, -1)
            out_w = attn.out_proj.weight  # [W, W]: out = concat_h(o_h) @ out_wᵀ
            # Each head h and source token j at the class-token query.
            per = torch.einsum("bhj,bjhe->bjhe", a[:, :, 0], val)  # [B, T, H, dh]
            per = torch.stack(
                [per[:, :, i] @ out_w[:, i * dh : (i + 1) * dh].T for i in range(h)], 2
            ) + attn.out_proj.bias / (h * t)  # [B, T, H, W]
            gamma = block.ls_1.gamma if hasattr(block.ls_1, "gamma") else 1.0
            per = per * gamma
            full = torch.einsum("bhqk,bkhe->bqhe", a, val).reshape(b, t, w)
            x = x + block.ls_1(attn.out_proj(full))
            tokens.append(per)
            m = block.ls_2(block.mlp(block.ln_2(x)))
            x = x + m
            mlps.append(m[:, 0])
        z = x[:, 0]
        representation = v.proj.T @ v.ln_post(z).T
        representation = representation.T
        norm = representation.norm(dim=-1)
        mu = z.mean(-1)
        sigma = torch.sqrt(z.var(-1, unbiased=False) + v.ln_post.eps)
        layers = len(v.transformer.resblocks)
        blocks = 2 * layers + 1

        def post(term, share):  # term [B, ..., W], share: the fraction of μ and β it takes
            extra = (1,) * (term.ndim - 2)
            centred = term - (mu * share).reshape(-1, *extra, 1)
            normed = v.ln_post.weight * centred / sigma.reshape(-1, *extra, 1)
            return (normed + v.ln_post.bias * share) @ v.proj / norm.reshape(-1, *extra, 1)

        token_terms = torch.stack(
            [post(p, 1.0 / (blocks * p.shape[2] * p.shape[1])) for p in tokens], 1
        )
        mlp_terms = torch.stack([post(m, 1.0 / blocks) for m in mlps], 1)
        return (
            token_terms.float().numpy(),
            mlp_terms.float().numpy(),
            (representation / norm[:, None]).float().numpy(),
        )
    finally:
        model.visual.float()


def paper_ablations(heads: np.ndarray, mlps: np.ndarray, class_token: np.ndarray, w, labels):
    """The paper's mean-ablation accuracies on its own arrays (means over the same set):
    baseline, every entry of `mlps` (the embedding term too) mean-ablated, the class-token
    attention terms mean-ablated, both, then attention layers 0..k−1 mean-ablated."""
    attn = heads.sum(2)  # [N, L, D]

    def accuracy(rep):
        return float(((rep @ w).argmax(-1) == labels).mean())

    rep = attn.sum(1) + mlps.sum(1)
    mlp_ablated = attn.sum(1) + mlps.mean(0).sum(0)
    cls_ablated = rep - class_token.sum(1) + class_token.mean(0).sum(0)
    both = mlp_ablated - class_token.sum(1) + class_token.mean(0).sum(0)
    out = {
        "baseline": accuracy(rep),
        "MLPs mean-ablated": accuracy(mlp_ablated),
        "class-token attention mean-ablated": accuracy(cls_ablated),
        "MLPs + class-token attention mean-ablated": accuracy(both),
    }
    layers = [accuracy(rep)]
    for k in range(1, attn.shape[1] + 1):
        layers.append(accuracy(attn.mean(0)[:k].sum(0) + attn[:, k:].sum(1) + mlps.sum(1)))
    return out, np.array(layers)


@torch.no_grad()
def paper_segmentation(model: torch.nn.Module, image: torch.Tensor, w: np.ndarray):
    """One image [1, 3, H, W]: the paper's normalised heatmap [H, W] (float32) and its mask:
    patch token terms summed over layers and heads, scored against the classes, the predicted
    class's score minus the mean class's, upsampled by PyTorch (scale factor = patch size),
    clipped at 0, min–max normalised, thresholded at its mean."""
    tokens, _, rep = paper_terms(model, image)
    patch = model.visual.patch_size[0]
    grid = image.shape[-1] // patch
    heat = tokens[:, :, 1:].sum((1, 3)) @ w  # [1, P, C]
    chosen = int((rep @ w).argmax())
    values = heat[0, :, chosen] - heat[0].mean(-1)
    res = torch.from_numpy(values.reshape(1, 1, grid, grid)).float()
    res = torch.nn.functional.interpolate(res, scale_factor=patch, mode="bilinear")
    res = torch.clip(res, 0, res.max())
    res = (res - res.min()) / (res.max() - res.min())
    return res[0, 0].numpy(), (res > res.mean())[0, 0].numpy()
