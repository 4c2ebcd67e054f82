import os


# Tests never touch the network: every model is built here, tiny and random.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# Without a GPU, moge_hf's Triton kernels run (slowly, for correctness) in Triton's interpreter. Triton reads the
# variable when the kernels are defined, at the first `import moge_hf`: it must be set before any test imports it.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
