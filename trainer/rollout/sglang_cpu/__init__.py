"""SGLang 0.5.2's classes on CPU: the environment of `nox -s tests_sglang` (requirements.txt, sglang.txt).

SGLang 0.5.2 has no CPU engine (``sglang.Engine`` imports sgl_kernel, which needs CUDA), but the parts the adapter
hands its data to import and run on CPU: ``ServerArgs``, ``io_struct``, ``SamplingParams``,
``MultiprocessingSerializer`` and ``FlattenedTensorBucket``. This environment holds the 0.5.2 wheel (sha256 checked,
installed without its dependencies: they pin torch 2.8.0 and CUDA packages) and only what those modules import.
"""
