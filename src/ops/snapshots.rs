//! JPEG snapshots: the frame that started an event (kept on disk by [`SnapshotStore`]) and a
//! camera's latest analysed frame (encoded on demand with [`frame_jpeg`]).
//!
//! A frame is first copied into an owned 8-bit BGR image ([`to_bgr`]; decoded GStreamer buffers
//! are read plane by plane through their strides and offsets and converted with OpenCV), then
//! annotated with a banner (label, score, camera, time) and encoded ([`encode_jpeg`]).
//!
//! The store writes `<dir>/<id>.jpg` atomically (a hidden temporary file renamed into place),
//! keeps at most `keep` snapshots and none older than `max_age` (by the files' modification times,
//! so retention carries across restarts).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::images;
use gstreamer_video::VideoFormat;
use gstreamer_video::prelude::*;
use opencv::core::{CV_8UC1, CV_8UC2, CV_8UC3, CV_8UC4, Mat, Point, Rect, Scalar};
use opencv::imgproc;
use opencv::prelude::*;

use crate::frame::Pixels;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot snapshot a frame in format {0}")]
    Format(String),
    #[error("cannot snapshot an empty frame")]
    Empty,
    #[error(
        "cannot map the {format} {width}x{height} frame's buffer (too short for its video info?)"
    )]
    Map {
        format: String,
        width: u32,
        height: u32,
    },
    #[error(
        "{format} frame plane {plane} holds {len} bytes, too few for {rows} rows of {row_bytes} \
         bytes with stride {stride}"
    )]
    ShortPlane {
        format: String,
        plane: u32,
        rows: usize,
        row_bytes: usize,
        stride: i32,
        len: usize,
    },
    #[error("JPEG encoding of a {width}x{height} image failed")]
    Encode { width: i32, height: i32 },
    #[error("opencv: {0}")]
    OpenCv(#[from] opencv::Error),
    #[error(
        "invalid snapshot id {0:?} (only letters, digits, '-', '_' and '.' are allowed, no \"..\")"
    )]
    Id(String),
    #[error("snapshot directory {}: {source}", dir.display())]
    Dir { dir: PathBuf, source: io::Error },
    #[error("cannot write snapshot {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// What the banner of a snapshot says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Annotation {
    pub label: String,
    pub score: f32,
    pub camera: String,
    pub time: String,
    /// The zones to outline, with their names: `[x0, y0, x1, y1]` as fractions of the frame.
    pub zones: Vec<(String, [f32; 4])>,
}

impl Annotation {
    /// An annotation whose time is `time` in RFC 3339 (UTC, seconds).
    pub fn new(
        label: impl Into<String>,
        score: f32,
        camera: impl Into<String>,
        time: SystemTime,
    ) -> Self {
        Annotation {
            label: label.into(),
            score,
            camera: camera.into(),
            time: humantime::format_rfc3339_seconds(time).to_string(),
            zones: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Frame → BGR
// ---------------------------------------------------------------------------------------------

/// An owned 8-bit BGR copy of a frame, whatever its pixel format.
///
/// `Pixels::Mat` is cloned (8-bit gray and BGRA images are converted); `Pixels::Gst` is mapped
/// read-only and converted according to its format: I420, YV12, NV12, NV21, YUY2, UYVY, YVYU,
/// BGR, RGB, BGRx/BGRA, RGBx/RGBA, xRGB/ARGB, xBGR/ABGR and GRAY8. Odd sizes are fine. YUV is
/// converted with OpenCV's BT.601 (limited range) coefficients.
pub fn to_bgr(pixels: &Pixels) -> Result<Mat, SnapshotError> {
    match pixels {
        Pixels::Mat(m) => mat_to_bgr(m),
        Pixels::Gst { buffer, info } => {
            let format = info.format();
            let frame = gstreamer_video::VideoFrameRef::from_buffer_ref_readable(buffer, info)
                .map_err(|_| SnapshotError::Map {
                    format: format.to_str().to_string(),
                    width: info.width(),
                    height: info.height(),
                })?;
            gst_to_bgr(&frame)
        }
    }
}

/// The width a camera's latest analysed frame is kept at, at most (`latest.jpg`, the console's
/// tiles and zone editor): a quarter of a 720p frame's memory per camera. Event snapshots are
/// written from the full frame.
pub const LATEST_MAX_WIDTH: u32 = 640;

/// `pixels` scaled down to `max_width` wide at most (aspect kept, even sides), to be kept:
/// an I420 frame plane by plane into an I420 buffer, `reuse`'s when it has that size and no one
/// else holds it (so nothing is allocated per frame in steady state); other formats through
/// BGR. A frame no wider is shared as it is.
pub fn downscaled(
    pixels: &Pixels,
    max_width: u32,
    reuse: Option<Pixels>,
) -> Result<Pixels, SnapshotError> {
    let (width, height) = match pixels {
        Pixels::Gst { info, .. } => (info.width(), info.height()),
        Pixels::Mat(m) => (m.cols() as u32, m.rows() as u32),
    };
    if width <= max_width || height < 2 {
        return Ok(pixels.clone());
    }
    let w = (max_width & !1).max(2);
    let h = ((u64::from(height) * u64::from(w) / u64::from(width)) as u32 & !1).max(2);
    let (buffer, info) = match pixels {
        Pixels::Gst { buffer, info } if info.format() == VideoFormat::I420 => (buffer, info),
        _ => return Ok(Pixels::Mat(resized(&to_bgr(pixels)?, w, h)?)),
    };
    let out_info = gstreamer_video::VideoInfo::builder(VideoFormat::I420, w, h)
        .build()
        .map_err(|_| SnapshotError::Format(format!("I420 {w}x{h}")))?;
    let mut out = match reuse {
        Some(Pixels::Gst { buffer, info }) if info == out_info && buffer.is_writable() => buffer,
        _ => gstreamer::Buffer::with_size(out_info.size())
            .map_err(|_| SnapshotError::Format(format!("I420 {w}x{h}: no buffer")))?,
    };
    let map_err = |info: &gstreamer_video::VideoInfo| SnapshotError::Map {
        format: info.format().to_str().to_string(),
        width: info.width(),
        height: info.height(),
    };
    let src = GstFrame::from_buffer_ref_readable(buffer, info).map_err(|_| map_err(info))?;
    let mut dst =
        gstreamer_video::VideoFrameRef::from_buffer_ref_writable(out.make_mut(), &out_info)
            .map_err(|_| map_err(&out_info))?;
    scale_i420(&src, &mut dst)?;
    drop((src, dst));
    Ok(Pixels::Gst {
        buffer: out,
        info: out_info,
    })
}

/// Scales the three planes of the I420 frame `src` to fill `dst`, an I420 frame of the size
/// wanted (INTER_AREA: each output pixel the mean of the pixels it covers).
fn scale_i420(
    src: &GstFrame<'_>,
    dst: &mut gstreamer_video::VideoFrameRef<&mut gstreamer::BufferRef>,
) -> Result<(), SnapshotError> {
    let (width, height, w, h) = (src.width(), src.height(), dst.width(), dst.height());
    for (plane, (sw, sh), (dw, dh)) in [
        (0, (width, height), (w, h)),
        (1, (width.div_ceil(2), height.div_ceil(2)), (w / 2, h / 2)),
        (2, (width.div_ceil(2), height.div_ceil(2)), (w / 2, h / 2)),
    ] {
        let from = Plane::new(src, plane, sh as usize, sw as usize)?;
        let stride = dst.plane_stride()[plane as usize] as usize;
        let data = dst.plane_data_mut(plane).map_err(|_| SnapshotError::Map {
            format: "I420".into(),
            width: w,
            height: h,
        })?;
        // SAFETY: each header covers its rows within its stride, checked for the source by
        // `Plane::new` and given by the output's own video info; both mappings outlive them;
        // resize reads the one and writes the other in place (size and type already match).
        let (from_mat, mut to_mat) = unsafe {
            (
                Mat::new_rows_cols_with_data_unsafe(
                    sh as i32,
                    sw as i32,
                    CV_8UC1,
                    from.data.as_ptr() as *mut std::ffi::c_void,
                    from.stride,
                )?,
                Mat::new_rows_cols_with_data_unsafe(
                    dh as i32,
                    dw as i32,
                    CV_8UC1,
                    data.as_mut_ptr() as *mut std::ffi::c_void,
                    stride,
                )?,
            )
        };
        imgproc::resize(
            &from_mat,
            &mut to_mat,
            opencv::core::Size::new(dw as i32, dh as i32),
            0.0,
            0.0,
            imgproc::INTER_AREA,
        )?;
    }
    Ok(())
}

fn resized(m: &Mat, w: u32, h: u32) -> Result<Mat, SnapshotError> {
    let mut out = Mat::default();
    imgproc::resize(
        m,
        &mut out,
        opencv::core::Size::new(w as i32, h as i32),
        0.0,
        0.0,
        imgproc::INTER_AREA,
    )?;
    Ok(out)
}

/// `to_bgr` then `encode_jpeg`: the JPEG of a frame (e.g. a camera's latest analysed frame).
pub fn frame_jpeg(
    pixels: &Pixels,
    annotation: Option<&Annotation>,
    quality: u8,
) -> Result<Vec<u8>, SnapshotError> {
    encode_jpeg(&to_bgr(pixels)?, annotation, quality)
}

fn mat_to_bgr(m: &Mat) -> Result<Mat, SnapshotError> {
    if m.empty() {
        return Err(SnapshotError::Empty);
    }
    let code = match m.typ() {
        CV_8UC3 => return Ok(m.try_clone()?),
        CV_8UC1 => imgproc::COLOR_GRAY2BGR,
        CV_8UC4 => imgproc::COLOR_BGRA2BGR,
        other => return Err(SnapshotError::Format(format!("OpenCV type {other}"))),
    };
    let mut bgr = Mat::default();
    imgproc::cvt_color_def(m, &mut bgr, code)?;
    Ok(bgr)
}

type GstFrame<'a> = gstreamer_video::VideoFrameRef<&'a gstreamer::BufferRef>;

/// One plane of a mapped frame, checked to hold `rows` rows of `row_bytes` bytes.
struct Plane<'a> {
    data: &'a [u8],
    stride: usize,
    row_bytes: usize,
}

impl<'a> Plane<'a> {
    fn new(
        frame: &'a GstFrame<'_>,
        index: u32,
        rows: usize,
        row_bytes: usize,
    ) -> Result<Self, SnapshotError> {
        let format = || frame.format().to_str().to_string();
        let data = frame.plane_data(index).map_err(|_| SnapshotError::Map {
            format: format(),
            width: frame.width(),
            height: frame.height(),
        })?;
        let stride = frame
            .plane_stride()
            .get(index as usize)
            .copied()
            .unwrap_or(0);
        let fits = stride >= 0
            && (rows == 0
                || (stride as usize >= row_bytes
                    && data.len() >= stride as usize * (rows - 1) + row_bytes));
        if !fits {
            return Err(SnapshotError::ShortPlane {
                format: format(),
                plane: index,
                rows,
                row_bytes,
                stride,
                len: data.len(),
            });
        }
        Ok(Plane {
            data,
            stride: stride as usize,
            row_bytes,
        })
    }

    fn row(&self, r: usize) -> &'a [u8] {
        &self.data[r * self.stride..r * self.stride + self.row_bytes]
    }

    /// Copies the plane into `dst` (rows of `row_bytes`, no padding).
    fn copy_to(&self, dst: &mut [u8], rows: usize) {
        for (r, out) in dst.chunks_exact_mut(self.row_bytes).take(rows).enumerate() {
            out.copy_from_slice(self.row(r));
        }
    }
}

fn gst_to_bgr(frame: &GstFrame<'_>) -> Result<Mat, SnapshotError> {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    if w == 0 || h == 0 {
        return Err(SnapshotError::Empty);
    }
    use imgproc::*;
    match frame.format() {
        VideoFormat::I420 => yuv420(frame, COLOR_YUV2BGR_I420, false),
        // Planes in memory order (Y, V, U), as OpenCV's YV12 expects.
        VideoFormat::Yv12 => yuv420(frame, COLOR_YUV2BGR_YV12, false),
        VideoFormat::Nv12 => yuv420(frame, COLOR_YUV2BGR_NV12, true),
        VideoFormat::Nv21 => yuv420(frame, COLOR_YUV2BGR_NV21, true),
        // Where the two chroma bytes are in each 4-byte pair of pixels.
        VideoFormat::Yuy2 => yuv422(frame, COLOR_YUV2BGR_YUY2, [1, 3]),
        VideoFormat::Uyvy => yuv422(frame, COLOR_YUV2BGR_UYVY, [0, 2]),
        VideoFormat::Yvyu => yuv422(frame, COLOR_YUV2BGR_YVYU, [1, 3]),
        // Byte order in memory → where B, G and R are in each pixel.
        VideoFormat::Bgr => packed(frame, 3, [0, 1, 2]),
        VideoFormat::Rgb => packed(frame, 3, [2, 1, 0]),
        VideoFormat::Bgrx | VideoFormat::Bgra => packed(frame, 4, [0, 1, 2]),
        VideoFormat::Rgbx | VideoFormat::Rgba => packed(frame, 4, [2, 1, 0]),
        VideoFormat::Xrgb | VideoFormat::Argb => packed(frame, 4, [3, 2, 1]),
        VideoFormat::Xbgr | VideoFormat::Abgr => packed(frame, 4, [1, 2, 3]),
        VideoFormat::Gray8 => {
            let mut gray =
                Mat::new_rows_cols_with_default(h as i32, w as i32, CV_8UC1, Scalar::all(0.0))?;
            Plane::new(frame, 0, h, w)?.copy_to(gray.data_bytes_mut()?, h);
            let mut bgr = Mat::default();
            cvt_color_def(&gray, &mut bgr, COLOR_GRAY2BGR)?;
            Ok(bgr)
        }
        other => Err(SnapshotError::Format(other.to_str().to_string())),
    }
}

/// 4:2:0 YUV (three planes, or Y and interleaved chroma): gathered into the contiguous layout
/// OpenCV converts, padded to even dimensions (by repeating the last column and row of luma;
/// the chroma planes already cover them), converted, then cropped back.
fn yuv420(frame: &GstFrame<'_>, code: i32, interleaved: bool) -> Result<Mat, SnapshotError> {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    let (w2, h2) = (w.next_multiple_of(2), h.next_multiple_of(2));
    let (cw, ch) = (w2 / 2, h2 / 2);
    let mut yuv =
        Mat::new_rows_cols_with_default((h2 + ch) as i32, w2 as i32, CV_8UC1, Scalar::all(0.0))?;
    let bytes = yuv.data_bytes_mut()?;
    let (luma, chroma) = bytes.split_at_mut(w2 * h2);
    let y = Plane::new(frame, 0, h, w)?;
    for (r, out) in luma.chunks_exact_mut(w2).enumerate() {
        let src = y.row(r.min(h - 1));
        out[..w].copy_from_slice(src);
        if w2 > w {
            out[w] = src[w - 1];
        }
    }
    if interleaved {
        Plane::new(frame, 1, ch, 2 * cw)?.copy_to(chroma, ch);
    } else {
        let (first, second) = chroma.split_at_mut(cw * ch);
        Plane::new(frame, 1, ch, cw)?.copy_to(first, ch);
        Plane::new(frame, 2, ch, cw)?.copy_to(second, ch);
    }
    let mut bgr = Mat::default();
    imgproc::cvt_color_def(&yuv, &mut bgr, code)?;
    crop(bgr, w, h)
}

/// Packed 4:2:2 YUV (two pixels in four bytes, chroma at `chroma` in them), padded to an even
/// width like the planes are. With an odd width the last pixel takes its chroma from the pair
/// on its left: GStreamer's converters leave one of the half pair's chroma bytes unwritten.
fn yuv422(frame: &GstFrame<'_>, code: i32, chroma: [usize; 2]) -> Result<Mat, SnapshotError> {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    let w2 = w.next_multiple_of(2);
    let mut packed =
        Mat::new_rows_cols_with_default(h as i32, w2 as i32, CV_8UC2, Scalar::all(0.0))?;
    let bytes = packed.data_bytes_mut()?;
    Plane::new(frame, 0, h, 2 * w2)?.copy_to(bytes, h);
    if w % 2 == 1 && w >= 3 {
        for row in bytes.chunks_exact_mut(2 * w2) {
            let last = 2 * w2 - 4;
            for c in chroma {
                row[last + c] = row[last - 4 + c];
            }
        }
    }
    let mut bgr = Mat::default();
    imgproc::cvt_color_def(&packed, &mut bgr, code)?;
    crop(bgr, w, h)
}

/// Packed RGB formats: `bpp` bytes per pixel, blue, green and red at `bgr[0..3]` in each.
fn packed(frame: &GstFrame<'_>, bpp: usize, bgr: [usize; 3]) -> Result<Mat, SnapshotError> {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    let plane = Plane::new(frame, 0, h, w * bpp)?;
    let mut out = Mat::new_rows_cols_with_default(h as i32, w as i32, CV_8UC3, Scalar::all(0.0))?;
    let bytes = out.data_bytes_mut()?;
    if bpp == 3 && bgr == [0, 1, 2] {
        plane.copy_to(bytes, h);
    } else {
        for (r, out_row) in bytes.chunks_exact_mut(3 * w).enumerate() {
            for (d, s) in out_row
                .chunks_exact_mut(3)
                .zip(plane.row(r).chunks_exact(bpp))
            {
                d[0] = s[bgr[0]];
                d[1] = s[bgr[1]];
                d[2] = s[bgr[2]];
            }
        }
    }
    Ok(out)
}

/// The top-left `w` x `h` of `m` (itself when it is that size already).
fn crop(m: Mat, w: usize, h: usize) -> Result<Mat, SnapshotError> {
    if m.cols() as usize == w && m.rows() as usize == h {
        return Ok(m);
    }
    Ok(Mat::roi(&m, Rect::new(0, 0, w as i32, h as i32))?.try_clone()?)
}

// ---------------------------------------------------------------------------------------------
// Annotation and JPEG
// ---------------------------------------------------------------------------------------------

/// Encodes an 8-bit BGR (or gray / BGRA) image as JPEG at `quality` (clamped to 1..=100),
/// with a banner across the top when `annotation` is given: a dark band holding "label 0.93"
/// in white and, smaller, the camera and time, sized from the image's width.
pub fn encode_jpeg(
    bgr: &Mat,
    annotation: Option<&Annotation>,
    quality: u8,
) -> Result<Vec<u8>, SnapshotError> {
    if bgr.empty() {
        return Err(SnapshotError::Empty);
    }
    let encoded = match annotation {
        None if bgr.typ() == CV_8UC3 || bgr.typ() == CV_8UC1 => images::encode_jpeg(bgr, quality),
        _ => {
            let mut img = mat_to_bgr(bgr)?;
            if let Some(a) = annotation {
                draw_zones(&mut img, a)?;
                draw_banner(&mut img, a)?;
            }
            images::encode_jpeg(&img, quality)
        }
    };
    encoded.map_err(|_| SnapshotError::Encode {
        width: bgr.cols(),
        height: bgr.rows(),
    })
}

/// Outlines the annotation's zones, each with its name inside its top-left corner.
fn draw_zones(img: &mut Mat, a: &Annotation) -> Result<(), SnapshotError> {
    let (w, h) = (img.cols() as f32, img.rows() as f32);
    let line = (img.cols() / 320).max(2);
    let yellow = Scalar::new(0.0, 220.0, 255.0, 0.0);
    for (name, [x0, y0, x1, y1]) in &a.zones {
        let rect = Rect::new(
            (x0 * w) as i32,
            (y0 * h) as i32,
            ((x1 - x0) * w).max(1.0) as i32,
            ((y1 - y0) * h).max(1.0) as i32,
        );
        imgproc::rectangle(img, rect, yellow, line, imgproc::LINE_8, 0)?;
        let scale = fit_scale(name, 0.6, rect.width.max(40))?;
        imgproc::put_text(
            img,
            name,
            Point::new(rect.x + line * 2, rect.y + rect.height.min(40) - line * 2),
            imgproc::FONT_HERSHEY_SIMPLEX,
            scale,
            yellow,
            thickness(scale),
            imgproc::LINE_AA,
            false,
        )?;
    }
    Ok(())
}

/// The first line of a banner: "label 0.93".
fn banner_title(a: &Annotation) -> String {
    format!("{} {:.2}", a.label, a.score)
}

/// The second line of a banner: camera and time.
fn banner_subtitle(a: &Annotation) -> String {
    [a.camera.as_str(), a.time.as_str()]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("   ")
}

/// Where the banner's parts go on a `width`-wide image.
#[derive(Debug, Clone, Copy, PartialEq)]
struct BannerLayout {
    scale: f64,
    sub_scale: f64,
    thickness: i32,
    sub_thickness: i32,
    pad: i32,
    title_baseline: i32,
    sub_baseline: i32,
    height: i32,
}

const FONT: i32 = imgproc::FONT_HERSHEY_SIMPLEX;
/// Second line's size relative to the first.
const SUB_RATIO: f64 = 0.6;
/// Smallest font scales: readable ones, then the least a line is shrunk to when too long.
const MIN_SCALE: f64 = 0.4;
const MIN_SUB_SCALE: f64 = 0.35;
const SHRUNK_SCALE: f64 = 0.25;

fn thickness(scale: f64) -> i32 {
    ((scale * 2.0).round() as i32).max(1)
}

/// `scale`, shrunk (to no less than SHRUNK_SCALE) until `text` is at most `avail` wide.
fn fit_scale(text: &str, mut scale: f64, avail: i32) -> Result<f64, SnapshotError> {
    for _ in 0..4 {
        let mut base = 0;
        let need = imgproc::get_text_size(text, FONT, scale, thickness(scale), &mut base)?.width;
        if need <= avail || scale <= SHRUNK_SCALE {
            break;
        }
        scale = (scale * avail as f64 / need as f64 * 0.97).max(SHRUNK_SCALE);
    }
    Ok(scale)
}

fn banner_layout(width: i32, title: &str, subtitle: &str) -> Result<BannerLayout, SnapshotError> {
    // About 3% of the width for the first line's capitals, never unreadably small.
    let scale = (width as f64 / 1100.0).clamp(MIN_SCALE, 4.0);
    let sub_scale = (scale * SUB_RATIO).max(MIN_SUB_SCALE);
    let pad = ((scale * 10.0).round() as i32).max(3);
    let avail = (width - 2 * pad).max(1);
    let scale = fit_scale(title, scale, avail)?;
    let sub_scale = fit_scale(subtitle, sub_scale, avail)?;
    let (thickness, sub_thickness) = (thickness(scale), thickness(sub_scale));

    let mut base = 0;
    let t = imgproc::get_text_size(title, FONT, scale, thickness, &mut base)?;
    let title_baseline = pad + t.height;
    let mut bottom = title_baseline + base;
    let mut sub_baseline = bottom;
    if !subtitle.is_empty() {
        let s = imgproc::get_text_size(subtitle, FONT, sub_scale, sub_thickness, &mut base)?;
        sub_baseline = bottom + pad / 2 + s.height;
        bottom = sub_baseline + base;
    }
    Ok(BannerLayout {
        scale,
        sub_scale,
        thickness,
        sub_thickness,
        pad,
        title_baseline,
        sub_baseline,
        height: bottom + pad / 2,
    })
}

fn draw_banner(img: &mut Mat, a: &Annotation) -> Result<(), SnapshotError> {
    let (title, subtitle) = (banner_title(a), banner_subtitle(a));
    let l = banner_layout(img.cols(), &title, &subtitle)?;
    let band = Rect::new(0, 0, img.cols(), l.height.min(img.rows()));
    imgproc::rectangle(
        img,
        band,
        Scalar::new(24.0, 24.0, 24.0, 0.0),
        imgproc::FILLED,
        imgproc::LINE_8,
        0,
    )?;
    imgproc::put_text(
        img,
        &title,
        Point::new(l.pad, l.title_baseline),
        FONT,
        l.scale,
        Scalar::new(255.0, 255.0, 255.0, 0.0),
        l.thickness,
        imgproc::LINE_AA,
        false,
    )?;
    if !subtitle.is_empty() {
        imgproc::put_text(
            img,
            &subtitle,
            Point::new(l.pad, l.sub_baseline),
            FONT,
            l.sub_scale,
            Scalar::new(210.0, 210.0, 210.0, 0.0),
            l.sub_thickness,
            imgproc::LINE_AA,
            false,
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Store
// ---------------------------------------------------------------------------------------------

/// Whether `id` may name a snapshot: 1 to 200 of `[A-Za-z0-9_.-]`, no "..", not starting with
/// '.' (hidden and temporary files). Keeps every path inside the store's directory.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 200
        && !id.starts_with('.')
        && !id.contains("..")
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

struct Entry {
    id: String,
    created: SystemTime,
}

/// The snapshots on disk, oldest first.
#[derive(Default)]
struct Index {
    next: u64,
    /// By insertion order (oldest first).
    order: BTreeMap<u64, Entry>,
    ids: HashMap<String, u64>,
}

impl Index {
    fn insert(&mut self, id: &str, created: SystemTime) {
        if let Some(seq) = self.ids.remove(id) {
            self.order.remove(&seq);
        }
        let seq = self.next;
        self.next += 1;
        self.order.insert(
            seq,
            Entry {
                id: id.to_string(),
                created,
            },
        );
        self.ids.insert(id.to_string(), seq);
    }

    fn remove_seq(&mut self, seq: u64) -> Option<Entry> {
        let e = self.order.remove(&seq)?;
        self.ids.remove(&e.id);
        Some(e)
    }

    fn remove_id(&mut self, id: &str) {
        if let Some(seq) = self.ids.remove(id) {
            self.order.remove(&seq);
        }
    }
}

type Clock = Box<dyn Fn() -> SystemTime + Send + Sync>;

/// Bounded on-disk store of annotated JPEG snapshots, `<dir>/<id>.jpg`.
pub struct SnapshotStore {
    dir: PathBuf,
    keep: usize,
    max_age: Duration,
    quality: u8,
    index: Mutex<Index>,
    clock: Clock,
}

/// Numbers temporary files (unique within the process; the pid makes them unique across).
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl SnapshotStore {
    /// Opens (creating it if missing) a store in `dir` keeping at most `keep` snapshots (at
    /// least 1), none older than `max_age`, written at JPEG `quality`. The `*.jpg` files already
    /// there are taken in (by modification time, so retention applies across restarts) and
    /// retention is applied at once; leftover temporary files are removed. A directory that
    /// cannot be created, read or written is an error naming it.
    pub fn open(
        dir: &Path,
        keep: usize,
        max_age: Duration,
        quality: u8,
    ) -> Result<SnapshotStore, SnapshotError> {
        Self::open_with_clock(dir, keep, max_age, quality, Box::new(SystemTime::now))
    }

    fn open_with_clock(
        dir: &Path,
        keep: usize,
        max_age: Duration,
        quality: u8,
        clock: Clock,
    ) -> Result<SnapshotStore, SnapshotError> {
        let dir_err = |source| SnapshotError::Dir {
            dir: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(dir_err)?;
        // Writable? (Found now rather than at the first event.)
        let probe = dir.join(format!(".probe-{}.tmp", std::process::id()));
        fs::write(&probe, b"").map_err(dir_err)?;
        let _ = fs::remove_file(&probe);

        let now = clock();
        let mut found = Vec::new();
        for entry in fs::read_dir(dir).map_err(dir_err)? {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            if name.starts_with('.') && name.ends_with(".tmp") {
                // A write interrupted by a crash.
                let _ = fs::remove_file(entry.path());
                continue;
            }
            if let Some(id) = name.strip_suffix(".jpg")
                && valid_id(id)
            {
                found.push((meta.modified().unwrap_or(now), id.to_string()));
            }
        }
        found.sort();
        let mut index = Index::default();
        for (created, id) in &found {
            index.insert(id, *created);
        }
        let store = SnapshotStore {
            dir: dir.to_path_buf(),
            keep: keep.max(1),
            max_age,
            quality: quality.clamp(1, 100),
            index: Mutex::new(index),
            clock,
        };
        let removed = store.enforce(&mut store.lock(), now);
        tracing::debug!(dir = %dir.display(), found = found.len(), removed, "snapshot store opened");
        Ok(store)
    }

    /// The directory the snapshots are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.jpg"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `<dir>/<id>.jpg` (replacing one of that id), annotated, atomically, then applies
    /// retention. Returns the path.
    pub fn save(
        &self,
        id: &str,
        pixels: &Pixels,
        annotation: &Annotation,
    ) -> Result<PathBuf, SnapshotError> {
        if !valid_id(id) {
            return Err(SnapshotError::Id(id.to_string()));
        }
        // The slow part, outside the lock.
        let jpeg = frame_jpeg(pixels, Some(annotation), self.quality)?;
        let path = self.path_of(id);
        let tmp = self.dir.join(format!(
            ".{id}.{}-{}.tmp",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let created = (self.clock)();
        let written = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&jpeg)?;
            // The creation time the index keeps, also after a restart.
            let _ = f.set_modified(created);
            Ok(())
        })();
        if let Err(source) = written {
            let _ = fs::remove_file(&tmp);
            return Err(SnapshotError::Write { path: tmp, source });
        }
        // The rename under the lock, so that retention never deletes a file just replaced.
        let mut index = self.lock();
        if let Err(source) = fs::rename(&tmp, &path) {
            drop(index);
            let _ = fs::remove_file(&tmp);
            return Err(SnapshotError::Write { path, source });
        }
        index.insert(id, created);
        self.enforce(&mut index, created);
        Ok(path)
    }

    /// The JPEG bytes of snapshot `id`; None if there is none (never made, deleted by retention)
    /// or `id` is not a valid id.
    pub fn load(&self, id: &str) -> Option<Vec<u8>> {
        if !valid_id(id) {
            return None;
        }
        match fs::read(self.path_of(id)) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                if e.kind() == io::ErrorKind::NotFound {
                    // Deleted behind the store's back.
                    self.lock().remove_id(id);
                }
                None
            }
        }
    }

    /// Whether snapshot `id` is in the store (by its index: no disk access).
    pub fn contains(&self, id: &str) -> bool {
        self.lock().ids.contains_key(id)
    }

    /// Deletes the snapshots older than `max_age` (and any beyond `keep`); returns how many.
    pub fn prune(&self) -> usize {
        let now = (self.clock)();
        self.enforce(&mut self.lock(), now)
    }

    /// How many snapshots the store holds.
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies retention to `index` at time `now`; returns how many snapshots were deleted.
    fn enforce(&self, index: &mut Index, now: SystemTime) -> usize {
        let mut gone = Vec::new();
        if let Some(cutoff) = now.checked_sub(self.max_age) {
            let old: Vec<u64> = index
                .order
                .iter()
                .filter(|(_, e)| e.created < cutoff)
                .map(|(seq, _)| *seq)
                .collect();
            gone.extend(old.into_iter().filter_map(|seq| index.remove_seq(seq)));
        }
        while index.order.len() > self.keep {
            let Some((&seq, _)) = index.order.first_key_value() else {
                break;
            };
            gone.extend(index.remove_seq(seq));
        }
        for e in &gone {
            let path = self.path_of(&e.id);
            if let Err(err) = fs::remove_file(&path)
                && err.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %err, "cannot delete an old snapshot");
            }
        }
        gone.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use gstreamer as gst;

    fn init() {
        gst::init().unwrap();
    }

    /// Asserts the BGR pixel at (x, y) is within `tol` of `want`.
    fn assert_px(m: &Mat, x: i32, y: i32, want: [u8; 3], tol: u8) {
        let px = *m.at_2d::<opencv::core::Vec3b>(y, x).unwrap();
        let ok = (0..3).all(|c| px[c].abs_diff(want[c]) <= tol);
        assert!(ok, "pixel ({x},{y}) is {:?}, want {want:?} ± {tol}", px.0);
    }

    /// A `w` x `h` BGR image of four quadrants: red, green / blue, white.
    fn quadrants(w: i32, h: i32) -> Mat {
        let mut m = Mat::new_rows_cols_with_default(h, w, CV_8UC3, Scalar::all(0.0)).unwrap();
        let (hw, hh) = (w / 2, h / 2);
        for (rect, colour) in [
            (Rect::new(0, 0, hw, hh), (0.0, 0.0, 255.0)),
            (Rect::new(hw, 0, w - hw, hh), (0.0, 255.0, 0.0)),
            (Rect::new(0, hh, hw, h - hh), (255.0, 0.0, 0.0)),
            (Rect::new(hw, hh, w - hw, h - hh), (255.0, 255.0, 255.0)),
        ] {
            imgproc::rectangle(
                &mut m,
                rect,
                Scalar::new(colour.0, colour.1, colour.2, 0.0),
                imgproc::FILLED,
                imgproc::LINE_8,
                0,
            )
            .unwrap();
        }
        m
    }

    fn assert_quadrants(m: &Mat, w: i32, h: i32) {
        assert_eq!((m.cols(), m.rows(), m.typ()), (w, h, CV_8UC3));
        let tol = 20;
        assert_px(m, w / 4, h / 4, [0, 0, 255], tol);
        assert_px(m, 3 * w / 4, h / 4, [0, 255, 0], tol);
        assert_px(m, w / 4, 3 * h / 4, [255, 0, 0], tol);
        assert_px(m, 3 * w / 4, 3 * h / 4, [255, 255, 255], tol);
    }

    /// The I420 bytes (Y, then U, then V, no padding) of a BGR image with even sides.
    fn i420_bytes(bgr: &Mat) -> Vec<u8> {
        let mut yuv = Mat::default();
        imgproc::cvt_color_def(bgr, &mut yuv, imgproc::COLOR_BGR2YUV_I420).unwrap();
        yuv.data_bytes().unwrap().to_vec()
    }

    fn gst_pixels(bytes: Vec<u8>, info: gstreamer_video::VideoInfo) -> Pixels {
        Pixels::Gst {
            buffer: gst::Buffer::from_slice(bytes),
            info,
        }
    }

    #[test]
    fn a_wide_i420_frame_is_kept_downscaled_plane_by_plane_into_a_reused_buffer() {
        init();
        let (w, h) = (1280, 720);
        let info = gstreamer_video::VideoInfo::builder(VideoFormat::I420, w as u32, h as u32)
            .build()
            .unwrap();
        let frame = gst_pixels(i420_bytes(&quadrants(w, h)), info);
        let small = downscaled(&frame, 640, None).unwrap();
        let Pixels::Gst { buffer, info } = &small else {
            panic!("an I420 frame stays an I420 buffer");
        };
        assert_eq!(
            (info.width(), info.height(), info.format()),
            (640, 360, VideoFormat::I420)
        );
        assert_eq!(buffer.size(), 640 * 360 * 3 / 2);
        assert_quadrants(&to_bgr(&small).unwrap(), 640, 360);
        // Given back while no one else holds it: the same buffer is written again.
        let first = buffer.as_ptr();
        let again = downscaled(&frame, 640, Some(small)).unwrap();
        let Pixels::Gst { buffer, .. } = &again else {
            panic!("I420");
        };
        assert_eq!(buffer.as_ptr(), first, "the kept buffer is reused");
        // Held elsewhere too (a request encoding it): a new one, the held one untouched.
        let held = again.clone();
        let next = downscaled(&frame, 640, Some(again)).unwrap();
        let (Pixels::Gst { buffer: a, .. }, Pixels::Gst { buffer: b, .. }) = (&next, &held) else {
            panic!("I420");
        };
        assert_ne!(a.as_ptr(), b.as_ptr());
        assert_quadrants(&to_bgr(&held).unwrap(), 640, 360);
        // No wider than the limit: shared as it is.
        let Pixels::Gst { info, .. } = downscaled(&frame, 1280, None).unwrap() else {
            panic!("I420");
        };
        assert_eq!(info.width(), 1280);
        // A BGR image becomes a BGR image of the smaller size.
        let bgr = downscaled(&Pixels::Mat(quadrants(w, h)), 320, None).unwrap();
        assert_quadrants(&to_bgr(&bgr).unwrap(), 320, 180);
    }

    #[test]
    fn i420_and_nv12_buffers_keep_their_colours_and_layout() {
        init();
        let (w, h) = (64, 48);
        let i420 = i420_bytes(&quadrants(w, h));
        let info = gstreamer_video::VideoInfo::builder(VideoFormat::I420, w as u32, h as u32)
            .build()
            .unwrap();
        assert_eq!(
            info.size(),
            i420.len(),
            "the default I420 layout is OpenCV's"
        );
        let bgr = to_bgr(&gst_pixels(i420.clone(), info)).unwrap();
        assert_quadrants(&bgr, w, h);

        // NV12: the same Y, then U and V interleaved.
        let luma = (w * h) as usize;
        let quarter = luma / 4;
        let mut nv12 = i420[..luma].to_vec();
        for i in 0..quarter {
            nv12.push(i420[luma + i]);
            nv12.push(i420[luma + quarter + i]);
        }
        let info = gstreamer_video::VideoInfo::builder(VideoFormat::Nv12, w as u32, h as u32)
            .build()
            .unwrap();
        let bgr = to_bgr(&gst_pixels(nv12, info)).unwrap();
        assert_quadrants(&bgr, w, h);
    }

    #[test]
    fn padded_i420_planes_are_read_through_their_strides_and_offsets() {
        init();
        let (w, h) = (64usize, 48usize);
        let i420 = i420_bytes(&quadrants(w as i32, h as i32));
        // Each row padded to 80 (luma) / 48 (chroma) bytes of 0xAA, planes 16 bytes apart.
        let (ys, cs, gap) = (80usize, 48usize, 16usize);
        let (cw, ch) = (w / 2, h / 2);
        let offsets = [0, ys * h + gap, ys * h + gap + cs * ch + gap];
        let mut bytes = vec![0xAAu8; offsets[2] + cs * ch];
        for r in 0..h {
            bytes[r * ys..r * ys + w].copy_from_slice(&i420[r * w..(r + 1) * w]);
        }
        for (p, src) in [(1, w * h), (2, w * h + cw * ch)] {
            for r in 0..ch {
                let o = offsets[p] + r * cs;
                bytes[o..o + cw].copy_from_slice(&i420[src + r * cw..src + (r + 1) * cw]);
            }
        }
        let info = gstreamer_video::VideoInfo::builder(VideoFormat::I420, w as u32, h as u32)
            .stride(&[ys as i32, cs as i32, cs as i32])
            .offset(&offsets)
            .size(bytes.len())
            .build()
            .unwrap();
        let bgr = to_bgr(&gst_pixels(bytes, info)).unwrap();
        assert_quadrants(&bgr, w as i32, h as i32);
        // No padding leaks in at the right edge.
        assert_px(&bgr, w as i32 - 1, 0, [0, 255, 0], 20);
    }

    #[test]
    fn packed_formats_are_reordered_and_padding_skipped() {
        init();
        // 2x2 images: pixel (0,0) is B=10 G=20 R=30, the others B=200 G=100 R=50.
        // Each case: format, bytes per pixel, where B, G and R are in a pixel.
        let cases: [(VideoFormat, usize, [usize; 3]); 10] = [
            (VideoFormat::Bgr, 3, [0, 1, 2]),
            (VideoFormat::Rgb, 3, [2, 1, 0]),
            (VideoFormat::Bgrx, 4, [0, 1, 2]),
            (VideoFormat::Bgra, 4, [0, 1, 2]),
            (VideoFormat::Rgbx, 4, [2, 1, 0]),
            (VideoFormat::Rgba, 4, [2, 1, 0]),
            (VideoFormat::Xrgb, 4, [3, 2, 1]),
            (VideoFormat::Argb, 4, [3, 2, 1]),
            (VideoFormat::Xbgr, 4, [1, 2, 3]),
            (VideoFormat::Abgr, 4, [1, 2, 3]),
        ];
        for (format, bpp, at) in cases {
            let stride = 2 * bpp + 5;
            let mut bytes = vec![0xEEu8; stride * 2];
            for (r, c) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                let px = if (r, c) == (0, 0) {
                    [10, 20, 30]
                } else {
                    [200, 100, 50]
                };
                let o = r * stride + c * bpp;
                for k in 0..3 {
                    bytes[o + at[k]] = px[k];
                }
            }
            let info = gstreamer_video::VideoInfo::builder(format, 2, 2)
                .stride(&[stride as i32])
                .offset(&[0])
                .size(bytes.len())
                .build()
                .unwrap();
            let bgr = to_bgr(&gst_pixels(bytes, info)).unwrap();
            assert_eq!((bgr.cols(), bgr.rows(), bgr.typ()), (2, 2, CV_8UC3));
            assert_eq!(
                bgr.data_bytes().unwrap(),
                [10, 20, 30, 200, 100, 50, 200, 100, 50, 200, 100, 50],
                "{format:?}"
            );
        }
    }

    /// One frame of a real pipeline: solid red from videotestsrc, in `format`.
    fn pipeline_frame(format: &str, w: u32, h: u32) -> Pixels {
        init();
        let desc = format!(
            "videotestsrc num-buffers=1 pattern=solid-color foreground-color=0xffff0000 ! \
             videoconvert ! video/x-raw,format={format},width={w},height={h} ! \
             appsink name=sink sync=false"
        );
        let pipeline = gst::parse::launch(&desc)
            .unwrap()
            .downcast::<gst::Pipeline>()
            .unwrap();
        let sink = pipeline
            .by_name("sink")
            .unwrap()
            .downcast::<gstreamer_app::AppSink>()
            .unwrap();
        pipeline.set_state(gst::State::Playing).unwrap();
        let sample = sink.pull_sample().expect("a frame");
        pipeline.set_state(gst::State::Null).unwrap();
        let info = gstreamer_video::VideoInfo::from_caps(sample.caps().unwrap()).unwrap();
        assert_eq!(info.format().to_str(), format);
        Pixels::Gst {
            buffer: sample.buffer_owned().unwrap(),
            info,
        }
    }

    #[test]
    fn real_pipeline_frames_of_every_supported_format_stay_red() {
        // Odd sizes: padded strides and half-covered chroma.
        let (w, h) = (321, 241);
        for format in [
            "I420", "YV12", "NV12", "NV21", "YUY2", "UYVY", "YVYU", "BGR", "RGB", "BGRx", "BGRA",
            "RGBx", "RGBA", "xRGB", "ARGB", "xBGR", "ABGR",
        ] {
            let bgr = to_bgr(&pipeline_frame(format, w, h)).unwrap();
            assert_eq!((bgr.cols(), bgr.rows()), (w as i32, h as i32), "{format}");
            for (x, y) in [(0, 0), (160, 120), (320, 240), (320, 0), (0, 240)] {
                let px = *bgr.at_2d::<opencv::core::Vec3b>(y, x).unwrap();
                assert!(
                    px[2] > 220 && px[1] < 35 && px[0] < 35,
                    "{format} ({x},{y}): {:?}",
                    px.0
                );
            }
        }
        let gray = to_bgr(&pipeline_frame("GRAY8", w, h)).unwrap();
        let px = *gray.at_2d::<opencv::core::Vec3b>(120, 160).unwrap();
        assert!(
            px[0] == px[1] && px[1] == px[2] && (50..110).contains(&px[0]),
            "{px:?}"
        );
    }

    #[test]
    fn unsupported_formats_and_short_buffers_are_errors() {
        init();
        let info = gstreamer_video::VideoInfo::builder(VideoFormat::Gray16Le, 4, 4)
            .build()
            .unwrap();
        let err = to_bgr(&gst_pixels(vec![0; info.size()], info)).unwrap_err();
        assert!(matches!(err, SnapshotError::Format(_)));
        assert!(err.to_string().contains("GRAY16_LE"), "{err}");

        let info = gstreamer_video::VideoInfo::builder(VideoFormat::I420, 64, 48)
            .build()
            .unwrap();
        let err = to_bgr(&gst_pixels(vec![0; 100], info)).unwrap_err();
        assert!(err.to_string().contains("I420"), "{err}");

        let m = Mat::new_rows_cols_with_default(4, 4, opencv::core::CV_32FC1, Scalar::all(0.0))
            .unwrap();
        assert!(matches!(
            to_bgr(&Pixels::Mat(m)),
            Err(SnapshotError::Format(_))
        ));
        assert!(matches!(
            to_bgr(&Pixels::Mat(Mat::default())),
            Err(SnapshotError::Empty)
        ));
    }

    #[test]
    fn mats_are_copied_and_gray_ones_converted() {
        let src = quadrants(40, 30);
        let copy = to_bgr(&Pixels::Mat(src.try_clone().unwrap())).unwrap();
        assert_eq!(copy.data_bytes().unwrap(), src.data_bytes().unwrap());
        let gray = Mat::new_rows_cols_with_default(3, 5, CV_8UC1, Scalar::all(77.0)).unwrap();
        let bgr = to_bgr(&Pixels::Mat(gray)).unwrap();
        assert_eq!((bgr.cols(), bgr.rows(), bgr.typ()), (5, 3, CV_8UC3));
        assert_px(&bgr, 4, 2, [77, 77, 77], 0);
    }

    fn annotation() -> Annotation {
        Annotation {
            label: "fox squirrel".into(),
            score: 0.9349,
            camera: "street".into(),
            time: "2026-11-29T15:39:49Z".into(),
            zones: Vec::new(),
        }
    }

    fn decode(jpeg: &[u8]) -> Mat {
        assert_eq!(&jpeg[..3], [0xFF, 0xD8, 0xFF], "JPEG magic");
        images::decode(jpeg).unwrap()
    }

    #[test]
    fn jpegs_decode_to_the_same_size_with_a_dark_banner_and_white_text() {
        for (w, h) in [(640, 480), (1920, 1080), (161, 97)] {
            let grey = Mat::new_rows_cols_with_default(h, w, CV_8UC3, Scalar::all(128.0)).unwrap();
            let plain = decode(&encode_jpeg(&grey, None, 90).unwrap());
            assert_eq!((plain.cols(), plain.rows()), (w, h));
            assert_px(&plain, w / 2, 2, [128, 128, 128], 4);

            let jpeg = encode_jpeg(&grey, Some(&annotation()), 90).unwrap();
            let img = decode(&jpeg);
            assert_eq!((img.cols(), img.rows()), (w, h));
            // The input is left alone.
            assert_px(&grey, 0, 0, [128, 128, 128], 0);

            let layout = banner_layout(
                w,
                &banner_title(&annotation()),
                &banner_subtitle(&annotation()),
            )
            .unwrap();
            assert!(
                layout.height > 8 && layout.height < h / 3,
                "{w}x{h}: {layout:?}"
            );
            // Dark band (its right end is past the text), white text in it, the image below.
            assert_px(&img, w - 2, 2, [24, 24, 24], 12);
            let band = Mat::roi(&img, Rect::new(0, 0, w, layout.height)).unwrap();
            let (mut min, mut max) = (0.0, 0.0);
            opencv::core::min_max_loc(
                &band.try_clone().unwrap().reshape(1, 0).unwrap(),
                Some(&mut min),
                Some(&mut max),
                None,
                None,
                &opencv::core::no_array(),
            )
            .unwrap();
            assert!(min < 40.0 && max > 230.0, "{w}x{h}: band {min}..{max}");
            assert_px(&img, w / 2, layout.height + 4, [128, 128, 128], 6);
            assert_px(&img, w / 2, h - 2, [128, 128, 128], 6);
        }
    }

    #[test]
    fn the_banner_fits_long_text_and_scales_with_the_width() {
        let narrow = banner_layout(320, "fox squirrel 0.93", "street   2026").unwrap();
        let wide = banner_layout(1920, "fox squirrel 0.93", "street   2026").unwrap();
        assert!(wide.scale > 2.0 * narrow.scale, "{narrow:?} {wide:?}");
        let long = "a label that goes on and on and on and on and on 0.93";
        let l = banner_layout(320, long, "").unwrap();
        let mut base = 0;
        let size = imgproc::get_text_size(long, FONT, l.scale, l.thickness, &mut base).unwrap();
        assert!(
            size.width <= 320 - 2 * l.pad || l.scale <= 0.3,
            "{l:?} {size:?}"
        );
    }

    #[test]
    fn quality_changes_the_size_and_is_clamped() {
        let mut noisy =
            Mat::new_rows_cols_with_default(120, 160, CV_8UC3, Scalar::all(0.0)).unwrap();
        opencv::core::randu(&mut noisy, &Scalar::all(0.0), &Scalar::all(255.0)).unwrap();
        let high = encode_jpeg(&noisy, None, 95).unwrap();
        let low = encode_jpeg(&noisy, None, 10).unwrap();
        assert!(high.len() > low.len(), "{} vs {}", high.len(), low.len());
        assert_eq!(encode_jpeg(&noisy, None, 0).unwrap().len(), {
            encode_jpeg(&noisy, None, 1).unwrap().len()
        });
        assert!(matches!(
            encode_jpeg(&Mat::default(), None, 80),
            Err(SnapshotError::Empty)
        ));
    }

    #[test]
    fn frame_jpeg_encodes_a_gstreamer_frame() {
        let jpeg = frame_jpeg(&pipeline_frame("I420", 320, 240), Some(&annotation()), 80).unwrap();
        let img = decode(&jpeg);
        assert_eq!((img.cols(), img.rows()), (320, 240));
        assert_px(&img, 160, 200, [0, 0, 255], 40);
    }

    fn red_frame() -> Pixels {
        Pixels::Mat(
            Mat::new_rows_cols_with_default(60, 80, CV_8UC3, Scalar::new(0.0, 0.0, 255.0, 0.0))
                .unwrap(),
        )
    }

    /// A clock the test moves by hand.
    fn manual_clock(start: SystemTime) -> (Arc<Mutex<SystemTime>>, Clock) {
        let now = Arc::new(Mutex::new(start));
        let read = now.clone();
        (now, Box::new(move || *read.lock().unwrap()))
    }

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn jpgs(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_store_writes_and_loads_annotated_jpegs() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<SnapshotStore>();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snaps/nested");
        let store = SnapshotStore::open(&dir, 10, DAY, 85).unwrap();
        assert!(store.is_empty());
        let id = "street-3-1732899000123";
        let path = store.save(id, &red_frame(), &annotation()).unwrap();
        assert_eq!(path, dir.join(format!("{id}.jpg")));
        assert_eq!(jpgs(&dir), [format!("{id}.jpg")], "no temporary file left");
        assert!(store.contains(id) && store.len() == 1);
        let bytes = store.load(id).unwrap();
        assert_eq!(bytes, fs::read(&path).unwrap());
        let img = decode(&bytes);
        assert_eq!((img.cols(), img.rows()), (80, 60));
        assert_px(&img, 40, 55, [0, 0, 255], 30);
        // Saving an id again replaces it.
        store.save(id, &red_frame(), &annotation()).unwrap();
        assert_eq!(store.len(), 1);
        assert!(store.load("street-3-1").is_none() && !store.contains("street-3-1"));
    }

    #[test]
    fn retention_by_count_deletes_the_oldest() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(tmp.path(), 3, DAY, 85).unwrap();
        for i in 0..5 {
            store
                .save(&format!("cam-{i}"), &red_frame(), &annotation())
                .unwrap();
        }
        assert_eq!(store.len(), 3);
        assert_eq!(jpgs(tmp.path()), ["cam-2.jpg", "cam-3.jpg", "cam-4.jpg"]);
        for gone in ["cam-0", "cam-1"] {
            assert!(!store.contains(gone) && store.load(gone).is_none());
        }
        assert!(store.contains("cam-2") && store.load("cam-4").is_some());
        // Re-saving makes an id the newest.
        store.save("cam-2", &red_frame(), &annotation()).unwrap();
        store.save("cam-5", &red_frame(), &annotation()).unwrap();
        assert_eq!(jpgs(tmp.path()), ["cam-2.jpg", "cam-4.jpg", "cam-5.jpg"]);
    }

    #[test]
    fn retention_by_age_with_a_manual_clock() {
        let tmp = tempfile::tempdir().unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_000_000);
        let (now, clock) = manual_clock(t0);
        let hour = Duration::from_secs(3600);
        let store = SnapshotStore::open_with_clock(tmp.path(), 100, hour, 85, clock).unwrap();
        store.save("a", &red_frame(), &annotation()).unwrap();
        *now.lock().unwrap() = t0 + hour / 2;
        store.save("b", &red_frame(), &annotation()).unwrap();
        assert_eq!(store.prune(), 0);
        *now.lock().unwrap() = t0 + hour + Duration::from_secs(1);
        assert_eq!(store.prune(), 1);
        assert!(!store.contains("a") && store.load("a").is_none() && store.contains("b"));
        assert_eq!(jpgs(tmp.path()), ["b.jpg"]);
        // The file carries its creation time: reopened later, b is past its age.
        assert_eq!(
            fs::metadata(tmp.path().join("b.jpg"))
                .unwrap()
                .modified()
                .unwrap(),
            t0 + hour / 2
        );
        drop(store);
        let (_, later) = manual_clock(t0 + 2 * hour);
        let store = SnapshotStore::open_with_clock(tmp.path(), 100, hour, 85, later).unwrap();
        assert!(store.is_empty() && jpgs(tmp.path()).is_empty());
    }

    #[test]
    fn reopening_takes_in_existing_files_and_applies_retention_by_their_mtimes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(tmp.path(), 10, 7 * DAY, 85).unwrap();
        for id in ["old", "mid", "new"] {
            store.save(id, &red_frame(), &annotation()).unwrap();
        }
        drop(store);
        let now = SystemTime::now();
        let age = |id: &str, days: u32| {
            fs::File::options()
                .write(true)
                .open(tmp.path().join(format!("{id}.jpg")))
                .unwrap()
                .set_modified(now - DAY * days)
                .unwrap();
        };
        age("old", 10);
        age("mid", 2);
        age("new", 1);
        // Not snapshots: left alone. A crashed write's temporary file: removed.
        fs::write(tmp.path().join("notes.txt"), b"x").unwrap();
        fs::write(tmp.path().join("bad name.jpg"), b"x").unwrap();
        fs::write(tmp.path().join(".new.123-0.tmp"), b"x").unwrap();

        let store = SnapshotStore::open(tmp.path(), 10, 7 * DAY, 85).unwrap();
        assert_eq!(store.len(), 2);
        assert!(!store.contains("old") && store.contains("mid") && store.contains("new"));
        assert!(decode(&store.load("mid").unwrap()).cols() == 80);
        assert_eq!(
            jpgs(tmp.path()),
            ["bad name.jpg", "mid.jpg", "new.jpg", "notes.txt"]
        );
        drop(store);

        // Count retention on reopening keeps the newest by mtime.
        let store = SnapshotStore::open(tmp.path(), 1, 7 * DAY, 85).unwrap();
        assert_eq!(store.len(), 1);
        assert!(store.contains("new") && !tmp.path().join("mid.jpg").exists());
    }

    #[test]
    fn ids_that_could_leave_the_directory_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snaps");
        fs::write(tmp.path().join("secret.jpg"), b"secret").unwrap();
        let store = SnapshotStore::open(&dir, 10, DAY, 85).unwrap();
        for id in [
            "../secret",
            "..",
            "a/../../secret",
            "/etc/passwd",
            "a\\b",
            "",
            ".hidden",
            "a..b",
            "sp ace",
            "ünïcode",
        ] {
            assert!(!valid_id(id), "{id:?}");
            assert!(store.load(id).is_none(), "{id:?}");
            assert!(!store.contains(id));
            let err = store.save(id, &red_frame(), &annotation()).unwrap_err();
            assert!(matches!(err, SnapshotError::Id(_)), "{id:?}: {err}");
        }
        for id in ["street-3-1732899000123", "cam_1.v2", "A-z_0.9"] {
            assert!(valid_id(id), "{id:?}");
        }
        assert_eq!(jpgs(&dir), Vec::<String>::new());
    }

    #[test]
    fn an_event_of_a_label_outside_ascii_has_its_snapshot() {
        use crate::events::{EventTracker, EventsConfig};
        use crate::frame::{FrameMeta, FrameResult};
        let tmp = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(tmp.path(), 10, 7 * DAY, 85).unwrap();
        let mut tracker = EventTracker::new(EventsConfig {
            min_frames: 1,
            ..Default::default()
        });
        let mut r = FrameResult::watching_cat(FrameMeta::new("porch".into(), 0, None), 0.9);
        r.watched[0].label = "Café crème".into();
        let events = tracker.on_frame(&r);
        let id = &events[0].id;
        assert!(valid_id(id), "{id:?}");
        store.save(id, &red_frame(), &annotation()).unwrap();
        assert!(store.load(id).is_some());
    }

    #[test]
    fn a_zone_events_snapshot_outlines_its_zone() {
        let grey = Mat::new_rows_cols_with_default(360, 640, CV_8UC3, Scalar::all(90.0)).unwrap();
        let a = Annotation {
            zones: vec![("steps".into(), [0.5, 0.5, 0.9, 0.9])],
            ..annotation()
        };
        let img = decode(&encode_jpeg(&grey, Some(&a), 95).unwrap());
        // The zone's bottom edge is yellow (BGR 0, 220, 255); inside it stays grey.
        let edge = img.at_2d::<opencv::core::Vec3b>(323, 450).unwrap();
        assert!(edge[2] > 200 && edge[0] < 60, "{edge:?}");
        let inside = img.at_2d::<opencv::core::Vec3b>(290, 500).unwrap();
        assert!((inside[0] as i32 - 90).abs() < 20, "{inside:?}");
    }

    #[test]
    fn a_directory_that_cannot_be_made_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("a-file");
        fs::write(&file, b"x").unwrap();
        let dir = file.join("snaps");
        let err = SnapshotStore::open(&dir, 10, DAY, 85).err().unwrap();
        assert!(matches!(err, SnapshotError::Dir { .. }));
        assert!(
            err.to_string().contains(&dir.display().to_string()),
            "{err}"
        );
    }
}
