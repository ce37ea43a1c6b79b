"""RQ worker for nanochat-stack, and the job protocol the API shares: specs, records, queue."""
