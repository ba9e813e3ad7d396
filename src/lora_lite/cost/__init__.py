"""`lora-lite cost`: what each adapter costs, measured side by side with the frozen-base floor and with PEFT.

    macs.py     analytic added MACs per token, from each variant's `added_macs` hook
    measure.py  the harness: the anchor model, the floor/adapter step, interleaved timing, peak memory, init
    peft_map.py the PEFT config that builds the same adapter (same target modules, same r)
    svd_bench.py  full vs randomized (lowrank) top-r SVD on one square layer
    cli.py      argparse front end; prints the markdown table that docs/performance.md holds

Nothing here is imported by `import lora_lite`; transformers and peft are needed only when the command runs.
"""
