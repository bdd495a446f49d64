"""Training tools for gitfast's embedded default model (``gitfast/assets/git-shapes``).

``shapes`` draws the synthetic captioning data set, ``train_embedded`` trains a tiny GIT model on it
with transformers' ``GitForCausalLM`` (the reference), ``evaluate`` measures held-out quality.
"""
