"""snaketune: reproducible LLM fine-tuning steps, one module per workflow step.

Each step module runs on its own (``python -m snaketune.<step> --help``) and is what the
Snakemake rules call.
"""

__version__ = "0.1.0"
