from lightning_memopt.models.configs import LLAMA_SIZES, llama_config
from lightning_memopt.models.hf import HFCausalLM, load_hf_model, position_ids_from_mask
from lightning_memopt.tokenization import load_tokenizer

__all__ = [
    "HFCausalLM", "LLAMA_SIZES", "llama_config", "load_hf_model", "load_tokenizer", "position_ids_from_mask",
]
