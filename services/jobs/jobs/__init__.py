"""The job protocol shared by the API and the workers: specs, records, queue, pipelines."""
