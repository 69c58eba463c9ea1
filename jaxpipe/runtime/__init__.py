"""Process-level machinery: devices, deadlines, failures, fault injection, restarts, tracing."""
