"""snaketune: reproducible LLM fine-tuning steps, one module per workflow step.

Each step module runs on its own (``python -m snaketune.<step> --help``) and is what the
Snakemake rules call.
"""

import logging

__version__ = "0.1.0"

# Expected, not actionable: on AVX512-BF16 CPUs bitsandbytes tries on every import to fetch a 4-bit
# gemm kernel from the hub (the `kernels` package) and warns that it cannot; its own kernel runs.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community"))
