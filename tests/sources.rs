//! File sources with damaged or changing streams: truncated data, garbage, a resolution change
//! mid-stream. Encoded here with real GStreamer pipelines.

mod common;

use std::path::Path;

use common::*;
use gstreamer as gst;
use gstreamer::prelude::*;

/// Encodes `frames` frames of a test pattern as a raw H.264 byte stream.
fn encode_h264(path: &Path, width: u32, height: u32, frames: u32) {
    gst::init().unwrap();
    let pipeline = gst::parse::launch(&format!(
        "videotestsrc num-buffers={frames} pattern=ball ! video/x-raw,width={width},height={height},framerate=25/1 \
         ! x264enc speed-preset=ultrafast key-int-max=10 ! video/x-h264,stream-format=byte-stream ! filesink name=out"
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    pipeline
        .by_name("out")
        .unwrap()
        .set_property("location", path.to_str().unwrap());
    pipeline.set_state(gst::State::Playing).unwrap();
    let bus = pipeline.bus().unwrap();
    let msg = bus
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(60),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        )
        .expect("encoding finishes");
    assert!(matches!(msg.view(), gst::MessageView::Eos(_)), "{msg:?}");
    pipeline.set_state(gst::State::Null).unwrap();
}

fn classify(path: &Path) -> (std::process::Output, Vec<serde_json::Value>) {
    let out = vigil().arg("classify").arg(path).output().unwrap();
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (out, lines)
}

#[test]
fn a_resolution_change_mid_stream_keeps_every_frame_flowing() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.h264"), dir.path().join("b.h264"));
    encode_h264(&a, 640, 480, 50);
    encode_h264(&b, 320, 240, 50);
    let joined = dir.path().join("joined.h264");
    let mut bytes = std::fs::read(&a).unwrap();
    bytes.extend(std::fs::read(&b).unwrap());
    std::fs::write(&joined, bytes).unwrap();
    let (out, lines) = classify(&joined);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert_eq!(lines.len(), 100, "{log}");
    assert!(
        log.contains("resolution changed")
            && log.contains("from=640x480")
            && log.contains("to=320x240"),
        "{log}"
    );
}

#[test]
fn truncated_and_corrupted_data_is_contained() {
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean.h264");
    encode_h264(&clean, 320, 240, 100);
    let bytes = std::fs::read(&clean).unwrap();
    // Garbage in the middle, then the stream cut off.
    let mut damaged = bytes[..bytes.len() / 3].to_vec();
    damaged.extend((0..20_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    damaged.extend(&bytes[bytes.len() / 2..bytes.len() * 3 / 4]);
    let path = dir.path().join("damaged.h264");
    std::fs::write(&path, damaged).unwrap();
    let (out, lines) = classify(&path);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains("panicked"), "{log}");
    // The intact parts are classified; what is lost is lost, not a crash.
    assert!(lines.len() >= 40, "{} frames\n{log}", lines.len());
    let frames: Vec<u64> = lines.iter().map(|l| l["frame"].as_u64().unwrap()).collect();
    assert!(
        frames.windows(2).all(|w| w[0] < w[1]),
        "frames stay in order"
    );
}
