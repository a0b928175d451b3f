from lightning_memopt.models.configs import LLAMA_SIZES, llama_config
from lightning_memopt.models.hf import HFCausalLM, load_hf_model, load_tokenizer, no_decay, position_ids_from_mask

__all__ = [
    "HFCausalLM", "LLAMA_SIZES", "llama_config", "load_hf_model", "load_tokenizer", "no_decay", "position_ids_from_mask",
]
