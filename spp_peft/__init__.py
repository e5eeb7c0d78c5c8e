"""spp-peft: SPP (sparsity-preserved parameter-efficient fine-tuning) for HuggingFace PEFT."""

__version__ = "0.1.0"
