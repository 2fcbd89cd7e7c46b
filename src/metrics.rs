//! Counters every stage and camera keeps, for the periodic log summary (and later, `/metrics`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// What one stage received, sent, dropped and how long it was busy.
#[derive(Debug, Default)]
pub struct StageStats {
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
    pub busy_ns: AtomicU64,
}

impl StageStats {
    pub fn received(&self, n: u64) {
        self.received.fetch_add(n, Relaxed);
    }
    pub fn sent(&self, n: u64) {
        self.sent.fetch_add(n, Relaxed);
    }
    pub fn dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Relaxed);
    }
    /// Adds the time since `since` to the busy time.
    pub fn busy_since(&self, since: Instant) {
        self.busy_ns
            .fetch_add(since.elapsed().as_nanos() as u64, Relaxed);
    }
    pub fn snapshot(&self) -> StageSnapshot {
        StageSnapshot {
            received: self.received.load(Relaxed),
            sent: self.sent.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            busy: Duration::from_nanos(self.busy_ns.load(Relaxed)),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageSnapshot {
    pub received: u64,
    pub sent: u64,
    pub dropped: u64,
    pub busy: Duration,
}

/// One camera's frame counters.
#[derive(Debug, Default)]
pub struct CameraStats {
    /// Frames that came out of the decoder.
    pub frames: AtomicU64,
    /// Frames skipped to keep to `analyze_fps`.
    pub skipped_rate: AtomicU64,
    /// Frames dropped because vigil was behind (live sources: oldest first).
    pub dropped_queue: AtomicU64,
    /// Pipeline (re)starts after the first.
    pub restarts: AtomicU64,
}

impl CameraStats {
    pub fn snapshot(&self) -> [u64; 4] {
        [
            self.frames.load(Relaxed),
            self.skipped_rate.load(Relaxed),
            self.dropped_queue.load(Relaxed),
            self.restarts.load(Relaxed),
        ]
    }
}
