"""Input and output: checkpoints (Hugging Face folders, GGUF conversion into the cache), tokenizer and
streaming text."""
