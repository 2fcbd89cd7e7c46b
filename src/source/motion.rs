//! Motion: per analysed frame and zone, did anything change? Computed on the decoder's luma
//! plane scaled down to `height` rows: blurred, compared with a running-average background,
//! thresholded, its blobs kept when large enough. A change over most of the frame is a change of
//! light (lamps, the IR switch at dusk, a cloud), not motion: the background is taken again.
//! [`Schedule`] turns motion into the zones due for analysis: where something moves, for a
//! settle time after, and at least every `max_interval` anyway.

use std::time::Duration;

use opencv::core::{CV_8UC1, CV_32F, Mat, Point, Rect, Size, Vector};
use opencv::imgproc;
use opencv::prelude::*;
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MotionConfig {
    /// Analyse a frame (a zone) only where something changed.
    pub enabled: bool,
    /// Rows of the scaled-down luma image motion is computed on, at least (the frame is scaled
    /// down by the largest whole factor that divides both its sides and keeps this many).
    pub height: u32,
    /// A pixel changed when it differs from the background by more than this (0-255).
    pub threshold: u8,
    /// The smallest moving blob, as a fraction of the frame (rain, snow and leaves stay below).
    pub min_area: f64,
    /// How much of each analysed frame goes into the background (how fast it follows slow
    /// changes).
    pub alpha: f64,
    /// A change over this fraction of the frame is a change of light: the background is taken
    /// again, nothing is reported.
    pub recalibrate_above: f64,
    /// After motion stops in a zone, keep analysing it this long (so an event can be confirmed).
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
    /// Analyse every zone at least this often anyway (slow changes).
    #[serde(with = "humantime_serde")]
    pub max_interval: Duration,
    /// With `decode = "keyframes"`: a key frame whose coded size, and the sizes of the delta
    /// frames before it, say the scene is still is not decoded at all (`coded.rs`), unless a
    /// zone is settling or due for its heartbeat.
    pub coded: bool,
}

impl Default for MotionConfig {
    fn default() -> Self {
        MotionConfig {
            enabled: false,
            height: 100,
            threshold: 25,
            min_area: 0.002,
            alpha: 0.05,
            recalibrate_above: 0.4,
            // As long as events.cooldown's default: an object that leaves is analysed gone
            // long enough for its event to end.
            settle: Duration::from_secs(3),
            max_interval: Duration::from_secs(30),
            coded: true,
        }
    }
}

/// What a frame showed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Motion {
    /// Moving blobs, `[x0, y0, x1, y1]` as fractions of the frame.
    pub boxes: Vec<[f32; 4]>,
    /// Fraction of the frame that changed (before the blobs were filtered).
    pub changed: f32,
    /// The frame was taken as the new background (the first one, a new size, a change of light).
    pub recalibrated: bool,
}

impl Motion {
    /// Whether a blob overlaps `rect` (fractions of the frame).
    pub fn in_rect(&self, rect: [f32; 4]) -> bool {
        self.boxes
            .iter()
            .any(|b| b[0] < rect[2] && rect[0] < b[2] && b[1] < rect[3] && rect[1] < b[3])
    }
}

/// One camera's motion detector; its buffers are reused from frame to frame.
pub struct MotionDetector {
    cfg: MotionConfig,
    small: Mat,
    blurred: Mat,
    current: Mat,
    background: Mat,
    /// The background as it was when nothing moved last: what an object that left uncovers.
    empty: Mat,
    /// A blob's difference from `empty`, and where it is over the threshold.
    ghost_diff: Mat,
    ghost_mask: Mat,
    diff: Mat,
    mask: Mat,
    dilated: Mat,
    contours: Vector<Vector<Point>>,
}

impl MotionDetector {
    pub fn new(cfg: &MotionConfig) -> MotionDetector {
        MotionDetector {
            cfg: cfg.clone(),
            small: Mat::default(),
            blurred: Mat::default(),
            current: Mat::default(),
            background: Mat::default(),
            empty: Mat::default(),
            ghost_diff: Mat::default(),
            ghost_mask: Mat::default(),
            diff: Mat::default(),
            mask: Mat::default(),
            dilated: Mat::default(),
            contours: Vector::new(),
        }
    }

    /// Motion in an 8-bit luma image (any size; it is scaled down first).
    pub fn detect(
        &mut self,
        luma: &(impl MatTraitConst + opencv::core::ToInputArray),
    ) -> opencv::Result<Motion> {
        let (w, h) = (luma.cols(), luma.rows());
        if w < 2 || h < 2 || luma.typ() != CV_8UC1 {
            return Err(opencv::Error::new(
                opencv::core::StsBadArg,
                format!(
                    "motion needs an 8-bit luma image, got {w}x{h} of type {}",
                    luma.typ()
                ),
            ));
        }
        // An integer factor that divides both sides: OpenCV's averaging resize then takes its
        // fast path (several times faster than for a fractional factor).
        let most = (h / self.cfg.height.max(1) as i32).max(1);
        let k = (1..=most)
            .rev()
            .find(|k| w % k == 0 && h % k == 0)
            .unwrap_or(1);
        let (sw, sh) = (w / k, h / k);
        imgproc::resize(
            luma,
            &mut self.small,
            Size::new(sw, sh),
            0.0,
            0.0,
            imgproc::INTER_AREA,
        )?;
        imgproc::gaussian_blur_def(&self.small, &mut self.blurred, Size::new(5, 5), 0.0)?;
        self.blurred
            .convert_to(&mut self.current, CV_32F, 1.0, 0.0)?;
        if self.background.size()? != self.current.size()? {
            return self.recalibrate(0.0);
        }
        opencv::core::absdiff(&self.current, &self.background, &mut self.diff)?;
        over_threshold(&self.diff, &mut self.dilated, self.cfg.threshold)?;
        self.dilated.convert_to(&mut self.mask, CV_8UC1, 1.0, 0.0)?;
        let area = (sw * sh) as f64;
        let changed = opencv::core::count_non_zero(&self.mask)? as f64 / area;
        if changed > self.cfg.recalibrate_above {
            return self.recalibrate(changed as f32);
        }
        let boxes = self.blobs(sw, sh)?;
        let ghosts = self.heal_ghosts(&boxes)?;
        imgproc::accumulate_weighted_def(&self.current, &mut self.background, self.cfg.alpha)?;
        if boxes.len() == ghosts {
            self.background.copy_to(&mut self.empty)?;
        }
        Ok(Motion {
            boxes,
            changed: changed as f32,
            recalibrated: false,
        })
    }

    /// The blobs of the changed pixels at least `min_area` large, as fractions of the frame.
    fn blobs(&mut self, sw: i32, sh: i32) -> opencv::Result<Vec<[f32; 4]>> {
        // Join the pieces of one moving thing.
        let kernel = Mat::default();
        imgproc::dilate(
            &self.mask,
            &mut self.dilated,
            &kernel,
            Point::new(-1, -1),
            2,
            opencv::core::BORDER_CONSTANT,
            imgproc::morphology_default_border_value()?,
        )?;
        imgproc::find_contours_def(
            &self.dilated,
            &mut self.contours,
            imgproc::RETR_EXTERNAL,
            imgproc::CHAIN_APPROX_SIMPLE,
        )?;
        let min_area = self.cfg.min_area * (sw * sh) as f64;
        let mut boxes = Vec::new();
        for contour in self.contours.iter() {
            if imgproc::contour_area_def(&contour)? < min_area {
                continue;
            }
            let Rect {
                x,
                y,
                width,
                height,
            } = imgproc::bounding_rect(&contour)?;
            boxes.push([
                x as f32 / sw as f32,
                y as f32 / sh as f32,
                (x + width) as f32 / sw as f32,
                (y + height) as f32 / sh as f32,
            ]);
        }
        Ok(boxes)
    }

    /// Heals the background under the blobs that are ghosts, and counts them: where an object
    /// stood long enough to seep into the running background and has left, the frame differs
    /// from the background but matches the empty scene again. There the background is taken
    /// from the frame at once, so that the ghost is motion this once (the object leaving is a
    /// change: its event must see it gone) instead of for as long as it takes to fade, keeping
    /// the zone analysed for nothing.
    fn heal_ghosts(&mut self, boxes: &[[f32; 4]]) -> opencv::Result<usize> {
        if boxes.is_empty() || self.empty.size()? != self.current.size()? {
            return Ok(0);
        }
        let (w, h) = (self.current.cols() as f32, self.current.rows() as f32);
        let mut ghosts = 0;
        for b in boxes {
            let (x0, y0) = ((b[0] * w) as i32, (b[1] * h) as i32);
            let (x1, y1) = ((b[2] * w).ceil() as i32, (b[3] * h).ceil() as i32);
            let rect = Rect::new(x0, y0, (x1 - x0).max(1), (y1 - y0).max(1));
            let moved = opencv::core::count_non_zero(&Mat::roi(&self.mask, rect)?)?;
            opencv::core::absdiff(
                &Mat::roi(&self.current, rect)?,
                &Mat::roi(&self.empty, rect)?,
                &mut self.ghost_diff,
            )?;
            over_threshold(&self.ghost_diff, &mut self.ghost_mask, self.cfg.threshold)?;
            let unlike_empty = opencv::core::count_non_zero(&self.ghost_mask)?;
            if unlike_empty * 4 < moved {
                let mut under = Mat::roi_mut(&mut self.background, rect)?;
                Mat::roi(&self.current, rect)?.copy_to(&mut under)?;
                ghosts += 1;
            }
        }
        Ok(ghosts)
    }

    /// Takes the current frame as the background; reports no motion.
    fn recalibrate(&mut self, changed: f32) -> opencv::Result<Motion> {
        self.current.copy_to(&mut self.background)?;
        self.current.copy_to(&mut self.empty)?;
        Ok(Motion {
            boxes: Vec::new(),
            changed,
            recalibrated: true,
        })
    }
}

/// Marks in `mask` the pixels of `diff` over `threshold`.
fn over_threshold(diff: &Mat, mask: &mut Mat, threshold: u8) -> opencv::Result<()> {
    imgproc::threshold(
        diff,
        mask,
        f64::from(threshold),
        255.0,
        imgproc::THRESH_BINARY,
    )?;
    Ok(())
}

/// When each zone of a camera is due for analysis.
pub struct Schedule {
    settle: Duration,
    max_interval: Duration,
    /// Per zone: the stream time of its last analysis and of its last motion.
    zones: Vec<(Option<Duration>, Option<Duration>)>,
}

impl Schedule {
    pub fn new(cfg: &MotionConfig, zones: usize) -> Schedule {
        Schedule {
            settle: cfg.settle,
            max_interval: cfg.max_interval,
            zones: vec![(None, None); zones],
        }
    }

    /// Whether a frame at stream time `now` would be analysed in some zone from `first` on
    /// whatever it shows: (a zone never analysed or due for its heartbeat, a zone settling).
    pub fn wants(&self, first: usize, now: Duration) -> (bool, bool) {
        let zones = &self.zones[first..];
        let stale = zones
            .iter()
            .any(|(a, _)| a.is_none_or(|a| now.saturating_sub(a) >= self.max_interval));
        let settling = zones.iter().any(|&(a, m)| self.settling(now, a, m));
        (stale, settling)
    }

    /// Whether a zone analysed last at `analysed`, that moved last at `motion`, is still settling
    /// at `now`: within `settle` of its motion, and until a frame at or after that is analysed.
    /// Frames come at their own times (a key frame every second or so, with jitter): the frame
    /// that first reaches the end of `settle` is analysed too, so that an event with a `cooldown`
    /// of `settle` or less sees its object gone long enough to end.
    fn settling(
        &self,
        now: Duration,
        analysed: Option<Duration>,
        motion: Option<Duration>,
    ) -> bool {
        motion.is_some_and(|m| {
            now.saturating_sub(m) <= self.settle || analysed.is_some_and(|a| a < m + self.settle)
        })
    }

    /// Whether zone `i` is due at stream time `now`, given whether it shows motion; a due zone
    /// counts as analysed now.
    pub fn due(&mut self, i: usize, now: Duration, moving: bool) -> bool {
        if moving {
            self.zones[i].1 = Some(now);
        }
        let (analysed, motion) = self.zones[i];
        let settling = self.settling(now, analysed, motion);
        let stale = analysed.is_none_or(|a| now.saturating_sub(a) >= self.max_interval);
        let due = settling || stale;
        if due {
            self.zones[i].0 = Some(now);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opencv::core::{Scalar, randn};

    fn cfg() -> MotionConfig {
        MotionConfig {
            enabled: true,
            ..Default::default()
        }
    }

    /// A 640x480 grey scene with sensor noise, and a dark square at `square` (pixels) if any.
    fn scene(seed: i32, brightness: f64, square: Option<(i32, i32)>) -> Mat {
        let mut m = Mat::new_rows_cols_with_default(480, 640, CV_8UC1, Scalar::all(0.0)).unwrap();
        opencv::core::set_rng_seed(seed).unwrap();
        randn(&mut m, &Scalar::all(brightness), &Scalar::all(4.0)).unwrap();
        if let Some((x, y)) = square {
            let mut roi = Mat::roi_mut(&mut m, Rect::new(x, y, 80, 80)).unwrap();
            roi.set_to_def(&Scalar::all(20.0)).unwrap();
        }
        m
    }

    #[test]
    fn noise_alone_is_no_motion_and_an_object_is_boxed_where_it_is() {
        let mut d = MotionDetector::new(&cfg());
        assert!(d.detect(&scene(1, 128.0, None)).unwrap().recalibrated);
        for seed in 2..10 {
            let m = d.detect(&scene(seed, 128.0, None)).unwrap();
            assert!(m.boxes.is_empty(), "noise gave {m:?}");
        }
        // A square in the top-left quarter.
        let m = d.detect(&scene(11, 128.0, Some((100, 80)))).unwrap();
        assert_eq!(m.boxes.len(), 1, "{m:?}");
        assert!(m.in_rect([0.0, 0.0, 0.5, 0.5]), "{m:?}");
        assert!(!m.in_rect([0.5, 0.5, 1.0, 1.0]), "{m:?}");
    }

    #[test]
    fn a_change_of_light_recalibrates_instead_of_moving() {
        let mut d = MotionDetector::new(&cfg());
        d.detect(&scene(1, 100.0, None)).unwrap();
        d.detect(&scene(2, 100.0, None)).unwrap();
        // The lights come on: everything is 60 brighter.
        let m = d.detect(&scene(3, 160.0, None)).unwrap();
        assert!(m.recalibrated && m.boxes.is_empty(), "{m:?}");
        let m = d.detect(&scene(4, 160.0, None)).unwrap();
        assert!(!m.recalibrated && m.boxes.is_empty(), "{m:?}");
    }

    #[test]
    fn an_object_that_leaves_is_motion_once_not_a_lasting_ghost() {
        let mut d = MotionDetector::new(&MotionConfig {
            alpha: 0.1,
            ..cfg()
        });
        for seed in 1..4 {
            d.detect(&scene(seed, 128.0, None)).unwrap();
        }
        // A square stands long enough to seep into the background, then leaves.
        for seed in 4..10 {
            let m = d.detect(&scene(seed, 128.0, Some((100, 80)))).unwrap();
            assert_eq!(m.boxes.len(), 1, "{m:?}");
        }
        let m = d.detect(&scene(10, 128.0, None)).unwrap();
        assert!(m.in_rect([0.0, 0.0, 0.5, 0.5]), "it left: {m:?}");
        for seed in 11..14 {
            let m = d.detect(&scene(seed, 128.0, None)).unwrap();
            assert!(m.boxes.is_empty(), "frame {seed}: {m:?}");
        }
        // A second square elsewhere is still motion.
        let m = d.detect(&scene(14, 128.0, Some((400, 300)))).unwrap();
        assert!(
            m.in_rect([0.5, 0.5, 1.0, 1.0]) && m.boxes.len() == 1,
            "{m:?}"
        );
    }

    #[test]
    fn a_blob_below_min_area_is_ignored() {
        let mut d = MotionDetector::new(&MotionConfig {
            min_area: 0.05,
            ..cfg()
        });
        d.detect(&scene(1, 128.0, None)).unwrap();
        // 80x80 of 640x480 is about 2% of the frame.
        let m = d.detect(&scene(2, 128.0, Some((300, 200)))).unwrap();
        assert!(m.boxes.is_empty(), "{m:?}");
        assert!(m.changed > 0.01, "{m:?}");
    }

    #[test]
    fn a_zone_is_due_while_it_moves_while_it_settles_and_at_the_heartbeat() {
        let mut s = Schedule::new(
            &MotionConfig {
                settle: Duration::from_secs(2),
                max_interval: Duration::from_secs(10),
                ..cfg()
            },
            1,
        );
        let at = |t: u64| Duration::from_secs(t);
        assert!(s.due(0, at(0), false), "the first frame is analysed");
        assert!(!s.due(0, at(1), false));
        assert!(s.due(0, at(2), true), "motion");
        assert!(s.due(0, at(4), false), "settling");
        assert!(!s.due(0, at(5), false), "settled");
        assert!(!s.due(0, at(13), false));
        assert!(
            s.due(0, at(14), false),
            "heartbeat: 10 s since the last analysis"
        );
        // Frames further apart than the settle time allows: the first one past it still counts.
        let ms = Duration::from_millis;
        assert!(s.due(0, ms(20_000), true));
        assert!(s.due(0, ms(21_100), false));
        assert!(
            s.due(0, ms(22_100), false),
            "the first frame past the 2 s of settling"
        );
        assert!(!s.due(0, ms(23_100), false), "settled");
    }
}
