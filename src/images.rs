//! Still images in and out: files and uploaded bytes (JPEG, PNG, BMP, WebP, TIFF) decoded into
//! 8-bit BGR `Mat`s, turned upright as their EXIF orientation says, and `Mat`s encoded as JPEG or
//! PNG. With the `image` crate rather than OpenCV's imgcodecs: Debian's imgcodecs links about
//! 80 libraries (GDAL, Poppler, GDCM, OpenEXR...) that cost every vigil process about 30 MiB of
//! memory for formats a camera never sends.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use opencv::core::{CV_8UC1, CV_8UC3, Mat};
use opencv::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}")]
    Decode(String),
    #[error("cannot encode a {cols}x{rows} image of OpenCV type {typ}: {message}")]
    Encode {
        cols: i32,
        rows: i32,
        typ: i32,
        message: String,
    },
    #[error("opencv: {0}")]
    OpenCv(#[from] opencv::Error),
}

/// Reads an image file as 8-bit BGR.
pub fn read(path: &Path) -> Result<Mat, ImageError> {
    let bytes = std::fs::read(path).map_err(|e| ImageError::Decode(e.to_string()))?;
    decode(&bytes)
}

/// Decodes an image file's bytes (the format is told by its content) as 8-bit BGR, upright.
pub fn decode(bytes: &[u8]) -> Result<Mat, ImageError> {
    let fail = |e: image::ImageError| ImageError::Decode(e.to_string());
    let mut decoder = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode(e.to_string()))?
        .into_decoder()
        .map_err(fail)?;
    let orientation = decoder.orientation().map_err(fail)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(fail)?;
    image.apply_orientation(orientation);
    bgr_mat(&image.into_rgb8())
}

/// An RGB image as a BGR `Mat` of its own.
fn bgr_mat(rgb: &RgbImage) -> Result<Mat, ImageError> {
    let (w, h) = (rgb.width() as i32, rgb.height() as i32);
    let packed = Mat::new_rows_cols_with_data(h, w * 3, rgb.as_raw())?;
    let packed = packed.reshape(3, h)?;
    let mut bgr = Mat::default();
    opencv::imgproc::cvt_color_def(&packed, &mut bgr, opencv::imgproc::COLOR_RGB2BGR)?;
    Ok(bgr)
}

/// Tightly packed RGB bytes of an 8-bit BGR or grey `Mat`.
fn rgb_bytes(mat: &Mat) -> Result<(u32, u32, Vec<u8>), ImageError> {
    let code = match mat.typ() {
        t if t == CV_8UC3 => opencv::imgproc::COLOR_BGR2RGB,
        t if t == CV_8UC1 => opencv::imgproc::COLOR_GRAY2RGB,
        _ => return Err(unsupported(mat)),
    };
    let mut rgb = Mat::default();
    opencv::imgproc::cvt_color_def(mat, &mut rgb, code)?;
    Ok((
        mat.cols() as u32,
        mat.rows() as u32,
        rgb.data_bytes()?.to_vec(),
    ))
}

/// Encodes an 8-bit BGR (or grey) `Mat` as JPEG at `quality` (1-100).
pub fn encode_jpeg(mat: &Mat, quality: u8) -> Result<Vec<u8>, ImageError> {
    let colour = match mat.typ() {
        t if t == CV_8UC3 => jpeg_encoder::ColorType::Bgr,
        t if t == CV_8UC1 => jpeg_encoder::ColorType::Luma,
        _ => return Err(unsupported(mat)),
    };
    let too_large = |_| encode_error(mat, "larger than 65535 pixels a side");
    let w = u16::try_from(mat.cols()).map_err(too_large)?;
    let h = u16::try_from(mat.rows()).map_err(too_large)?;
    let continuous;
    let pixels = if mat.is_continuous() {
        mat
    } else {
        continuous = mat.try_clone()?;
        &continuous
    };
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, quality.clamp(1, 100))
        .encode(pixels.data_bytes()?, w, h, colour)
        .map_err(|e| encode_error(mat, e))?;
    Ok(out)
}

/// Encodes an 8-bit BGR (or grey) `Mat` as PNG.
pub fn encode_png(mat: &Mat) -> Result<Vec<u8>, ImageError> {
    let (w, h, rgb) = rgb_bytes(mat)?;
    let mut out = Vec::new();
    RgbImage::from_raw(w, h, rgb)
        .expect("the buffer holds w * h * 3 bytes")
        .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(|e| encode_error(mat, e))?;
    Ok(out)
}

/// Writes an 8-bit BGR (or grey) `Mat` to `path`, as JPEG (quality 95) or PNG by its extension.
pub fn write(path: &Path, mat: &Mat) -> Result<(), ImageError> {
    let png = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    let bytes = if png {
        encode_png(mat)?
    } else {
        encode_jpeg(mat, 95)?
    };
    std::fs::write(path, bytes).map_err(|e| encode_error(mat, e))
}

fn unsupported(mat: &Mat) -> ImageError {
    encode_error(mat, "only 8-bit BGR and grey images are encoded")
}

fn encode_error(mat: &Mat, e: impl std::fmt::Display) -> ImageError {
    ImageError::Encode {
        cols: mat.cols(),
        rows: mat.rows(),
        typ: mat.typ(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opencv::core::{Scalar, Vec3b};

    fn pattern() -> Mat {
        // Blue on the left half, red on the right (BGR).
        let mut m =
            Mat::new_rows_cols_with_default(24, 32, CV_8UC3, Scalar::new(255.0, 0.0, 0.0, 0.0))
                .unwrap();
        for y in 0..24 {
            for x in 16..32 {
                *m.at_2d_mut::<Vec3b>(y, x).unwrap() = Vec3b::from([0, 0, 255]);
            }
        }
        m
    }

    #[test]
    fn png_round_trips_exactly_and_keeps_bgr_order() {
        let m = pattern();
        let back = decode(&encode_png(&m).unwrap()).unwrap();
        assert_eq!((back.rows(), back.cols(), back.typ()), (24, 32, CV_8UC3));
        assert_eq!(back.data_bytes().unwrap(), m.data_bytes().unwrap());
    }

    #[test]
    fn jpeg_round_trips_closely_and_grey_images_encode() {
        let back = decode(&encode_jpeg(&pattern(), 95).unwrap()).unwrap();
        let left = back.at_2d::<Vec3b>(12, 4).unwrap();
        let right = back.at_2d::<Vec3b>(12, 28).unwrap();
        assert!(left[0] > 230 && left[2] < 25, "{left:?}");
        assert!(right[2] > 230 && right[0] < 25, "{right:?}");
        // A header over the left 20 of 32 columns (rows not contiguous) encodes as itself.
        let mut whole = pattern();
        // SAFETY: the header stays inside `whole`, which outlives it.
        let left = unsafe {
            Mat::new_rows_cols_with_data_unsafe(24, 20, CV_8UC3, whole.data_mut().cast(), 32 * 3)
        }
        .unwrap();
        assert!(!left.is_continuous());
        let part = decode(&encode_jpeg(&left, 95).unwrap()).unwrap();
        assert_eq!((part.cols(), part.rows()), (20, 24));
        let (blue, red) = (
            part.at_2d::<Vec3b>(12, 4).unwrap(),
            part.at_2d::<Vec3b>(12, 19).unwrap(),
        );
        assert!(blue[0] > 230 && red[2] > 230, "{blue:?} {red:?}");
        let grey = Mat::new_rows_cols_with_default(8, 8, CV_8UC1, Scalar::all(128.0)).unwrap();
        let g = decode(&encode_jpeg(&grey, 90).unwrap()).unwrap();
        assert!((i32::from(g.at_2d::<Vec3b>(4, 4).unwrap()[1]) - 128).abs() <= 2);
    }

    #[test]
    fn bytes_that_are_no_image_and_unsupported_mats_are_errors() {
        assert!(decode(b"not an image at all").is_err());
        assert!(decode(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 0]).is_err());
        let float = Mat::new_rows_cols_with_default(4, 4, opencv::core::CV_32FC1, Scalar::all(0.0))
            .unwrap();
        let e = encode_jpeg(&float, 90).unwrap_err().to_string();
        assert!(e.contains("only 8-bit BGR and grey"), "{e}");
    }
}
