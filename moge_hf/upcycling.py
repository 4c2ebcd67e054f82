"""Sparse upcycling (Komatsuzaki et al. 2023): MoGE models initialized from dense GPT-2 / ViT checkpoints."""


def upcycle_from_dense(moge_class, dense_model_or_path, *, expert_noise_std: float = 0.0, **config_overrides):
    raise NotImplementedError("sparse upcycling is being written")
