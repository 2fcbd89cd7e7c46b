//! Where a camera's frames wait for a preprocess worker: a bounded queue with a named policy for
//! when it is full.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::frame::Frame;
use crate::shutdown::Shutdown;
use crate::stats::CameraStats;
use crate::sync::lock;

/// What a full queue does with the next frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullPolicy {
    /// Live sources: the oldest queued frame goes (counted as dropped behind), so that vigil
    /// analyses fresh frames instead of adding latency.
    DropOldest,
    /// Files analysed as fast as vigil can: the source waits for room, nothing is lost.
    Block,
}

/// A camera's frame queue.
pub struct FrameQueue {
    camera: Arc<str>,
    tx: Mutex<Option<Sender<Frame>>>,
    policy: FullPolicy,
    /// DropOldest keeps a receiver to take the oldest frame out.
    oldest: Receiver<Frame>,
    stop: Shutdown,
    pub stats: Arc<CameraStats>,
}

impl FrameQueue {
    pub fn new(
        camera: Arc<str>,
        (tx, rx): (Sender<Frame>, Receiver<Frame>),
        policy: FullPolicy,
        stop: Shutdown,
        stats: Arc<CameraStats>,
    ) -> FrameQueue {
        FrameQueue {
            camera,
            tx: Mutex::new(Some(tx)),
            policy,
            oldest: rx,
            stop,
            stats,
        }
    }

    pub fn camera(&self) -> &Arc<str> {
        &self.camera
    }

    pub fn policy(&self) -> FullPolicy {
        self.policy
    }

    /// Queues a frame. Returns false once the queue is closed or the camera is stopping.
    pub fn push(&self, frame: Frame) -> bool {
        let guard = lock(&self.tx);
        let Some(tx) = guard.as_ref() else {
            return false;
        };
        let queued = frame.meta.index + 1;
        let pushed = self.send(tx, frame);
        if pushed {
            self.stats.last_queued.store(queued, Ordering::Relaxed);
        }
        pushed
    }

    fn send(&self, tx: &Sender<Frame>, mut frame: Frame) -> bool {
        match self.policy {
            FullPolicy::DropOldest => loop {
                match tx.try_send(frame) {
                    Ok(()) => return true,
                    Err(TrySendError::Full(f)) => {
                        if self.oldest.try_recv().is_ok() {
                            self.stats.dropped_queue.fetch_add(1, Ordering::Relaxed);
                        }
                        frame = f;
                    }
                    Err(TrySendError::Disconnected(_)) => return false,
                }
            },
            FullPolicy::Block => {
                if self.stop.is_stopped() {
                    return false;
                }
                crossbeam_channel::select! {
                    send(tx, frame) -> sent => sent.is_ok(),
                    recv(self.stop.receiver()) -> _ => false,
                }
            }
        }
    }

    /// No more frames: lets the stages downstream finish.
    pub fn close(&self) {
        lock(&self.tx).take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FrameMeta, Pixels};

    fn frame(index: u64) -> Frame {
        Frame {
            meta: FrameMeta::new("cam".into(), index, None),
            pixels: Pixels::Mat(opencv::core::Mat::default()),
        }
    }

    fn queue(policy: FullPolicy, capacity: usize) -> (FrameQueue, Receiver<Frame>, Shutdown) {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        let stop = Shutdown::new();
        let stats = Arc::new(CameraStats::new("test".into()));
        let q = FrameQueue::new("cam".into(), (tx, rx.clone()), policy, stop.clone(), stats);
        (q, rx, stop)
    }

    #[test]
    fn drop_oldest_keeps_the_newest_frames_and_counts_the_rest() {
        let (q, rx, _) = queue(FullPolicy::DropOldest, 2);
        for i in 0..5 {
            assert!(q.push(frame(i)));
        }
        let kept: Vec<u64> = rx.try_iter().map(|f| f.meta.index).collect();
        assert_eq!(kept, [3, 4]);
        assert_eq!(q.stats.dropped_queue.load(Ordering::Relaxed), 3);
        assert_eq!(q.stats.last_queued.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn block_waits_for_room_and_gives_up_on_stop() {
        let (q, rx, stop) = queue(FullPolicy::Block, 1);
        assert!(q.push(frame(0)));
        let q = Arc::new(q);
        let pusher = {
            let q = q.clone();
            std::thread::spawn(move || q.push(frame(1)))
        };
        // The second push waits until the first frame is taken.
        assert_eq!(rx.recv().unwrap().meta.index, 0);
        assert!(pusher.join().unwrap());
        // Full again (frame 1): a push waits, and the stop releases it with false.
        let blocked = {
            let q = q.clone();
            std::thread::spawn(move || q.push(frame(3)))
        };
        stop.stop();
        assert!(!blocked.join().unwrap());
        assert_eq!(q.stats.dropped_queue.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_closed_queue_refuses_frames() {
        let (q, _rx, _) = queue(FullPolicy::DropOldest, 2);
        q.close();
        assert!(!q.push(frame(0)));
    }
}
