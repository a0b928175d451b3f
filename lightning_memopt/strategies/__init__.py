from lightning_memopt.strategies.fsdp2 import FSDP2Strategy, register_strategies, shard_hf_module, transformer_blocks
from lightning_memopt.strategies.zero3 import ZeRO3Strategy

register_strategies()

__all__ = ["FSDP2Strategy", "ZeRO3Strategy", "register_strategies", "shard_hf_module", "transformer_blocks"]
