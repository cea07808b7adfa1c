"""Quantized weights and KV cache: checkpoint schemes (config.py), their reference math (formats.py), quantized
linear layers (linear_methods.py), the loader hook (loading.py), the FP8 KV cache (kv_cache.py), and
`frontierlm quantize` (export.py, cli.py)."""
