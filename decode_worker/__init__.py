"""The decode pool's worker: receives prompts' KV into reserved blocks and generates with
continuous batching (decode_worker.worker.DecodeWorker); also the colocated worker."""
