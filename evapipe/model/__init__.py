"""The frozen base model: loading (quantized, device_map, or block by block), which layers are targeted,
mixture-of-experts parameters, and the forward passes whose layer inputs are captured as tokens.
"""
