from lightning_memopt.data.prompt import PromptClassificationDataModule, k_shot, read_glue_tsv
from lightning_memopt.data.synthetic import builtin_tokenizer, synthetic_sentiment

__all__ = ["PromptClassificationDataModule", "builtin_tokenizer", "k_shot", "read_glue_tsv", "synthetic_sentiment"]
