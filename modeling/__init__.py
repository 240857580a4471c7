"""The model side, without Lightning: building a model and its tokenizer (models.py, checked by
model_checks.py), finding its parts (discovery.py) and serving them (architecture.py), generating with it
(generation.py on decoding.py and continuous_batching.py), log-likelihoods of answers (log_probs.py), placing
vectors at its embedding layer (injection.py), checking it for padding-free batches (padding_free.py), the
training forward and backward that compute only what the loss needs (supervised.py, packed_attention.py,
tied_embedding.py), and the projection-head classifier over it with label-likelihood scores
(classifier_head.py)."""
