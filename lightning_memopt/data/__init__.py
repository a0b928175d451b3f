from lightning_memopt.data.instruct import InstructionDataModule
from lightning_memopt.data.prompt import PromptClassificationDataModule, k_shot, read_glue_tsv
from lightning_memopt.data.qa import SQuADDataModule, read_squad
from lightning_memopt.data.synthetic import synthetic_sentiment
from lightning_memopt.data.tables import read_table
from lightning_memopt.tokenization import builtin_tokenizer

__all__ = [
    "InstructionDataModule", "PromptClassificationDataModule", "SQuADDataModule", "builtin_tokenizer", "k_shot",
    "read_glue_tsv", "read_squad", "read_table", "synthetic_sentiment",
]
