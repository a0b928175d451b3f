from lightning_memopt.strategies.fsdp2 import FSDP2Strategy, register_strategies, shard_hf_module, transformer_blocks

register_strategies()

__all__ = ["FSDP2Strategy", "register_strategies", "shard_hf_module", "transformer_blocks"]
