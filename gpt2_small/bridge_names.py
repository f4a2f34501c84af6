"""The TransformerLens 4 bridge's native hook names, and what to say when one is used here.

TransformerBridge names each hook point twice: TransformerLens's name and one of its own
("blocks.0.hook_out" beside "blocks.0.hook_resid_post"), and its caches hold both. This model has
TransformerLens's names alone. A bridge name given to add_hook, run_with_hooks, a names_filter or
a cache lookup is refused with the TransformerLens name of the same activation, or with what it
holds and what to hook instead.
"""

from solution import _optional_hook_setter

# Bridge name -> the TransformerLens name of the same activation. "{block}" stands for "blocks.{i}.",
# "{last}" for the last block's. Checked against the bridge's own caches in tests/test_parity.py.
BRIDGE_NAMES = {
    "embed.hook_out": "hook_embed",
    "pos_embed.hook_out": "hook_pos_embed",
    "{block}hook_in": "{block}hook_resid_pre",
    "{block}attn.hook_attn_in": "{block}hook_attn_in",
    "{block}attn.hook_q_input": "{block}hook_q_input",
    "{block}attn.hook_k_input": "{block}hook_k_input",
    "{block}attn.hook_v_input": "{block}hook_v_input",
    "{block}attn.q.hook_out": "{block}attn.hook_q",
    "{block}attn.k.hook_out": "{block}attn.hook_k",
    "{block}attn.v.hook_out": "{block}attn.hook_v",
    "{block}attn.o.hook_in": "{block}attn.hook_z",
    "{block}attn.o.hook_out": "{block}hook_attn_out",
    "{block}attn.hook_hidden_states": "{block}hook_attn_out",
    "{block}attn.hook_out": "{block}hook_attn_out",
    "{block}ln2.hook_in": "{block}hook_resid_mid",
    "{block}mlp.in.hook_out": "{block}mlp.hook_pre",
    "{block}mlp.out.hook_in": "{block}mlp.hook_post",
    "{block}mlp.out.hook_out": "{block}hook_mlp_out",
    "{block}mlp.hook_out": "{block}hook_mlp_out",
    "{block}hook_out": "{block}hook_resid_post",
    "ln_final.hook_in": "{last}hook_resid_post",
}
# The bridge's hook points that have no counterpart here: what each holds, and what to hook instead.
_LN_OUTPUT = (
    "{ln}'s output, w * normalized + b, which has no hook point here: hook {where}{ln}.hook_normalized (before w and b)"
)
BRIDGE_ONLY_NAMES = {
    "embed.hook_in": "the token ids, forward's input, which have no hook point here",
    "pos_embed.hook_in": "the position ids, [[0, 1, ..., pos - 1]], which have no hook point here",
    **dict.fromkeys(
        ["{block}" + name for name in ("ln1.hook_out", "attn.hook_in", "attn.qkv.hook_in")]
        + ["{block}attn." + qkv + ".hook_in" for qkv in "qkv"],
        _LN_OUTPUT.format(ln="ln1", where="{block}"),
    ),
    # A hook point of its own in the bridge: patching it there changes what attention reads, not the stream.
    "{block}ln1.hook_in": (
        "ln1's input, which holds {block}hook_resid_pre's values but has no hook point of its own here: to patch "
        "what attention alone reads, hook {block}hook_attn_in (it exists after model.set_use_attn_in(True))"
    ),
    "{block}attn.qkv.hook_out": (
        "the fused q, k, v projection, which has no hook point here: hook {block}attn.hook_q, hook_k and hook_v"
    ),
    **dict.fromkeys(
        ["{block}" + name for name in ("ln2.hook_out", "mlp.hook_in", "mlp.in.hook_in")],
        _LN_OUTPUT.format(ln="ln2", where="{block}"),
    ),
    **dict.fromkeys(["ln_final.hook_out", "unembed.hook_in"], _LN_OUTPUT.format(ln="ln_final", where="")),
    **dict.fromkeys(
        ["unembed.hook_out", "hook_unembed"], "the logits, which forward returns; they have no hook point here"
    ),
}


def bridge_name_hint(name: object, n_layers: int) -> str | None:
    """Why `name` is no hook point here, if it is one of the TransformerLens bridge's native names:
    the TransformerLens name of the same activation, or what to hook instead."""
    if not isinstance(name, str):
        return None
    parts = name.split(".", 2)
    block, key = "", name
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and int(parts[1]) < n_layers:
        block, key = f"blocks.{parts[1]}.", "{block}" + parts[2]
    fill = {"block": block, "last": f"blocks.{n_layers - 1}."}
    if key in BRIDGE_NAMES:
        ours = BRIDGE_NAMES[key].format(**fill)
        setter = _optional_hook_setter(ours, n_layers)
        after = f" (an optional hook: it exists after model.{setter}(True))" if setter else ""
        return f"{name!r} is the TransformerLens bridge's name for {ours!r}{after}; this model has TransformerLens's names only"
    if key in BRIDGE_ONLY_NAMES:
        return f"{name!r} is the TransformerLens bridge's name for {BRIDGE_ONLY_NAMES[key].format(**fill)}"
    return None
