import os


# Tests never touch the network: every model is built here, tiny and random.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
