//! Prometheus exposition (being written).
