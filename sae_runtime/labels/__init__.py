"""Feature labels: the labels file beside an SAE (``store``), building one from a model and
a corpus (``build``), logit effects from the unembedding (``logit_effects``), and the
Hugging Face hook sites both the builder and the tests' oracles use (``hf_sites``)."""
