"""essa: align LLMs with evolution strategies over the singular values of LoRA adapters.

From Python: `essa.train(recipe, train_dataset=ds, reward_funcs=[f])` (essa/api.py, docs/python.md).
"""

__version__ = "0.1.0"

import logging

# bitsandbytes warns at import, on CPUs with AVX512-BF16, that it cannot fetch an optional kernel from
# the Hub (essa runs offline), and on every int8 matmul that fp32 inputs are cast to fp16: nothing a
# user can act on. Set before anything imports bitsandbytes; its errors still show.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def __getattr__(name: str):
    # Lazily, so that `import essa` (and the CLI's --help) does not import torch.
    if name in ("train", "Result"):
        from essa import api

        return getattr(api, name)
    raise AttributeError(f"module 'essa' has no attribute {name!r}")
