"""Export to and import from other ecosystems.

  hf              the command: python -m script_jax.interop.hf
  hf_export       our runs -> HuggingFace folders, and the import entry points re-exported
  hf_params       our parameter trees <-> HuggingFace ELECTRA/BERT tensors (NumPy)
  hf_tokenizer    our tokenizers <-> HuggingFace tokenizer files
  hf_folder       a HuggingFace folder on disk: config.json, weights, checks
  hf_import       fine-tuning and continued pretraining from a HuggingFace folder
"""
