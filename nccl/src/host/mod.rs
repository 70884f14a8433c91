//! The host (CPU) backend: NCCL's collectives over host memory, ranks as threads or processes.
