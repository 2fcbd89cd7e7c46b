//! Stillness judged from the coded stream, before anything is decoded. With `decode =
//! "keyframes"` and motion gating, most key frames of a still scene would be decoded only for
//! motion to find nothing in them. An encoder that codes what changed (VBR or constant quality,
//! what CCTV cameras use for still scenes) makes the frames of a still scene small and alike: a
//! delta frame carries only noise, and each key frame is about as large as the last. Something
//! entering the picture makes a delta frame larger, or the next key frame differ in size.
//!
//! [`CodedSizes`] learns a stream's usual sizes (a running mean and mean deviation, as TCP
//! estimates round-trip times) and says whether a key frame may show a change. The caller still
//! decodes key frames that motion wants anyway (a zone settling or due for its heartbeat): this
//! only spares the key frames of a still scene.
//!
//! A stream whose delta frames are not small next to its key frames (a constant bitrate
//! encoder spends its bits whether anything moves or not) gives no such signal: every key frame
//! is decoded.

/// How far from the usual a size must be, in mean deviations, to count as a change.
const DEVIATIONS: f64 = 3.0;
/// Weight of each new group of pictures in the running figures (once a few are in).
const ALPHA: f64 = 0.125;
/// Groups of pictures learnt before any key frame is spared.
const LEARN: u32 = 4;
/// Delta frames larger than this share of the key frame on average: the encoder spends its bits
/// whether anything moves or not (constant bitrate, or a scene all noise), its sizes cannot be
/// trusted to follow the scene, nothing is spared. (A still scene's delta frames at constant
/// quality: under 1% of the key frame for a clean picture, about 5% for a noisy one.)
const DELTA_SHARE: f64 = 0.25;
/// Changes smaller than this many bytes (per delta frame), or this share of a key frame, are
/// noise whatever the deviation (an encoder on a perfectly still synthetic picture has none).
const FLOOR_BYTES: f64 = 64.0;
const KEY_FLOOR_SHARE: f64 = 0.01;

/// A running mean and mean absolute deviation: a plain average of the first samples, then an
/// exponential one.
#[derive(Debug, Clone, Copy, Default)]
struct Usual {
    mean: f64,
    dev: f64,
    samples: u32,
}

impl Usual {
    fn update(&mut self, x: f64) {
        self.samples += 1;
        let alpha = ALPHA.max(1.0 / f64::from(self.samples));
        if self.samples > 1 {
            self.dev += alpha * ((x - self.mean).abs() - self.dev);
        }
        self.mean += alpha * (x - self.mean);
    }

    /// Whether `x` lies above the usual by more than the noise.
    fn unusual(&self, x: f64, floor: f64) -> bool {
        self.samples > 0 && x - self.mean > DEVIATIONS * self.dev + floor
    }
}

/// One stream's coded frame sizes.
#[derive(Debug, Default)]
pub struct CodedSizes {
    /// The mean delta frame size of a still group of pictures.
    delta: Usual,
    /// The current group of pictures: its delta frames and their bytes.
    gop_deltas: u32,
    gop_bytes: u64,
    /// The size of the last key frame decoded, and of the last key frame.
    key_decoded: Option<f64>,
    key_last: Option<f64>,
    /// How much a still scene's key frame sizes differ from one to the next.
    key_step: Usual,
    /// The last key frame was decoded (motion has judged it since).
    decoded: bool,
    /// Key frames seen: the first group of pictures (an encoder warming up, a stream joined
    /// midway) teaches nothing.
    keys: u32,
    learnt: u32,
}

impl CodedSizes {
    /// A delta frame of `bytes` went by (it is dropped before the decoder either way).
    pub fn delta(&mut self, bytes: usize) {
        self.gop_deltas += 1;
        self.gop_bytes += bytes as u64;
    }

    /// A key frame of `bytes` arrived: whether to decode it. `needed`: motion wants it whatever
    /// it shows (a zone settling or due for its heartbeat). `still_scene`: motion saw nothing
    /// in the last decoded frame and no zone is settling.
    ///
    /// It is decoded when needed; when the delta frames before it were larger than a still
    /// scene's; when its size differs from the last decoded key frame's by more than key frames
    /// of a still scene differ from one another; and whenever the sizes cannot tell (still
    /// learning, no delta frames, delta frames too large to follow the scene). The groups of
    /// pictures of a still scene teach the usual sizes; so does one decoded for standing out
    /// when motion then found nothing in it (rain, noise that grew at dusk), or the usual would
    /// never catch up with a scene that stays busier.
    pub fn key(&mut self, bytes: usize, needed: bool, still_scene: bool) -> bool {
        let x = bytes as f64;
        let gop = (self.gop_deltas > 0).then(|| self.gop_bytes as f64 / f64::from(self.gop_deltas));
        let judged = self.learnt >= LEARN && gop.is_some();
        let reference = self.key_decoded.unwrap_or(x);
        let follows_scene = self.delta.mean <= DELTA_SHARE * reference;
        let busier = gop.is_some_and(|g| self.delta.unusual(g, FLOOR_BYTES));
        let key_floor = (KEY_FLOOR_SHARE * reference).max(FLOOR_BYTES);
        let moved = self.key_decoded.is_none()
            || (x - reference).abs() > DEVIATIONS * self.key_step.mean + key_floor;
        let stands_out = busier || moved;
        let decode = needed || !judged || !follows_scene || stands_out;
        if still_scene && self.keys > 1 && (!stands_out || self.decoded) {
            if let Some(last) = self.key_last {
                self.key_step.update((x - last).abs());
            }
            if let Some(g) = gop {
                self.delta.update(g);
                self.learnt += 1;
            }
        }
        if decode {
            self.key_decoded = Some(x);
        }
        self.key_last = Some(x);
        self.keys += 1;
        self.gop_deltas = 0;
        self.gop_bytes = 0;
        self.decoded = decode;
        decode
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A still scene's stream: key frames of about 90 kB, delta frames of about 400 B, with a
    /// little noise from a fixed sequence.
    fn still(sizes: &mut CodedSizes, gops: usize) -> Vec<bool> {
        (0..gops)
            .map(|g| {
                for i in 0..24 {
                    sizes.delta(400 + (i * 37 + g * 11) % 60);
                }
                sizes.key(90_000 + (g * 577) % 900, false, true)
            })
            .collect()
    }

    #[test]
    fn a_still_scene_is_learnt_then_spared() {
        let mut sizes = CodedSizes::default();
        let changed = still(&mut sizes, 12);
        assert_eq!(&changed[..3], [true; 3], "learning: {changed:?}");
        assert!(changed[6..].iter().all(|c| !c), "{changed:?}");
    }

    #[test]
    fn an_object_entering_between_key_frames_is_a_change() {
        let mut sizes = CodedSizes::default();
        still(&mut sizes, 8);
        for i in 0..24 {
            sizes.delta(if i == 10 { 6_000 } else { 420 });
        }
        assert!(sizes.key(90_300, false, true));
        // Motion saw it and it stays: its larger key frames are decoded while it settles, then
        // spared.
        for _ in 0..24 {
            sizes.delta(420);
        }
        assert!(sizes.key(97_000, false, false));
        for _ in 0..24 {
            sizes.delta(420);
        }
        assert!(!sizes.key(97_000, false, false));
        for _ in 0..24 {
            sizes.delta(420);
        }
        assert!(sizes.key(97_000, true, false), "needed by motion");
    }

    #[test]
    fn a_key_frame_of_another_size_is_a_change_even_with_still_deltas() {
        // An object pasted in on a key frame, as a synthetic clip can: only the key frame's
        // size tells.
        let mut sizes = CodedSizes::default();
        still(&mut sizes, 8);
        for _ in 0..24 {
            sizes.delta(420);
        }
        assert!(sizes.key(98_000, false, true));
        for _ in 0..24 {
            sizes.delta(420);
        }
        assert!(
            !sizes.key(98_000, false, true),
            "as large as the last decoded"
        );
        for _ in 0..24 {
            sizes.delta(420);
        }
        assert!(
            sizes.key(90_100, false, true),
            "smaller counts too: it went away"
        );
    }

    #[test]
    fn a_constant_bitrate_stream_is_never_spared() {
        let mut sizes = CodedSizes::default();
        let changed: Vec<bool> = (0..10)
            .map(|_| {
                for _ in 0..24 {
                    sizes.delta(30_000);
                }
                sizes.key(100_000, false, true)
            })
            .collect();
        assert!(changed.iter().all(|c| *c), "{changed:?}");
    }

    #[test]
    fn a_scene_that_stays_busier_without_motion_is_learnt_again() {
        // Rain: the delta frames grow for good, motion finds nothing in the key frames decoded
        // for it, and after a while they are spared again.
        let mut sizes = CodedSizes::default();
        still(&mut sizes, 8);
        let rain: Vec<bool> = (0..40)
            .map(|g| {
                for i in 0..24 {
                    sizes.delta(1_500 + (i * 53 + g * 7) % 200);
                }
                sizes.key(93_000, false, true)
            })
            .collect();
        assert!(rain[0], "{rain:?}");
        assert!(rain[30..].iter().all(|c| !c), "{rain:?}");
    }

    #[test]
    fn only_still_groups_teach_the_usual_sizes() {
        // A scene busy from the start (the caller saw motion): nothing is learnt, every key
        // frame is decoded.
        let mut sizes = CodedSizes::default();
        let busy: Vec<bool> = (0..6)
            .map(|g| {
                for _ in 0..24 {
                    sizes.delta(3_000 + g * 500);
                }
                sizes.key(90_000, false, false)
            })
            .collect();
        assert!(busy.iter().all(|c| *c), "{busy:?}");
        // An intra-only stream (no delta frames) cannot be judged.
        let mut intra = CodedSizes::default();
        assert!((0..6).all(|_| intra.key(50_000, false, true)));
    }
}
