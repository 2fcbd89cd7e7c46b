//! The graph's frame policies, in process with the real model: a live camera that is behind skips
//! its stale frames for its newest one (and never starves), a file camera never skips.

mod common;

use std::time::{Duration, Instant};

use common::*;
use opencv::core::{CV_8UC3, Mat, Scalar};
use vigil::frame::{Frame, FrameMeta, Pixels};
use vigil::pipeline::GraphConfig;
use vigil::source::FullPolicy;

fn frame(index: u64, arrived: Instant, width: i32, height: i32) -> Frame {
    let pixels = Mat::new_rows_cols_with_default(
        height,
        width,
        CV_8UC3,
        Scalar::new(30.0, 120.0, 220.0, 0.0),
    )
    .unwrap();
    Frame {
        meta: FrameMeta {
            arrived,
            ..FrameMeta::new("cam".into(), index, None)
        },
        pixels: Pixels::Mat(pixels),
    }
}

/// Feeds a camera a slow frame (the worker is busy with it while the others are queued), then
/// `stale` frames that arrived a second ago; returns the indices analysed and the frames the
/// camera counted as dropped behind.
fn run(live: bool, stale: u64) -> (Vec<u64>, u64) {
    let (graph, queue, _stop, analysed) = one_camera_graph(
        &GraphConfig {
            workers: 1,
            max_batch: 1,
            max_wait: Duration::from_millis(1),
            camera_queue: 16,
            max_frame_age: Duration::from_millis(100),
            batch_load: 0.0,
            release_memory_after: Duration::ZERO,
            keep_pixels: false,
        },
        if live {
            FullPolicy::DropOldest
        } else {
            FullPolicy::Block
        },
    );
    let stats = queue.stats.clone();
    // 24 Mpixels: milliseconds in the worker, while the next frames (made beforehand) are queued
    // in microseconds.
    let second_ago = Instant::now() - Duration::from_secs(1);
    let stale: Vec<Frame> = (1..=stale)
        .map(|i| frame(i, second_ago, 640, 480))
        .collect();
    // Frame 0 is fresh whatever the scheduling (its arrival is ahead of any clock reading).
    let fresh = Instant::now() + Duration::from_secs(3600);
    assert!(queue.push(frame(0, fresh, 6000, 4000)));
    for f in stale {
        assert!(queue.push(f));
    }
    queue.close();
    graph.control.seal();
    let (_never_tx, never) = crossbeam_channel::bounded::<()>(0);
    graph.wait(&never, Duration::from_secs(30)).unwrap();
    let indices: Vec<u64> = analysed.try_iter().collect();
    let dropped = stats
        .dropped_queue
        .load(std::sync::atomic::Ordering::Relaxed);
    (indices, dropped)
}

#[test]
fn a_live_camera_behind_skips_stale_frames_for_its_newest_and_never_starves() {
    let (analysed, dropped) = run(true, 6);
    // Frames 1-5 were stale with a newer frame waiting: skipped. Frame 6 was stale too, but the
    // newest: analysed.
    assert_eq!(analysed, [0, 6]);
    assert_eq!(dropped, 5);
}

#[test]
fn a_file_camera_never_skips_a_frame_however_old() {
    let (analysed, dropped) = run(false, 6);
    assert_eq!(analysed, [0, 1, 2, 3, 4, 5, 6]);
    assert_eq!(dropped, 0);
}
