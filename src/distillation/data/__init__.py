"""Data: real text sources, tokenization and packing, the mixture sampler, the Ray Data teacher stage."""
