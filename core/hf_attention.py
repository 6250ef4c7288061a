"""The tiled attention of core/attention_ops.py as Hugging Face's `attn_implementation="mamlen"`.

A thin adapter: transformers' attention-interface contract in, `tiled_attention` out. `register()` installs it
together with a mask function of the same name — without one HF builds a mask the function misreads, and padded
batches come out wrong (DESIGN.md, "Verified": 0.1 logit error with left padding).
"""
from mamlen.core.attention_ops import tiled_attention

NAME = "mamlen"


def mamlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                             **kwargs):
    """Hugging Face attention interface (same contract as transformers' sdpa_attention_forward):
    query (B, H, Tq, D), key/value (B, Hkv, Tk, D), attention_mask from the "mamlen" mask function (the sdpa one:
    None or bool 4-D) or any additive 4-D mask -> (attn_output (B, Tq, H, Dv), None)."""
    for key_name in ("softcap", "position_bias"):
        if kwargs.get(key_name) is not None:
            raise ValueError(f"attn_implementation='{NAME}' does not support {key_name}")
    if kwargs.get("cache") is not None:
        raise ValueError(f"attn_implementation='{NAME}' does not support paged caches")
    if kwargs.get("output_attentions", False):
        raise ValueError(f"attn_implementation='{NAME}' cannot return attention weights (it never forms them)")
    q_len = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As SDPA: the causal flag is used only when HF skipped building a mask (pure causal, q_len == kv_len).
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = tiled_attention(query, key, value, attention_mask, is_causal=is_causal, scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


def registered() -> bool:
    try:
        from transformers import AttentionInterface
        return NAME in AttentionInterface._global_mapping
    except ImportError:  # older transformers without the registry
        return False


def register() -> None:
    """Register `attn_implementation="mamlen"` with transformers (attention function + mask function). Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, mamlen_attention_forward)
    # Without a mask function of the same name HF passes no padding mask at all; the sdpa one yields None (pure
    # causal, handled by is_causal) or a boolean 4-D mask (True = attend), which tiled_attention reads directly.
    AttentionMaskInterface.register(NAME, sdpa_mask)
