"""TopK sparse autoencoders: the model with sparse kernels, its SAELens-format files, and the trainer.

    >>> from llama_sae import sae
    >>> model = sae.load("runs/sae")             # SAELens v6 directory
    >>> vals, idx = model.encode_topk(x)         # x [N, d_in] -> [N, k], [N, k]
    >>> x_hat = model(x)                         # reconstruction [N, d_in]

Training: ``llama-sae train --store STORE --out SAE_DIR`` or :func:`llama_sae.sae.train.train_sae`.
"""

from llama_sae.sae.formats import load
from llama_sae.sae.model import SAE, SAEConfig

__all__ = ["SAE", "SAEConfig", "load"]
