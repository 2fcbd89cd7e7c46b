//! The preprocess stage: frame → model input. Centre crop, resize and normalise with OpenCV, into
//! the model's layout, on a pool of workers that each serve a share of the cameras.
//!
//! Decoded GStreamer buffers are wrapped by an OpenCV header without copying; the only full-frame
//! work is the resize of the cropped region.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, Sender};
use gstreamer_video::prelude::*;
use opencv::core::{CV_8UC1, CV_8UC3, Mat, Rect, Size};
use opencv::imgproc;
use opencv::prelude::*;
use vigil_engine::model::{ColorOrder, InputSpec, Layout};

use crate::frame::{Frame, FrameMeta, Pixels, Prepared, Zone};
use crate::source::FullPolicy;
use crate::source::zones::Regions;
use crate::stats::{CameraStats, StageStats};

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("frame is {width}x{height} with stride {stride} but its buffer holds {len} bytes")]
    ShortBuffer {
        width: u32,
        height: u32,
        stride: usize,
        len: usize,
    },
    #[error("image must be 8-bit BGR (3 channels), got OpenCV type {0}")]
    WrongType(i32),
    #[error("image is empty")]
    Empty,
    #[error(
        "frames must be BGR, got {0} (the pipeline template must end in videoconvert ! appsink)"
    )]
    Format(String),
    #[error("cannot map the frame's buffer")]
    Map,
    #[error("opencv: {0}")]
    OpenCv(#[from] opencv::Error),
}

/// One worker's preprocessing state (the resize target is reused from frame to frame).
pub struct Preprocessor {
    spec: InputSpec,
    resized: Mat,
    /// `x * scale[c] + offset[c]` == `(x - mean[c]) / std[c]`, per output channel.
    scale: [f32; 3],
    offset: [f32; 3],
    /// For each output channel, the BGR channel it reads.
    source_channel: [usize; 3],
    /// The cropped and resized I420 image (reused).
    yuv: Vec<u8>,
    /// Per zone and frame size, which pixels of the model's input lie outside the zone
    /// (computed once).
    masks: Vec<Mask>,
}

/// The pixels of the model's input outside a zone, for one frame size.
struct Mask {
    zone: Arc<Zone>,
    size: (u32, u32),
    /// One per input pixel, row by row: true outside the zone.
    outside: Vec<bool>,
}

impl Preprocessor {
    pub fn new(spec: &InputSpec) -> Self {
        let scale = [0, 1, 2].map(|c| 1.0 / spec.std[c]);
        let offset = [0, 1, 2].map(|c| -spec.mean[c] / spec.std[c]);
        let source_channel = match spec.color {
            ColorOrder::Rgb => [2, 1, 0],
            ColorOrder::Bgr => [0, 1, 2],
        };
        Self {
            spec: spec.clone(),
            resized: Mat::default(),
            scale,
            offset,
            source_channel,
            yuv: Vec::new(),
            masks: Vec::new(),
        }
    }

    /// The region of a `width` x `height` frame that is kept: centred, with the model input's
    /// aspect ratio, `crop` of the largest such region.
    pub fn crop_rect(&self, width: u32, height: u32) -> Rect {
        let (iw, ih) = (self.spec.width as f64, self.spec.height as f64);
        let fit = (width as f64 / iw).min(height as f64 / ih) * self.spec.crop as f64;
        let cw = ((iw * fit).round() as i32).clamp(1, width as i32);
        let ch = ((ih * fit).round() as i32).clamp(1, height as i32);
        Rect::new((width as i32 - cw) / 2, (height as i32 - ch) / 2, cw, ch)
    }

    /// The region of a `width` x `height` frame that zone `zone` takes: the zone's rectangle
    /// grown to the model input's aspect ratio around its centre (nothing is stretched), kept
    /// inside the frame; the pixels outside the zone are masked afterwards.
    pub fn zone_rect(&self, width: u32, height: u32, zone: &Zone) -> Rect {
        let [x0, y0, x1, y1] = zone.rect.map(|v| v.clamp(0.0, 1.0) as f64);
        let (w, h) = (width as f64, height as f64);
        let (zw, zh) = (((x1 - x0) * w).max(1.0), ((y1 - y0) * h).max(1.0));
        let aspect = self.spec.width as f64 / self.spec.height as f64;
        let (cw, ch) = if zw / zh < aspect {
            (zh * aspect, zh)
        } else {
            (zw, zw / aspect)
        };
        let (cw, ch) = (cw.min(w), ch.min(h));
        let cx = ((x0 + x1) / 2.0 * w - cw / 2.0).clamp(0.0, w - cw);
        let cy = ((y0 + y1) / 2.0 * h - ch / 2.0).clamp(0.0, h - ch);
        Rect::new(
            cx.round() as i32,
            cy.round() as i32,
            (cw.round() as i32).clamp(1, width as i32),
            (ch.round() as i32).clamp(1, height as i32),
        )
    }

    /// The region a frame's zone (or, for None, the whole frame) is classified from.
    fn region(&self, width: u32, height: u32, zone: Option<&Zone>) -> Rect {
        match zone {
            None => self.crop_rect(width, height),
            Some(z) => self.zone_rect(width, height, z),
        }
    }

    /// Preprocesses a frame (the whole frame, or a zone of it) into a tensor slot of
    /// `spec.len()` values.
    pub fn frame_into(
        &mut self,
        frame: &Frame,
        zone: Option<&Arc<Zone>>,
        out: &mut [f32],
    ) -> Result<(), PreprocessError> {
        let size = match &frame.pixels {
            Pixels::Mat(m) => {
                let size = (m.cols() as u32, m.rows() as u32);
                self.image_into(m, zone.map(|z| &**z), out)?;
                size
            }
            Pixels::Gst { buffer, info } => {
                // Maps the buffer, honouring any stride/offset its video meta gives.
                let frame = gstreamer_video::VideoFrameRef::from_buffer_ref_readable(buffer, info)
                    .map_err(|_| PreprocessError::Map)?;
                match info.format() {
                    gstreamer_video::VideoFormat::I420 => {
                        let rect = self.region(frame.width(), frame.height(), zone.map(|z| &**z));
                        self.i420_to_bgr(&frame, rect)?;
                        self.normalise(out);
                    }
                    gstreamer_video::VideoFormat::Bgr => {
                        let header = plane(&frame, 0, frame.height(), frame.width(), CV_8UC3)?;
                        self.image_into(&header, zone.map(|z| &**z), out)?;
                    }
                    other => return Err(PreprocessError::Format(other.to_str().to_string())),
                }
                (frame.width(), frame.height())
            }
        };
        if let Some(zone) = zone {
            self.mask(zone, size, out);
        }
        Ok(())
    }

    /// Gives the pixels of `out` outside `zone` the mean colour (0 once normalised: nothing, to
    /// the model).
    fn mask(&mut self, zone: &Arc<Zone>, size: (u32, u32), out: &mut [f32]) {
        let found = self
            .masks
            .iter()
            .position(|m| Arc::ptr_eq(&m.zone, zone) && m.size == size);
        let i = match found {
            Some(i) => i,
            None => {
                let outside = self.outside(zone, size);
                self.masks.push(Mask {
                    zone: zone.clone(),
                    size,
                    outside,
                });
                self.masks.len() - 1
            }
        };
        let outside = &self.masks[i].outside;
        if !outside.contains(&true) {
            return;
        }
        let plane = outside.len();
        match self.spec.layout {
            Layout::Nchw => {
                for c in 0..3 {
                    for (o, masked) in out[c * plane..(c + 1) * plane].iter_mut().zip(outside) {
                        if *masked {
                            *o = 0.0;
                        }
                    }
                }
            }
            Layout::Nhwc => {
                for (px, masked) in out.chunks_exact_mut(3).zip(outside) {
                    if *masked {
                        px.fill(0.0);
                    }
                }
            }
        }
    }

    /// Which input pixels fall outside the zone, for frames of `size`.
    fn outside(&self, zone: &Zone, (w, h): (u32, u32)) -> Vec<bool> {
        let rect = self.zone_rect(w, h, zone);
        let (ow, oh) = (self.spec.width as usize, self.spec.height as usize);
        let mut outside = Vec::with_capacity(ow * oh);
        for v in 0..oh {
            let y = (rect.y as f32 + (v as f32 + 0.5) * rect.height as f32 / oh as f32) / h as f32;
            for u in 0..ow {
                let x =
                    (rect.x as f32 + (u as f32 + 0.5) * rect.width as f32 / ow as f32) / w as f32;
                outside.push(!zone.contains(x, y));
            }
        }
        outside
    }

    /// Crops and resizes a decoded I420 frame plane by plane (no full-size colour conversion),
    /// then converts the small result to BGR into `self.resized`.
    fn i420_to_bgr(
        &mut self,
        frame: &gstreamer_video::VideoFrameRef<&gstreamer::BufferRef>,
        r: Rect,
    ) -> Result<(), PreprocessError> {
        let (w, h) = (frame.width(), frame.height());
        if w < 2 || h < 2 {
            return Err(PreprocessError::Empty);
        }
        // Even coordinates, so that the chroma planes crop the same region.
        let r = Rect::new(
            r.x & !1,
            r.y & !1,
            (r.width & !1).max(2),
            (r.height & !1).max(2),
        );
        let half = Rect::new(r.x / 2, r.y / 2, r.width / 2, r.height / 2);
        let (ow, oh) = (self.spec.width as i32, self.spec.height as i32);
        let (cw, ch) = (ow / 2, oh / 2);
        self.yuv.resize((ow * oh + 2 * cw * ch) as usize, 0);
        let (y_out, chroma) = self.yuv.split_at_mut((ow * oh) as usize);
        let (u_out, v_out) = chroma.split_at_mut((cw * ch) as usize);
        for (index, rect, dst, (dw, dh)) in [
            (0, r, y_out, (ow, oh)),
            (1, half, u_out, (cw, ch)),
            (2, half, v_out, (cw, ch)),
        ] {
            let (pw, ph) = if index == 0 {
                (w, h)
            } else {
                (w.div_ceil(2), h.div_ceil(2))
            };
            let src = plane(frame, index, ph, pw, CV_8UC1)?;
            let roi = Mat::roi(&src, rect)?;
            // SAFETY: the header covers exactly `dst` (dh rows of dw bytes), which outlives it;
            // resize writes into it without reallocating since size and type already match.
            let mut dst_header = unsafe {
                Mat::new_rows_cols_with_data_unsafe(
                    dh,
                    dw,
                    CV_8UC1,
                    dst.as_mut_ptr() as *mut std::ffi::c_void,
                    dw as usize,
                )?
            };
            imgproc::resize(
                &roi,
                &mut dst_header,
                Size::new(dw, dh),
                0.0,
                0.0,
                imgproc::INTER_LINEAR,
            )?;
        }
        // SAFETY: `self.yuv` holds the (oh * 3/2) x ow bytes of an I420 image and outlives the
        // header; cvtColor only reads it.
        let yuv = unsafe {
            Mat::new_rows_cols_with_data_unsafe(
                oh + oh / 2,
                ow,
                CV_8UC1,
                self.yuv.as_mut_ptr() as *mut std::ffi::c_void,
                ow as usize,
            )?
        };
        imgproc::cvt_color_def(&yuv, &mut self.resized, imgproc::COLOR_YUV2BGR_I420)?;
        Ok(())
    }

    /// Preprocesses an 8-bit BGR image (the whole of it, or a zone) into a tensor slot of
    /// `spec.len()` values.
    pub fn image_into(
        &mut self,
        image: &impl MatTraitConst,
        zone: Option<&Zone>,
        out: &mut [f32],
    ) -> Result<(), PreprocessError> {
        if image.empty() {
            return Err(PreprocessError::Empty);
        }
        if image.typ() != CV_8UC3 {
            return Err(PreprocessError::WrongType(image.typ()));
        }
        assert_eq!(out.len(), self.spec.len(), "tensor slot of the wrong size");
        let rect = self.region(image.cols() as u32, image.rows() as u32, zone);
        let roi = Mat::roi(image, rect)?;
        let size = Size::new(self.spec.width as i32, self.spec.height as i32);
        imgproc::resize(
            &roi,
            &mut self.resized,
            size,
            0.0,
            0.0,
            imgproc::INTER_LINEAR,
        )?;
        self.normalise(out);
        Ok(())
    }

    /// `self.resized` (BGR, the model's size) → `out`, in the model's layout and colour order.
    fn normalise(&self, out: &mut [f32]) {
        let pixels = self.resized.data_bytes().expect("a continuous 8-bit image");
        let plane = (self.spec.width * self.spec.height) as usize;
        match self.spec.layout {
            Layout::Nchw => {
                for c in 0..3 {
                    let (s, o, src) = (self.scale[c], self.offset[c], self.source_channel[c]);
                    let dst = &mut out[c * plane..(c + 1) * plane];
                    for (d, px) in dst.iter_mut().zip(pixels.chunks_exact(3)) {
                        *d = px[src] as f32 * s + o;
                    }
                }
            }
            Layout::Nhwc => {
                for (d, px) in out.chunks_exact_mut(3).zip(pixels.chunks_exact(3)) {
                    for c in 0..3 {
                        d[c] = px[self.source_channel[c]] as f32 * self.scale[c] + self.offset[c];
                    }
                }
            }
        }
    }

    /// Preprocesses a frame (the whole of it) into a new [`Prepared`], reusing `tensor`'s
    /// allocation.
    pub fn prepare(
        &mut self,
        frame: Frame,
        mut tensor: Vec<f32>,
        keep_pixels: bool,
    ) -> Result<Prepared, (PreprocessError, Vec<f32>)> {
        tensor.resize(self.spec.len(), 0.0);
        match self.frame_into(&frame, None, &mut tensor) {
            Ok(()) => Ok(Prepared {
                meta: frame.meta,
                tensor,
                pixels: keep_pixels.then_some(frame.pixels),
                live: false,
            }),
            Err(e) => Err((e, tensor)),
        }
    }

    /// Like [`Preprocessor::prepare`], for one region of the frame (None: the whole frame); the
    /// frame's pixels are shared, not copied, when kept.
    pub fn prepare_region(
        &mut self,
        frame: &Frame,
        zone: Option<&Arc<Zone>>,
        mut tensor: Vec<f32>,
        keep_pixels: bool,
    ) -> Result<Prepared, (PreprocessError, Vec<f32>)> {
        tensor.resize(self.spec.len(), 0.0);
        match self.frame_into(frame, zone, &mut tensor) {
            Ok(()) => Ok(Prepared {
                meta: FrameMeta {
                    zone: zone.cloned(),
                    ..frame.meta.clone()
                },
                tensor,
                pixels: keep_pixels.then(|| frame.pixels.clone()),
                live: false,
            }),
            Err(e) => Err((e, tensor)),
        }
    }
}

/// A camera as a preprocess worker serves it.
pub struct WorkerInput {
    pub frames: Receiver<Frame>,
    pub policy: FullPolicy,
    pub stats: Arc<CameraStats>,
    /// The regions of its frames that are classified.
    pub regions: Arc<Regions>,
}

/// What changes a worker's set of cameras.
enum Change {
    Add(WorkerInput),
    Ended(usize),
    NoMoreCameras,
}

/// One preprocess worker: serves the cameras it is given (through `cameras`) until every one has
/// ended and no more can come.
pub struct Worker {
    pub cameras: Receiver<WorkerInput>,
    pub out: Sender<Prepared>,
    /// Tensor buffers given back by the batcher.
    pub pool: Receiver<Vec<f32>>,
    pub spec: InputSpec,
    pub keep_pixels: bool,
    /// A live camera's frame older than this is skipped when a newer one is queued (zero: never).
    pub max_age: Duration,
}

impl Worker {
    pub fn run(self, stats: &StageStats) {
        let mut pre = Preprocessor::new(&self.spec);
        let mut inputs: Vec<WorkerInput> = Vec::new();
        let mut more = true;
        while more || !inputs.is_empty() {
            let Some(change) = self.serve(&mut pre, &inputs, more, stats) else {
                return;
            };
            match change {
                Change::Add(rx) => inputs.push(rx),
                Change::Ended(i) => {
                    inputs.remove(i);
                }
                Change::NoMoreCameras => more = false,
            }
        }
    }

    /// Prepares the cameras' frames as they come, until the set of cameras changes (or the
    /// output is closed: None).
    fn serve(
        &self,
        pre: &mut Preprocessor,
        inputs: &[WorkerInput],
        more: bool,
        stats: &StageStats,
    ) -> Option<Change> {
        let mut select = Select::new();
        for input in inputs {
            select.recv(&input.frames);
        }
        let control = more.then(|| select.recv(&self.cameras));
        loop {
            let op = select.select();
            let i = op.index();
            if Some(i) == control {
                return Some(match op.recv(&self.cameras) {
                    Ok(rx) => Change::Add(rx),
                    Err(_) => Change::NoMoreCameras,
                });
            }
            let input = &inputs[i];
            let frame = match op.recv(&input.frames) {
                Ok(f) => f,
                Err(_) => return Some(Change::Ended(i)),
            };
            let queued = input.frames.len();
            stats.queue_depth.store(queued as u64, Ordering::Relaxed);
            // Behind on a live camera: skip to its newer frame rather than add latency.
            if input.policy == FullPolicy::DropOldest
                && queued > 0
                && !self.max_age.is_zero()
                && frame.meta.arrived.elapsed() > self.max_age
            {
                input.stats.dropped_queue.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let live = input.policy == FullPolicy::DropOldest;
            if !self.prepare(pre, frame, &input.regions, live, stats) {
                return None;
            }
        }
    }

    /// One frame through the preprocessor, once per region due; false once the output is
    /// closed.
    fn prepare(
        &self,
        pre: &mut Preprocessor,
        frame: Frame,
        regions: &Regions,
        live: bool,
        stats: &StageStats,
    ) -> bool {
        stats.received(1);
        for zone in regions.due(frame.meta.due) {
            let started = Instant::now();
            let tensor = self.pool.try_recv().unwrap_or_default();
            let prepared = pre.prepare_region(&frame, zone, tensor, self.keep_pixels);
            stats.busy_since(started);
            match prepared {
                Ok(mut p) => {
                    p.live = live;
                    if self.out.send(p).is_err() {
                        return false;
                    }
                    stats.sent(1);
                }
                Err((e, _)) => {
                    stats.dropped(1);
                    tracing::warn!(camera = %frame.meta.camera, zone = ?zone.map(|z| &z.name),
                        error = %e, "frame dropped: cannot preprocess it");
                }
            }
        }
        true
    }
}

/// An OpenCV header over plane `index` of a mapped video frame (no copy).
fn plane<'a>(
    frame: &'a gstreamer_video::VideoFrameRef<&gstreamer::BufferRef>,
    index: u32,
    rows: u32,
    cols: u32,
    typ: i32,
) -> Result<opencv::boxed_ref::BoxedRef<'a, Mat>, PreprocessError> {
    let data = frame.plane_data(index).map_err(|_| PreprocessError::Map)?;
    let stride = frame.plane_stride()[index as usize] as usize;
    let row_bytes = cols as usize * if typ == CV_8UC3 { 3 } else { 1 };
    if rows == 0 || data.len() < stride * (rows as usize - 1) + row_bytes {
        return Err(PreprocessError::ShortBuffer {
            width: cols,
            height: rows,
            stride,
            len: data.len(),
        });
    }
    // SAFETY: the header borrows `data` for 'a (the mapping outlives it); OpenCV only reads
    // through it (a source image), and the check above keeps every row inside the mapping.
    let header = unsafe {
        Mat::new_rows_cols_with_data_unsafe(
            rows as i32,
            cols as i32,
            typ,
            data.as_ptr() as *mut std::ffi::c_void,
            stride,
        )?
    };
    Ok(opencv::boxed_ref::BoxedRef::from(header))
}

#[cfg(test)]
mod tests {
    use super::*;
    use opencv::core::Scalar;

    fn spec(layout: Layout, color: ColorOrder) -> InputSpec {
        InputSpec {
            name: "input".into(),
            layout,
            color,
            width: 4,
            height: 4,
            crop: 1.0,
            mean: [127.0, 127.0, 127.0],
            std: [128.0, 128.0, 128.0],
        }
    }

    #[test]
    fn the_crop_is_centred_and_a_fraction_of_the_short_side() {
        let mut s = spec(Layout::Nchw, ColorOrder::Rgb);
        s.width = 224;
        s.height = 224;
        s.crop = 0.875;
        let p = Preprocessor::new(&s);
        // 640x480: side = round(0.875 * 480) = 420.
        assert_eq!(p.crop_rect(640, 480), Rect::new(110, 30, 420, 420));
        assert_eq!(p.crop_rect(480, 640), Rect::new(30, 110, 420, 420));
    }

    #[test]
    fn channels_are_reordered_and_normalised_per_layout() {
        // A uniform image B=0, G=127, R=255.
        let img =
            Mat::new_rows_cols_with_default(8, 8, CV_8UC3, Scalar::new(0.0, 127.0, 255.0, 0.0))
                .unwrap();
        let mut out = vec![0f32; 48];
        Preprocessor::new(&spec(Layout::Nchw, ColorOrder::Rgb))
            .image_into(&img, None, &mut out)
            .unwrap();
        let (r, g, b) = (128.0 / 128.0, 0.0, -127.0 / 128.0);
        assert!(out[..16].iter().all(|v| (*v - r).abs() < 1e-6), "{out:?}");
        assert!(out[16..32].iter().all(|v| (*v - g).abs() < 1e-6));
        assert!(out[32..].iter().all(|v| (*v - b).abs() < 1e-6));

        Preprocessor::new(&spec(Layout::Nhwc, ColorOrder::Bgr))
            .image_into(&img, None, &mut out)
            .unwrap();
        assert!(
            (out[0] - b).abs() < 1e-6 && (out[1] - g).abs() < 1e-6 && (out[2] - r).abs() < 1e-6
        );
        assert!((out[45] - b).abs() < 1e-6);
    }

    #[test]
    fn a_padded_gstreamer_buffer_is_read_through_its_stride() {
        // 3x2 BGR frame with stride 12 (9 bytes of pixels + 3 of padding per row).
        let mut bytes = vec![0u8; 24];
        for row in 0..2 {
            for col in 0..3 {
                let o = row * 12 + col * 3;
                bytes[o..o + 3].copy_from_slice(&[10, 20, 30]);
            }
            bytes[row * 12 + 9..row * 12 + 12].copy_from_slice(&[255, 255, 255]);
        }
        gstreamer::init().unwrap();
        let frame = Frame {
            meta: crate::frame::FrameMeta::new("t".into(), 0, None),
            pixels: Pixels::Gst {
                buffer: gstreamer::Buffer::from_slice(bytes),
                info: gstreamer_video::VideoInfo::builder(gstreamer_video::VideoFormat::Bgr, 3, 2)
                    .stride(&[12])
                    .offset(&[0])
                    .size(24)
                    .build()
                    .unwrap(),
            },
        };
        let mut s = spec(Layout::Nhwc, ColorOrder::Bgr);
        s.mean = [0.0; 3];
        s.std = [1.0; 3];
        let mut out = vec![0f32; 48];
        Preprocessor::new(&s)
            .frame_into(&frame, None, &mut out)
            .unwrap();
        // Padding never leaks into the image.
        for px in out.chunks_exact(3) {
            assert_eq!(px, [10.0, 20.0, 30.0]);
        }
    }
}
