"""The workload that runs inside each TD: parameter server, workers, model and data."""
