"""Open release: a run packaged the way LLM360 released Crystal (checkpoints, data order, logs, card)."""
