"""EVA hooks written the way PEFT's "Customizing EVA" docs show, for `hooks.*` import paths in a job config.

A PEFT user moves these over unchanged: `peft_config` is whatever carries `.r` and `.eva_config.*`, and the layer
hook gets the layer's input tuple, the prepared model input and the layer's name.
"""

from __future__ import annotations

import torch


def lm_forward(model, inputs):
    """forward_fn: the model call without labels (no loss, so no logits are needed for it)."""
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


def lm_token_indices(model_input, peft_config):
    """prepare_model_inputs_fn: (row, position) of every token that is not padding and, with the label mask,
    whose label is kept, computed once per batch (the logic of PEFT's docs)."""
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    if peft_config.eva_config.use_label_mask and "labels" in model_input:
        mask = torch.logical_and(mask, model_input["labels"] != peft_config.eva_config.label_mask_value)
    return mask.nonzero()


def rows_at_indices(layer_input, model_input, layer_name):
    """prepare_layer_inputs_fn: the layer's input rows at the indices lm_token_indices chose."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    return x[model_input.T.unbind()]


def vit_forward(model, inputs):
    """forward_fn for a ViT batch: pixels only."""
    return model(pixel_values=inputs["pixel_values"])


def patch_tokens(layer_input, model_input, layer_name):
    """prepare_layer_inputs_fn for a ViT: patch tokens only, the class token (position 0) left out."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    return x[:, 1:].reshape(-1, x.shape[-1])
