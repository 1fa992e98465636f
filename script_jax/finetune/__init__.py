"""Fine-tuning and evaluation on GLUE and SQuAD."""
