"""Model families as adapters: where a family keeps its layers, and how to run its batches.

Each module adapts one family of models to the core API, in terms of :class:`~degen_hooks.Site`
objects and plain functions; nothing in the core imports them, and none of them imports its
family's package at import time (a model's family is told from its classes' modules):

* :mod:`degen_hooks.families.hf`: Hugging Face ``transformers`` decoder models (GPT-2,
  Llama-style): residual-stream and MLP sites of every decoder layer, padding masks from
  ``attention_mask``, a forward pass of a batch dict.

Use them as ``from degen_hooks.families import hf``.
"""
