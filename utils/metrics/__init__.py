"""What a run reports: the metric logger and its sinks, throughput, FLOPs and MFU."""
