"""The model side: building a model and finding its parts (models.py, architecture.py), generating with it
(generation.py), the methods that make it trainable (methods/), and the LightningModules that train it
(causal_lm.py, label_lm.py, classifier.py, sharing base_module.py); registry.py names them for configs."""
