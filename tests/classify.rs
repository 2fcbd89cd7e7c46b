//! `vigil classify` on real photos and a real video, with the bundled model.

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;

fn classify(args: &[&std::ffi::OsStr]) -> (std::process::Output, Vec<Value>) {
    classify_logging(args, "info")
}

/// `classify` with `RUST_LOG` at `log`.
fn classify_logging(args: &[&std::ffi::OsStr], log: &str) -> (std::process::Output, Vec<Value>) {
    let out = vigil()
        .env("RUST_LOG", log)
        .arg("classify")
        .args(args)
        .output()
        .expect("vigil runs");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("every stdout line is JSON"))
        .collect();
    (out, lines)
}

fn top1(line: &Value) -> (&str, f64) {
    let t = &line["top"][0];
    (t["label"].as_str().unwrap(), t["score"].as_f64().unwrap())
}

#[test]
fn sample_photos_get_their_imagenet_class_as_top_1() {
    let photos = [
        ("squirrel_cls.jpg", &["fox squirrel"][..]),
        ("orange.jpg", &["orange"]),
        ("baboon.jpg", &["baboon"]),
        ("chicky_512.png", &["Pekinese"]),
        // The photo is of a butterfly; which species the model favours is its business.
        (
            "butterfly.jpg",
            &[
                "ringlet",
                "admiral",
                "monarch",
                "cabbage butterfly",
                "sulphur butterfly",
                "lycaenid",
            ],
        ),
    ];
    let paths: Vec<_> = photos.iter().map(|(f, _)| fixture(f)).collect();
    let args: Vec<_> = paths.iter().map(|p| p.as_os_str()).collect();
    let (out, lines) = classify(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines.len(), photos.len(), "one line per photo");
    for ((file, expected), path) in photos.iter().zip(&paths) {
        let line = lines
            .iter()
            .find(|l| l["camera"] == path.display().to_string())
            .unwrap_or_else(|| panic!("no line for {file}"));
        let (label, score) = top1(line);
        assert!(
            expected.contains(&label),
            "{file}: top-1 {label} ({score:.3})"
        );
        assert_eq!(line["frame"], 0);
        assert_eq!(line["top"].as_array().unwrap().len(), 5);
        assert_eq!(line["model"]["name"], "efficientnet-lite0");
    }
    let squirrel = lines.iter().find(|l| top1(l).0 == "fox squirrel").unwrap();
    assert!(
        top1(squirrel).1 > 0.8,
        "squirrel confidence {}",
        top1(squirrel).1
    );
    // The log says which execution provider runs.
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("execution provider: cpu"), "{log}");
}

#[test]
fn a_video_gives_one_line_per_frame_in_order_with_the_right_segments() {
    let video = fixture("photos.mp4");
    let (out, lines) = classify(&[video.as_os_str(), "--top-k".as_ref(), "3".as_ref()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines.len(), 300, "4 segments of 75 frames");
    let frames: Vec<u64> = lines.iter().map(|l| l["frame"].as_u64().unwrap()).collect();
    assert_eq!(
        frames,
        (0..300).collect::<Vec<_>>(),
        "every frame, in order"
    );
    let pts: Vec<f64> = lines.iter().map(|l| l["pts"].as_f64().unwrap()).collect();
    assert!(pts.windows(2).all(|w| w[0] <= w[1]), "pts never go back");
    for (segment, expected) in ["fox squirrel", "orange", "baboon", "Pekinese"]
        .iter()
        .enumerate()
    {
        // Leave the frames next to a cut alone (the encoder blends them).
        let inner = &lines[segment * 75 + 3..segment * 75 + 72];
        let right = inner.iter().filter(|l| top1(l).0 == *expected).count();
        assert_eq!(
            right,
            inner.len(),
            "segment {segment}: {expected} on every inner frame"
        );
    }
    assert_eq!(lines[0]["top"].as_array().unwrap().len(), 3);
}

/// A clip with B-frames, decoded on one thread (one core): Debian 12's libav cannot decode the
/// B-frame before the last cut and skips it. The frames that came out are classified in order,
/// and classify says how many coded frames it skipped, so that nothing goes missing unsaid.
#[test]
fn frames_the_decoder_skips_are_counted_and_said() {
    let dir = tempfile::tempdir().unwrap();
    let segments = [
        ("squirrel_cls.jpg", 75),
        ("orange.jpg", 75),
        ("baboon.jpg", 75),
        ("chicky_512.png", 75),
    ];
    let frames = make_frames(dir.path(), &segments);
    let clip = dir.path().join("bframes.mp4");
    gst_run(&format!(
        "multifilesrc location=\"{}/%05d.jpg\" index=0 caps=image/jpeg,framerate=25/1 ! jpegdec \
         ! videoconvert ! x264enc speed-preset=fast key-int-max=25 bframes=3 ! mp4mux \
         ! filesink location=\"{}\"",
        frames.display(),
        clip.display()
    ));
    let out = std::process::Command::new("taskset")
        .args(["--cpu-list", "0"])
        .arg(env!("CARGO_BIN_EXE_vigil"))
        .env("ORT_DYLIB_PATH", ort_library())
        .current_dir(repo())
        .args(["classify", "--config"])
        .arg(write_config(dir.path(), MODEL))
        .arg(&clip)
        .output()
        .expect("taskset runs vigil");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines = json_lines(&out);
    let numbers: Vec<u64> = lines.iter().map(|l| l["frame"].as_u64().unwrap()).collect();
    assert_eq!(
        numbers,
        (0..lines.len() as u64).collect::<Vec<_>>(),
        "in order"
    );
    let skipped = 300 - lines.len();
    assert!(
        skipped > 0,
        "this libav decodes the clip whole: the test no longer tests the skip"
    );
    let said = format!(
        "{}: {skipped} of 300 coded frames could not be decoded and were skipped",
        clip.display()
    );
    assert!(stderr.contains(&said), "{said:?} not in:\n{stderr}");
}

/// The most videos open at once in a `classify` run's log: started and not yet at their end.
fn most_open(stderr: &str) -> usize {
    let (mut open, mut most) = (0usize, 0usize);
    for line in stderr.lines() {
        if line.contains("starting camera") {
            open += 1;
            most = most.max(open);
        } else if line.contains("end of file") {
            open = open.saturating_sub(1);
        }
    }
    most
}

#[test]
fn inputs_are_decoded_at_most_jobs_at_a_time_and_every_frame_is_classified() {
    let (video, orange) = (fixture("photos.mp4"), fixture("orange.jpg"));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (jobs, expected_most) in [("1", 1), ("2", 2)] {
        let (out, lines) = classify_logging(
            &[
                "--jobs".as_ref(),
                jobs.as_ref(),
                video.as_os_str(),
                orange.as_os_str(),
                video.as_os_str(),
                video.as_os_str(),
            ],
            "info,vigil::source=debug",
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        // Each video's decoder (plugged by decodebin) gets its share of half the cores, one
        // thread at least.
        let share = (cores / (2 * jobs.parse::<usize>().unwrap())).max(1);
        let set: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("video decoder threads"))
            .collect();
        assert_eq!(set.len(), 3, "--jobs {jobs}: {set:?}");
        assert!(
            set.iter().all(|l| l.contains(&format!("threads={share}"))),
            "--jobs {jobs} on {cores} cores: {set:?}"
        );
        let most = most_open(&stderr);
        assert!(
            most <= expected_most && most >= 1,
            "--jobs {jobs}: {most} videos open at once\n{stderr}"
        );
        if jobs == "1" {
            assert_eq!(most, 1);
        }
        // Every input whole, each in its own order.
        let v = video.display().to_string();
        for name in [v.clone(), format!("{v}#2"), format!("{v}#3")] {
            let frames: Vec<u64> = lines
                .iter()
                .filter(|l| l["camera"] == name.as_str())
                .map(|l| l["frame"].as_u64().unwrap())
                .collect();
            assert_eq!(
                frames,
                (0..300).collect::<Vec<_>>(),
                "--jobs {jobs}: {name}"
            );
        }
        let o: Vec<&Value> = lines
            .iter()
            .filter(|l| l["camera"] == orange.display().to_string().as_str())
            .collect();
        assert_eq!(o.len(), 1);
        assert_eq!(top1(o[0]).0, "orange");
        assert_eq!(lines.len(), 901);
    }
}

#[test]
fn unreadable_inputs_are_reported_and_the_others_still_classified() {
    let dir = tempfile::tempdir().unwrap();
    let garbage_image = dir.path().join("garbage.jpg");
    std::fs::write(&garbage_image, b"this is not a jpeg").unwrap();
    let garbage_video = dir.path().join("garbage.mp4");
    std::fs::write(&garbage_video, vec![0x47u8; 100_000]).unwrap();
    let missing = dir.path().join("missing.png");
    let good = fixture("orange.jpg");
    let (out, lines) = classify(&[
        garbage_image.as_os_str(),
        garbage_video.as_os_str(),
        missing.as_os_str(),
        good.as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("garbage.jpg: cannot decode this image"),
        "{stderr}"
    );
    assert!(
        stderr.contains("garbage.mp4") && stderr.contains("no video frame"),
        "{stderr}"
    );
    assert!(stderr.contains("missing.png: no such file"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(lines.len(), 1);
    assert_eq!(top1(&lines[0]).0, "orange");
}

#[test]
fn a_path_that_looks_like_pipeline_syntax_is_only_a_file_name() {
    // If the path were pasted into the pipeline description, filesink would write evil.mp4.
    let dir = tempfile::tempdir().unwrap();
    let tricky = dir.path().join("clip ! filesink location=evil.mp4");
    std::fs::copy(fixture("photos.mp4"), &tricky).unwrap();
    let out = vigil()
        .current_dir(dir.path())
        .env("VIGIL_UNUSED", "1")
        .args(["classify", "--config"])
        .arg(write_config(dir.path(), MODEL))
        .arg(&tricky)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(lines, 300, "the file with the odd name was read as a file");
    assert!(!dir.path().join("evil.mp4").exists());
    assert!(!common::repo().join("evil.mp4").exists());
}

#[test]
fn an_unavailable_gpu_provider_falls_back_loudly_or_fails_when_required() {
    let dir = tempfile::tempdir().unwrap();
    let photo = fixture("orange.jpg");
    let run = |extra: &str| {
        let config = write_config(
            dir.path(),
            &format!("{MODEL}[inference]\nprovider = \"cuda\"\n{extra}"),
        );
        vigil()
            .args(["classify", "--config"])
            .arg(&config)
            .arg(&photo)
            .output()
            .unwrap()
    };
    // The CPU build of ONNX Runtime has no CUDA: vigil says so and runs on the CPU.
    let out = run("");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("WARN")
            && log.contains("EXECUTION PROVIDER UNAVAILABLE")
            && log.contains("wanted=cuda"),
        "{log}"
    );
    assert!(
        log.contains("execution provider: cpu") && log.contains("requested=cuda"),
        "{log}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    // Required: a clear refusal, no result.
    let out = run("require_provider = true\n");
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{log}");
    assert!(log.contains("execution provider cuda is required"), "{log}");
    assert_eq!(log.matches("is required").count(), 1, "said once: {log}");
    assert!(out.stdout.is_empty());
}

#[test]
fn classify_exits_at_once_when_its_output_pipe_closes() {
    // `head` closes the pipe after its lines: on stdout and stderr together, and on stdout alone.
    for redirect in ["2>&1", "2>/dev/null"] {
        let script = format!(
            "\"{}\" classify \"{}\" {redirect} | head -2 >/dev/null; echo \"${{PIPESTATUS[0]}}\"",
            env!("CARGO_BIN_EXE_vigil"),
            fixture("photos.mp4").display()
        );
        let mut child = std::process::Command::new("bash")
            .args(["-c", &script])
            .env("ORT_DYLIB_PATH", ort_library())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let status = wait_for(Duration::from_secs(30), "vigil to exit", || {
            child.try_wait().unwrap()
        });
        assert!(status.success());
        let mut out = String::new();
        std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
        let code: i32 = out.trim().parse().unwrap();
        assert!(code == 0 || code == 141, "{redirect}: vigil exited {code}");
    }
}

/// The batch sizes measured at the first start are kept (`pipeline.tuning_cache`): the next
/// start with the same model on the same machine takes them; other inference settings are
/// measured on their own.
#[test]
fn the_measured_batch_sizes_are_kept_for_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("state/tuning.json");
    let config = |extra: &str| {
        write_config(
            dir.path(),
            &format!(
                "{MODEL}[pipeline]\ntuning_cache = \"{}\"\n{extra}",
                cache.display()
            ),
        )
    };
    let start = |config: &std::path::Path| {
        let out = vigil()
            .args(["classify", "--config"])
            .arg(config)
            .arg(fixture("orange.jpg"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(json_lines(&out).len(), 1, "{stderr}");
        let limit = stderr
            .lines()
            .find_map(|l| l.split("batch_limit=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no batch limit logged:\n{stderr}"))
            .to_string();
        (stderr.contains("as measured earlier"), limit, stderr)
    };
    let default = config("");
    let (cached, first, log) = start(&default);
    assert!(!cached, "nothing to take yet:\n{log}");
    let kept: Value = serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
    let entries = kept["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    let batches: Vec<u64> = entries[0]["measures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["batch"].as_u64().unwrap())
        .collect();
    assert_eq!(batches, [1, 2, 4, 8]);
    let (cached, second, log) = start(&default);
    assert!(cached, "the second start takes the figures:\n{log}");
    assert_eq!(second, first, "the same figures give the same limit");
    // Other inference settings are another entry, measured.
    let one_thread = config("[inference]\nintra_threads = 1\n");
    let (cached, _, log) = start(&one_thread);
    assert!(!cached, "measured for its own settings:\n{log}");
    let kept: Value = serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
    assert_eq!(kept["entries"].as_array().unwrap().len(), 2);
    assert!(start(&one_thread).0);
}
