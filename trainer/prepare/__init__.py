"""`nox -s prepare -- RECIPE`: from nothing on disk to what the recipe trains from, step by step.

The steps, in order (each only where the recipe needs it): fetch the weights (huggingface_hub or modelscope, as
the matrix model says) or take them from ``--from DIR``; cast fp8 → bf16; the model's config fixes; convert to
megatron-core sharded for the recipe's layout (FSDP recipes train from the HF folder); fetch and preprocess
MATH-lighteval. ``places`` says where each lands (the matrix's ``prepared`` folder and the recipe's ``data.path``),
``manifest`` records each finished step with the hashes of its inputs and outputs, ``steps`` plans them and
``run`` executes the plan.
"""


class PrepareError(Exception):
    """Bad input or an unmet need (no hub, no disk, a bad --from folder): one line, exit code 2."""
