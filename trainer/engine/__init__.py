"""The distributed engine: processes, devices, precision, gradient sync (distributed); the speed settings (fast); one assembly of a job (setup); stopping for the cluster (preemption)."""
