"""What jobs and evaluations share on the workers: the run's lifecycle, leases, fair turns, the queue
and the worker's metrics."""
