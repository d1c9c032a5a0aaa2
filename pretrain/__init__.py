"""The pretraining job: config, data, training loop, checkpoints, evaluation, metrics."""

import warnings

# megatron-core announces at import time that optional CUDA libraries are absent; we use only
# its CPU-capable parts (datasets), so the notice is noise in every log line of every rank.
warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=r".*Apex is not installed.*")
# DeepSpeed 0.19 still calls the old name of all_gather_into_tensor; torch warns on every rank.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor. is deprecated.*", category=FutureWarning)
