"""The application core both doors call: admission and limits, tokenization, the check of a
request (``validate``), the generate loop with guardrails, read assembly (``feed``), the
stream outbox (``outbox``), metrics, and the read channel's server end (``reads``). It
speaks its own types (``types``) and no wire format; ``service.Core`` is the entry point."""
