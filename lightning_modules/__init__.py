"""LightningModules and the pieces they are built from; lightning_modules/registry.py names them for
configs."""
