"""Data: the bundled corpus and user corpora -> tokenizer -> megatron-core indexed datasets ->
deterministic, resumable training samples and in-order evaluation windows.

CLI: `python -m pretrain.data {fetch,prepare,inspect}`.
"""
from pretrain.data.corpus import DataError, Document
from pretrain.data.loader import Batch, SampleStream, TokenStream, build_train_dataset, micro_batch_start
from pretrain.data.tokenizer import Tokenizer

__all__ = ["Batch", "DataError", "Document", "SampleStream", "TokenStream", "Tokenizer",
           "build_train_dataset", "micro_batch_start"]
