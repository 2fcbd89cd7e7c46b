//! Event snapshots (being written).
