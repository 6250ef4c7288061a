"""The meta-learning engine on any Hugging Face causal LM."""
