"""The LightningModules that train a model (causal_lm.py, label_lm.py, classifier.py on base.py),
what they are built from (the classification head and metrics), the methods that make a model trainable
(methods/), and the table a config names them by (task_modules.py)."""
