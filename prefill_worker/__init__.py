"""The prefill pool's worker: computes prompts' KV and ships it, with the first token, to the
decode worker that reserved blocks for it (prefill_worker.worker.PrefillWorker)."""
