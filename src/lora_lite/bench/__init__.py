"""`lora-lite bench`: the accuracy benchmark (MetaMathQA -> GSM8K protocol, offline presets, seeds, sweeps).

Needs the `bench` extra (transformers, datasets, matplotlib, tqdm); nothing here is imported by `lora_lite`.
"""
