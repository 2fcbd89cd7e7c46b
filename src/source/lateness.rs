//! How late a live camera's coded frames reach vigil's decoder, from their stream times alone.
//!
//! A camera sends in real time: stream time and wall time advance together, so their difference
//! stays the same, give or take the network's jitter. When the camera's streaming thread is held
//! up (its key frames wait for a decoder shared with every other camera, all of which saw
//! something at once), the frames behind it wait in the jitter buffer and reach the decoder later
//! and later: the difference grows by as much. Against the least difference seen, it is how late
//! a frame is, with no clock of the camera's to trust. The key frame before the decoder is where
//! vigil can still skip one cheaply: once a key frame is later than the key-frame interval, the
//! camera's next one has reached vigil too, and decoding the old one only adds latency.

use std::time::Duration;

/// How fast the reference follows a lasting offset: 10 ms a second. A camera whose clock runs
/// up to 1% slower than this machine's (its stream time falling behind the wall clock for good)
/// never reads as late, while a backlog, which grows by up to a second each second, still does.
const DRIFT: f64 = 0.01;

#[derive(Debug, Default)]
pub struct Lateness {
    /// The least (wall time - stream time) seen, in nanoseconds, raised by [`DRIFT`] since.
    least: Option<i128>,
    /// The wall time of the last frame.
    last_wall: Option<Duration>,
    /// The stream time of the last key frame, and the interval before it.
    last_key: Option<Duration>,
    interval: Option<Duration>,
}

impl Lateness {
    /// A frame at stream time `pts` reached the decoder's pad at `wall` (any fixed origin):
    /// how much later than the stream's own pace.
    pub fn frame(&mut self, pts: Duration, wall: Duration) -> Duration {
        let offset = wall.as_nanos() as i128 - pts.as_nanos() as i128;
        let least = match (self.least, self.last_wall) {
            (Some(least), Some(last)) => {
                let allowance = wall.saturating_sub(last).as_nanos() as f64 * DRIFT;
                (least + allowance as i128).min(offset)
            }
            _ => offset,
        };
        self.least = Some(least);
        self.last_wall = Some(wall);
        Duration::from_nanos((offset - least) as u64)
    }

    /// A key frame at `pts`, `wall`: whether to skip it, being later than `max_age` and than the
    /// interval from the previous key frame (so the next one has arrived as well). `max_age`
    /// zero: never. A stream whose time goes back (a camera restarted) starts afresh.
    pub fn skip_key(&mut self, pts: Duration, wall: Duration, max_age: Duration) -> bool {
        if self.last_key.is_some_and(|last| pts <= last) {
            *self = Lateness::default();
        }
        let late = self.frame(pts, wall);
        if let Some(last) = self.last_key {
            self.interval = Some(pts - last);
        }
        self.last_key = Some(pts);
        match self.interval {
            Some(interval) if !max_age.is_zero() => late > max_age.max(interval),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn a_stream_on_time_is_never_late_whatever_its_clock_origin() {
        let mut l = Lateness::default();
        for i in 0..50 {
            // Stream time starts at 3600 s, the wall clock at 7 s; 25 fps with 5 ms of jitter.
            let pts = ms(3_600_000 + i * 40);
            let wall = ms(7_000 + i * 40 + (i % 3) * 5);
            assert!(l.frame(pts, wall) <= ms(10));
            if i % 25 == 0 {
                assert!(!l.skip_key(pts, wall, ms(150)));
            }
        }
    }

    #[test]
    fn a_camera_clock_slower_than_ours_never_reads_as_late() {
        let mut l = Lateness::default();
        // An hour at 25 fps of a camera whose clock runs 0.5% slow: its stream time falls
        // behind by 18 s over the hour.
        for i in 0..90_000u64 {
            let pts = ms(i * 40);
            let wall = Duration::from_micros(i * 40_200);
            assert!(l.frame(pts, wall) <= ms(1), "frame {i}");
        }
        // And a real backlog still shows: the next frame held up 1.5 s.
        assert!(
            l.frame(
                ms(90_000 * 40),
                Duration::from_micros(90_000 * 40_200) + ms(1500)
            ) > ms(1400)
        );
    }

    #[test]
    fn a_key_frame_is_skipped_only_when_later_than_the_age_and_the_key_interval() {
        let mut l = Lateness::default();
        assert!(!l.skip_key(ms(0), ms(100), ms(150)));
        // The next key frame 1 s later in the stream, held up 400 ms: late, but the one after
        // it has not been sent yet.
        assert!(!l.skip_key(ms(1000), ms(1500), ms(150)));
        // Held up 1.2 s: the next key frame is here too.
        assert!(l.skip_key(ms(2000), ms(3300), ms(150)));
        // Caught up again.
        assert!(!l.skip_key(ms(3000), ms(3120), ms(150)));
        // max_frame_age = 0: never skipped.
        assert!(!l.skip_key(ms(4000), ms(9000), Duration::ZERO));
    }

    #[test]
    fn the_first_key_frame_and_a_restarted_stream_are_kept() {
        let mut l = Lateness::default();
        // Nothing known of the interval yet.
        assert!(!l.skip_key(ms(5000), ms(100), ms(150)));
        assert!(!l.skip_key(ms(6000), ms(1100), ms(150)));
        // The camera restarted: its stream time begins again, and so does the reckoning.
        assert!(!l.skip_key(ms(0), ms(60_000), ms(150)));
        assert!(!l.skip_key(ms(1000), ms(61_000), ms(150)));
    }

    #[test]
    fn frames_earlier_than_any_before_become_the_reference() {
        let mut l = Lateness::default();
        // The first frames came in a burst at connection (late against what follows).
        assert_eq!(l.frame(ms(0), ms(500)), ms(0));
        assert_eq!(l.frame(ms(40), ms(500)), ms(0));
        assert_eq!(l.frame(ms(80), ms(520)), ms(0));
        assert_eq!(l.frame(ms(120), ms(560)), ms(0));
        // 100 ms late, less the drift allowance of the 140 ms since (1.4 ms).
        let late = l.frame(ms(160), ms(700));
        assert!(late > ms(98) && late <= ms(100), "{late:?}");
    }
}
