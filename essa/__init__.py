"""essa: align LLMs with evolution strategies over the singular values of LoRA adapters."""

__version__ = "0.1.0"

import logging

# bitsandbytes warns at import, on CPUs with AVX512-BF16, that it cannot fetch an optional kernel from
# the Hub (essa runs offline), and on every int8 matmul that fp32 inputs are cast to fp16: nothing a
# user can act on. Set before anything imports bitsandbytes; its errors still show.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
