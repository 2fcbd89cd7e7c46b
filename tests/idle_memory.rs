//! ONNX Runtime's working memory is held only while frames are analysed: after
//! `pipeline.release_memory_after` without a batch, the inference session hands it back to the
//! system. In a test binary of its own, so that no other test moves the process's RSS.

mod common;

use std::time::{Duration, Instant};

use common::*;
use opencv::core::{CV_8UC3, Mat, Scalar};
use vigil::frame::{Frame, FrameMeta, Pixels};
use vigil::pipeline::GraphConfig;
use vigil::source::FullPolicy;

const BATCH: usize = 8;

fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: f64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096.0 / (1024.0 * 1024.0)
}

/// Runs one full batch through a graph whose sessions hand their memory back after
/// `release_after`; returns the RSS right after the batch's results and the lowest RSS seen
/// within 10 s after.
fn batch_then_idle(release_after: Duration) -> (f64, f64) {
    let (graph, queue, _stop, analysed) = one_camera_graph(
        &GraphConfig {
            workers: 1,
            max_batch: BATCH,
            max_wait: Duration::from_secs(2),
            camera_queue: BATCH,
            max_frame_age: Duration::ZERO,
            release_memory_after: release_after,
            keep_pixels: false,
        },
        FullPolicy::Block,
    );
    for index in 0..BATCH as u64 {
        let pixels =
            Mat::new_rows_cols_with_default(480, 640, CV_8UC3, Scalar::new(40.0, 90.0, 200.0, 0.0))
                .unwrap();
        assert!(queue.push(Frame {
            meta: FrameMeta::new("cam".into(), index, None),
            pixels: Pixels::Mat(pixels),
        }));
    }
    let results: Vec<u64> = (0..BATCH)
        .map(|_| analysed.recv_timeout(Duration::from_secs(30)).unwrap())
        .collect();
    assert_eq!(
        results,
        (0..BATCH as u64).collect::<Vec<_>>(),
        "every frame, in order"
    );
    let held = rss_mib();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut lowest = held;
    while Instant::now() < deadline {
        lowest = lowest.min(rss_mib());
        std::thread::sleep(Duration::from_millis(50));
    }
    queue.close();
    graph.control.seal();
    let (_never_tx, never) = crossbeam_channel::bounded::<()>(0);
    graph.wait(&never, Duration::from_secs(30)).unwrap();
    (held, lowest)
}

#[test]
fn an_idle_session_hands_its_working_memory_back_and_a_kept_one_does_not() {
    // Kept (0: never): a batch of 8's working memory stays held.
    let (held, lowest) = batch_then_idle(Duration::ZERO);
    assert!(
        held - lowest < 10.0,
        "kept: {held:.0} MiB after the batch, {lowest:.0} MiB at the lowest"
    );
    // Handed back after 300 ms idle: the same batch's working memory goes (37 MiB of a batch
    // of 8 on the 2-core x86-64 box this was written on; at least 3 MiB per frame is asked).
    let (held, lowest) = batch_then_idle(Duration::from_millis(300));
    assert!(
        held - lowest >= 3.0 * BATCH as f64,
        "handed back: {held:.0} MiB after the batch, {lowest:.0} MiB at the lowest"
    );
}
