"""Weight processing: a NEW model with weights that are easier to read and compute the same thing.

Each function copies the model, changes the copy's weights and returns it; the model passed in is
never touched. What stays equal, to float rounding (checked in float64 by tests/test_circuits.py),
and which taps change:

- ``fold_ln``: the logits and the residual stream; ``ln1``/``ln2`` outputs change (now weight 1, bias 0).
- ``center_writing_weights``: the logits and every LayerNorm output; the residual stream changes by a
  multiple of (1, ..., 1) per position.
- ``center_unembed``: the log-softmax (probabilities, loss) and the residual stream; the logits move
  by a constant per position, ``embed`` and ``pos_embed`` change.
- ``fold_value_biases``: the logits, the residual stream, ``attn_delta``; ``attn.v``, ``attn.z`` and
  ``attn.heads`` change (b_V is now in b_O). The model must be in eval mode for this equality
  (dropout on the pattern breaks its rows' sum to 1).

``process_weights`` applies the four, copying once, in TransformerLens's order but for
``center_unembed``, which goes before ``center_writing_weights`` so that the mean it moves into
W_pos is centred too. Low-precision models (float16, bfloat16) are processed in their dtype: expect
their rounding. Shapes: L n_layer, H heads, D d_model, d d_head, M d_mlp, V vocabulary, P n_positions.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn

from .checks import check_bool
from .errors import InputError
from .weight_views import Model, check_model


def _fold_ln_into(ln: nn.LayerNorm, linear: nn.Linear) -> None:
    """linear(ln(x)) = linear'(normalised x): W' = W diag(w), b' = b + W @ ln.bias; ln becomes weight 1, bias 0."""
    linear.bias += linear.weight @ ln.bias
    linear.weight *= ln.weight  # [out, D] * [D]: scales each input column
    # A normalised vector has mean 0 over D, so the weights' mean over their input axis reads nothing.
    linear.weight -= linear.weight.mean(dim=1, keepdim=True)
    ln.weight.fill_(1.0)
    ln.bias.zero_()


def _fold_ln_(model: Model) -> None:
    for block in model.blocks:
        _fold_ln_into(block.ln1, block.attn.qkv)
        _fold_ln_into(block.ln2, block.mlp.fc)


def _center_writing_weights_(model: Model) -> None:
    # Not W_E: it is also W_U (tied), read by ln_f's output, whose sum over D is not 0 (see the docstring).
    model.pos_embed.weight -= model.pos_embed.weight.mean(dim=1, keepdim=True)  # [P, D]: each row
    for block in model.blocks:
        for linear in (block.attn.out, block.mlp.proj):  # weight [D, in], bias [D]: over the output axis
            linear.weight -= linear.weight.mean(dim=0, keepdim=True)
            linear.bias -= linear.bias.mean()


def _center_unembed_(model: Model) -> None:
    # W_U is the embedding transposed: its mean over the vocabulary is the mean token embedding m.
    # Taking m from every token and giving it to every position leaves embed + pos_embed as it was.
    mean = model.embed.weight.mean(dim=0)  # [D]
    model.embed.weight -= mean
    model.pos_embed.weight += mean


def _fold_value_biases_(model: Model) -> None:
    for block in model.blocks:
        attn = block.attn
        b_v = attn.qkv.bias.view(3, -1)[2]  # [H * d], a view: zeroed in place below
        attn.out.bias += attn.out.weight @ b_v  # sum over heads of b_V[h] @ W_O[h]
        b_v.zero_()


_STEPS: dict[str, Callable[[Model], None]] = {"fold_ln": _fold_ln_, "center_writing_weights": _center_writing_weights_,
                                              "center_unembed": _center_unembed_,
                                              "fold_value_biases": _fold_value_biases_}


def _processed(model: object, steps: list[str]) -> Model:
    """A deep copy of ``model`` with ``steps`` (names in _STEPS) applied in order."""
    model = check_model(model)
    if any(p.is_meta for p in model.parameters()):
        raise InputError("the model's weights are on the meta device (shapes only): there is nothing to process; "
                         "load the weights first (GPT.from_pretrained)")
    new = copy.deepcopy(model)
    with torch.no_grad():
        for step in steps:
            _STEPS[step](new)
    if steps:
        new.provenance = f"{getattr(model, 'provenance', 'minigpt GPT')}; processed: {', '.join(steps)}"
    return new


def fold_ln(model: Model) -> Model:
    """A new model with ln1's weight and bias folded into ``attn.qkv`` and ln2's into ``mlp.fc``; the same logits.

    Each LayerNorm is left as weight 1, bias 0 (it only centres and scales), and the weights reading
    from it are centred over D (a normalised vector has mean 0, so that part read nothing).
    ``ln_f`` is left as it is: folding its weight into W_U would untie W_U from the token embedding,
    and its bias would need an unembedding bias; minigpt's GPT has a tied head and no such bias, so
    ``ln_f`` stays in the model (TransformerLens, whose W_U is untied, folds it).
    """
    return _processed(model, ["fold_ln"])


def center_writing_weights(model: Model) -> Model:
    """A new model whose writes to the residual stream have mean 0 over D, W_E's aside; the same logits.

    Centred: W_pos [P, D] row by row, each block's ``attn.out`` and ``mlp.proj`` weights [D, in] and
    biases [D] over D. Each write then changes by a multiple of (1, ..., 1); every reader of the
    residual stream is a LayerNorm, which takes out the mean first, so its output is the same (with
    or without ``fold_ln``). The residual stream itself changes: only its centred part stays.
    W_E is left as it is, unlike TransformerLens's: GPT-2's W_E is also its W_U, which reads ln_f's
    output directly, and centring token t's embedding (by its mean mu_t) would move its logit by
    mu_t * sum_D ln_f(x): not a constant per position, since ln_f's weight is not constant over D.
    """
    return _processed(model, ["center_writing_weights"])


def center_unembed(model: Model) -> Model:
    """A new model whose W_U [D, V] has mean 0 over the vocabulary; the same log-softmax (not the same logits).

    Each position's logits move by one constant (ln_f(x) . m, m the mean over V), which softmax does
    not see. GPT-2's W_U is the token embedding transposed, so centring it changes the embedding too:
    the mean token embedding m is taken from every token and added to every position's embedding
    (``W_pos + m``), so that embed + pos_embed, hence the residual stream, stays as it was.
    """
    return _processed(model, ["center_unembed"])


def fold_value_biases(model: Model) -> Model:
    """A new model with each layer's value biases folded into its output bias: b_O + sum_h b_V[h] @ W_O[h].

    Exact because each row of an attention pattern sums to 1: a value bias adds b_V[h] to head h's
    z whatever the pattern, hence b_V[h] @ W_O[h] to the output. b_V becomes 0. Eval mode only
    (attention dropout breaks the sum to 1).
    """
    return _processed(model, ["fold_value_biases"])


def process_weights(model: Model, *, fold_ln: bool = True, center_writing_weights: bool = True,
                    center_unembed: bool = True, fold_value_biases: bool = True) -> Model:
    """A new model with the chosen steps applied (in this module's docstring's order), copying once.

    The same log-softmax as ``model``; the same logits too when ``center_unembed`` is False. Each
    step is described by the function of its name.
    """
    chosen = {"fold_ln": fold_ln, "center_unembed": center_unembed, "center_writing_weights": center_writing_weights,
              "fold_value_biases": fold_value_biases}
    return _processed(model, [name for name, on in chosen.items() if check_bool(on, name)])
