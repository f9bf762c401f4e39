"""From a state to a PEFT adapter: apply (full precision or 4/8-bit bases, experts included), check an
adapter directory against a model, convert PEFT-style state dicts.
"""
