"""Checkpoint conversion between HF safetensors and megatron-core state, and DeepSeek-V3's fp8 → bf16 cast.

``python -m trainer.convert`` (``nox -s convert -- ...``): ``hf-to-mcore``, ``mcore-to-hf``, ``verify``,
``fp8-to-bf16``, ``drop-config-key``, ``set-config``. Work streams shard by shard; every output
directory is written to a temporary sibling and renamed into place. megatron-core state is unsharded
(global names, ``hf_mcore``) or sharded for a matrix layout's TP/PP/EP/ETP (local names per rank, ``sharded``).
"""


from trainer.models.weight_files import WeightsError


class ConvertError(WeightsError):
    """Bad user input (a directory, a checkpoint, an option): one line for the user, exit code 2. A WeightsError,
    as the weights readers the converter uses raise: one ``except WeightsError`` catches both."""
