"""The computation of ``nn.MultiheadAttention`` with the projection weights given and the out-projection a module.

``F.multi_head_attention_forward`` multiplies by ``out_proj.weight`` itself, so the input of the out-projection
never passes through the ``out_proj`` module and cannot be fake-quantized there. ``multi_head_attention`` computes
the same thing (same masks, bias_k/bias_v, zero attention, dropout, averaged or per-head weights, batched or
unbatched, ``batch_first`` or not) with the in-projection weights it is given and ``module.out_proj`` called as a
module, so a fake-quantized ``out_proj`` rounds its input and weight as any fake-quantized Linear does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _additive(mask: torch.Tensor | None, dtype: torch.dtype, name: str) -> torch.Tensor | None:
    """A boolean mask (``True``: not attended) as ``0``/``-inf``; a float mask as it is (added to the scores)."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"only bool and floating types of {name} are supported, got {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def in_projection(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    weights: Sequence[torch.Tensor],
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query, key and value projections, each ``(..., embed_dim)``.

    Args:
        query, key, value: ``(..., embed_dim)``, ``(..., kdim)``, ``(..., vdim)``.
        weights: ``(in_proj_weight,)`` of shape ``(3 * embed_dim, embed_dim)``, or the three
            ``(embed_dim, embed_dim | kdim | vdim)`` weights.
        bias: ``in_proj_bias`` ``(3 * embed_dim,)`` or ``None``.
    """
    # Three products even for self-attention: slicing one product's output along its last dimension makes
    # ExecuTorch's XNNPACK delegate fail at run time when the batch dimension is dynamic (executorch 1.5).
    w_q, w_k, w_v = weights[0].chunk(3) if len(weights) == 1 else weights
    b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
    return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


def _to_batch_first(x: torch.Tensor, batched: bool, batch_first: bool) -> torch.Tensor:
    if not batched:
        return x.unsqueeze(0)
    return x if batch_first else x.transpose(0, 1)


def _from_batch_first(x: torch.Tensor, batched: bool, batch_first: bool) -> torch.Tensor:
    if not batched:
        return x.squeeze(0)
    return x if batch_first else x.transpose(0, 1)


def _merged_mask(
    module: nn.MultiheadAttention,
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    shape: tuple[int, int, int],
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """``attn_mask`` and ``key_padding_mask`` as one additive mask broadcasting to ``(B, heads, L, S)``.

    ``shape`` is ``(B, L, S)`` with ``S`` the number of keys given (before ``bias_k`` and zero attention, which
    get a column of zeros each, as in torch).
    """
    batch, target, source = shape
    heads = module.num_heads
    mask = _additive(attn_mask, dtype, "attn_mask")
    if mask is not None:
        if mask.dim() == 2 and mask.shape == (target, source):
            mask = mask.reshape(1, 1, target, source)
        elif mask.dim() == 3 and mask.shape == (batch * heads, target, source):
            mask = mask.reshape(batch, heads, target, source)
        else:
            raise RuntimeError(
                f"The shape of attn_mask is {tuple(mask.shape)}, but should be {(target, source)} or "
                f"{(batch * heads, target, source)}."
            )
    padding = _additive(key_padding_mask, dtype, "key_padding_mask")
    if padding is not None:
        padding = padding.reshape(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    columns = int(module.bias_k is not None) + int(module.add_zero_attn)
    return F.pad(mask, (0, columns)) if mask is not None and columns else mask


def multi_head_attention(
    module: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    weights: Sequence[torch.Tensor],
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``module(query, key, value, ...)`` with the in-projection ``weights`` (see ``in_projection``).

    Arguments and results are those of ``nn.MultiheadAttention.forward``: inputs ``(B, L, E)`` with
    ``batch_first``, else ``(L, B, E)``, or unbatched ``(L, E)``; the output has the layout of ``query``, the
    attention weights are ``(B, L, S)`` (``(B, heads, L, S)`` unless ``average_attn_weights``) or ``None``
    without ``need_weights``. Its ``is_causal`` hint is not taken: the causal ``attn_mask`` it requires is used.
    """
    batched = query.dim() == 3
    q, k, v = in_projection(query, key, value, weights, module.in_proj_bias)
    q, k, v = (_to_batch_first(x, batched, module.batch_first) for x in (q, k, v))
    if key_padding_mask is not None and not batched:
        key_padding_mask = key_padding_mask.unsqueeze(0)
    batch, target, embed_dim = q.shape
    mask = _merged_mask(module, attn_mask, key_padding_mask, (batch, target, k.shape[1]), q.dtype)
    if module.bias_k is not None and module.bias_v is not None:
        k = torch.cat([k, module.bias_k.expand(batch, 1, embed_dim)], dim=1)
        v = torch.cat([v, module.bias_v.expand(batch, 1, embed_dim)], dim=1)
    heads, head_dim = module.num_heads, module.head_dim
    q, k, v = (x.reshape(batch, -1, heads, head_dim).transpose(1, 2) for x in (q, k, v))  # (B, heads, L|S, D)
    if module.add_zero_attn:
        zeros = k.new_zeros(batch, heads, 1, head_dim)
        k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
    dropout = module.dropout if module.training else 0.0
    attention = None
    if need_weights:
        scores = torch.matmul(q * math.sqrt(1.0 / float(head_dim)), k.transpose(-2, -1))
        attention = torch.softmax(scores if mask is None else scores + mask, dim=-1)
        if dropout > 0.0:
            attention = F.dropout(attention, p=dropout)
        out = torch.matmul(attention, v)
        if average_attn_weights:
            attention = attention.mean(dim=1)
        if not batched:
            attention = attention.squeeze(0)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    out = module.out_proj(out.transpose(1, 2).reshape(batch, target, embed_dim))
    return _from_batch_first(out, batched, module.batch_first), attention
