"""SAE math, file formats, intervention specs and kernels.

Everything here is plain PyTorch and runs on CPU. Only the ``sae_runtime.vllm``
package imports vLLM.
"""
