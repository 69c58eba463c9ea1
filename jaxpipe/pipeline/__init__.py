"""Pipeline parallelism: partitions, the schedule IR and its lowering, stage programs, the executor, the cost model."""
