"""The model side, without Lightning: building a model and its tokenizer (models.py), finding its parts
(architecture.py), generating with it (generation.py), log-likelihoods of answers (log_probs.py), placing
vectors at its embedding layer (injection.py) and checking it for padding-free batches (padding_free.py)."""
