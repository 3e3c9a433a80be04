"""Offline: how the embedded default (``server/embedded``) was made — corpus, tokenizer,
model, SAE, transcoder, labels and calibration (``make train-default``). Neither the server
nor the worker imports this package, but for ``vectors_fit``: the pure math of the server's
``TrainVector`` (steering vectors fitted from contrastive examples)."""
