//! A camera's zones (`[cameras.<name>.zones.<zone>]`): named parts of the frame classified on
//! their own, and the regions of a frame that are classified (the zones, the whole frame or both).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use crate::frame::{Due, Zone};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    /// `[x0, y0, x1, y1]` as fractions of the frame (a zone survives resolution changes).
    /// Default: the bounding box of `polygon`.
    pub rect: Option<[f64; 4]>,
    /// `[[x, y], ...]` as fractions of the frame: pixels outside it are masked (given the mean
    /// colour, which the model reads as nothing).
    pub polygon: Option<Vec<[f64; 2]>>,
    /// Per class or group thresholds in this zone, over the camera's and `decide.thresholds`.
    #[serde(default)]
    pub thresholds: BTreeMap<String, f32>,
    /// The head that labels this zone (over the camera's `head`).
    #[serde(default)]
    pub head: Option<String>,
}

impl ZoneConfig {
    /// The zone's rectangle: `rect`, else the polygon's bounding box.
    pub fn bounds(&self) -> Option<[f64; 4]> {
        if let Some(r) = self.rect {
            return Some(r);
        }
        let p = self.polygon.as_ref().filter(|p| !p.is_empty())?;
        let xs = p.iter().map(|v| v[0]);
        let ys = p.iter().map(|v| v[1]);
        Some([
            xs.clone().fold(f64::INFINITY, f64::min),
            ys.clone().fold(f64::INFINITY, f64::min),
            xs.fold(f64::NEG_INFINITY, f64::max),
            ys.fold(f64::NEG_INFINITY, f64::max),
        ])
    }
}

/// The most zones a camera may have.
pub const MAX_ZONES: usize = 32;

/// The regions of a camera's frames that are classified.
#[derive(Debug, Clone, PartialEq)]
pub struct Regions {
    /// The whole frame too (always when there is no zone).
    pub whole_frame: bool,
    pub zones: Vec<Arc<Zone>>,
}

impl Regions {
    /// The regions of zones configured as `zones` (validated), the whole frame as `whole_frame`
    /// says (default: only when there is no zone).
    pub fn new(zones: &BTreeMap<String, ZoneConfig>, whole_frame: Option<bool>) -> Regions {
        let zones: Vec<Arc<Zone>> = zones
            .iter()
            .take(MAX_ZONES)
            .filter_map(|(name, z)| {
                let r = z.bounds()?;
                Some(Arc::new(Zone {
                    name: name.as_str().into(),
                    rect: r.map(|v| v as f32),
                    polygon: z
                        .polygon
                        .as_ref()
                        .map(|p| p.iter().map(|v| [v[0] as f32, v[1] as f32]).collect()),
                }))
            })
            .collect();
        Regions {
            whole_frame: zones.is_empty() || whole_frame.unwrap_or(false),
            zones,
        }
    }

    /// The whole frame alone (classify, predict).
    pub fn whole() -> Regions {
        Regions {
            whole_frame: true,
            zones: Vec::new(),
        }
    }

    /// The regions due in `due`: None for the whole frame, else the zone.
    pub fn due(&self, due: Due) -> impl Iterator<Item = Option<&Arc<Zone>>> {
        let whole = (self.whole_frame && due.whole_frame()).then_some(None);
        let zones = self
            .zones
            .iter()
            .enumerate()
            .filter(move |(i, _)| due.zone(*i))
            .map(|(_, z)| Some(z));
        whole.into_iter().chain(zones)
    }

    /// Every region due.
    pub fn all(&self) -> Due {
        let mut bits = u64::from(self.whole_frame);
        for i in 0..self.zones.len() {
            bits |= 1 << (i + 1);
        }
        Due(bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(rect: Option<[f64; 4]>, polygon: Option<Vec<[f64; 2]>>) -> ZoneConfig {
        ZoneConfig {
            rect,
            polygon,
            thresholds: BTreeMap::new(),
            head: None,
        }
    }

    #[test]
    fn the_whole_frame_is_classified_alone_without_zones_and_on_request_with_them() {
        let none = BTreeMap::new();
        assert!(Regions::new(&none, Some(false)).whole_frame);
        let zones = BTreeMap::from([("steps".to_string(), zone(Some([0.1, 0.5, 0.4, 0.9]), None))]);
        let r = Regions::new(&zones, None);
        assert!(!r.whole_frame);
        assert_eq!(r.all(), Due(0b10));
        let both = Regions::new(&zones, Some(true));
        let due: Vec<Option<&str>> = both.due(Due::ALL).map(|z| z.map(|z| &*z.name)).collect();
        assert_eq!(due, [None, Some("steps")]);
        assert_eq!(both.due(Due(0b10)).count(), 1);
    }

    #[test]
    fn a_polygon_gives_the_rectangle_and_masks_the_rest() {
        let triangle = vec![[0.2, 0.2], [0.6, 0.2], [0.2, 0.6]];
        let zones = BTreeMap::from([("tri".to_string(), zone(None, Some(triangle)))]);
        let r = Regions::new(&zones, None);
        let z = &r.zones[0];
        assert_eq!(z.rect, [0.2, 0.2, 0.6, 0.6]);
        assert!(z.contains(0.25, 0.25));
        assert!(
            !z.contains(0.55, 0.55),
            "inside the box, outside the triangle"
        );
        assert!(!z.contains(0.1, 0.1));
    }
}
