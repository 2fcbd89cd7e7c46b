//! `vigil check-config`: every problem at once, each naming its key; model problems are clear
//! errors, never panics; a network listen address without a token is refused.

mod common;

use common::*;

fn check(dir: &std::path::Path, body: &str) -> (i32, String) {
    let path = write_config(dir, body);
    let out = vigil().arg("check-config").arg(&path).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("panicked"), "{text}");
    (out.status.code().unwrap(), text)
}

#[test]
fn the_default_config_is_valid() {
    let out = vigil()
        .args(["check-config", "config.toml"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("OK"), "{text}");
}

/// A config whose structure is right but whose values are wrong in nine places.
const NINE_PROBLEMS: &str = r#"
[model]
dir = "{repo}/models"
[pipeline]
max_batch = 0
[decide]
threshold = 1.5
[decide.thresholds]
"fox squirel" = 0.3
[decide.groups.pet]
classes = ["tabby", "unicorn"]
[mqtt]
port = 0
[cameras.door]
source = "rtsp"
[cameras.yard]
source = "file"
path = "/nonexistent/clip.mp4"
[cameras."bad name!"]
source = "test"
fps = 0
"#;

#[test]
fn a_broken_config_lists_all_its_problems_naming_each_key() {
    let dir = tempfile::tempdir().unwrap();
    // A structural problem (a duration that is not one) is reported by its section ...
    let (code, text) = check(
        dir.path(),
        &NINE_PROBLEMS.replace(
            "max_batch = 0\n",
            "max_batch = 0\nmax_wait = \"10 parsecs\"\n",
        ),
    );
    assert_eq!(code, 1, "{text}");
    // The key and what it expects are named; the value is not quoted (it could be a secret
    // written under the wrong key).
    assert!(
        text.contains("pipeline: ") && text.contains("expected a duration in `max_wait`"),
        "{text}"
    );
    assert!(!text.contains("parsecs"), "{text}");
    // ... and once the structure is right, every value problem at once.
    let (code, text) = check(dir.path(), NINE_PROBLEMS);
    assert_eq!(code, 1, "{text}");
    for needle in [
        "pipeline.max_batch: must be at least 1",
        "decide.threshold: must be in 0..1",
        "decide.thresholds.\"fox squirel\": unknown label \"fox squirel\" (did you mean \"fox squirrel\"?)",
        "decide.groups.pet.classes: unknown label \"unicorn\"",
        "mqtt.port: must not be 0",
        "cameras.door.url: missing",
        "cameras.yard.path: /nonexistent/clip.mp4 does not exist",
        "cameras.\"bad name!\": camera names may hold only",
        "cameras.\"bad name!\".fps: must be in 1..=240",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert!(text.contains("9 problems"), "{text}");
}

#[test]
fn unknown_keys_and_sections_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (code, text) = check(
        dir.path(),
        "[mqtt]\nhots = \"x\"\n[camera.a]\nsource = \"test\"\n[cameras.b]\nsource = \"test\"\nfsp = 3\n",
    );
    assert_eq!(code, 1);
    assert!(text.contains("mqtt.hots: unknown key"), "{text}");
    assert!(text.contains("camera: unknown section"), "{text}");
    assert!(text.contains("cameras.b.fsp: unknown key"), "{text}");
}

#[test]
fn a_pipeline_injection_in_an_rtsp_url_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (code, text) = check(
        dir.path(),
        &format!(
            "{MODEL}[cameras.cam]\nsource = \"rtsp\"\nurl = \"rtsp://u:s3cret@10.0.0.1/x ! filesink location=/tmp/x\"\n"
        ),
    );
    assert_eq!(code, 1);
    assert!(
        text.contains("cameras.cam.url: must not contain spaces"),
        "{text}"
    );
    assert!(!text.contains("s3cret"), "{text}");
}

fn model_dir_with(dir: &std::path::Path, model_file: &str) -> String {
    // A manifest like the bundled one, pointing at another model file.
    let manifest = std::fs::read_to_string(repo().join("models/efficientnet-lite0.toml"))
        .unwrap()
        .replace(
            "file = \"efficientnet-lite0.onnx\"",
            &format!("file = \"{model_file}\""),
        )
        .replace(
            "labels = \"imagenet.labels.txt\"",
            &format!(
                "labels = \"{}\"",
                repo().join("models/imagenet.labels.txt").display()
            ),
        );
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::write(models.join("efficientnet-lite0.toml"), manifest).unwrap();
    format!(
        "[model]\ndir = \"{}\"\n[cameras.t]\nsource = \"test\"\n",
        models.display()
    )
}

#[test]
fn a_missing_model_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let body = model_dir_with(dir.path(), "gone.onnx");
    let (code, text) = check(dir.path(), &body);
    assert_eq!(code, 1);
    assert!(
        text.contains("model.variant: model file") && text.contains("gone.onnx does not exist"),
        "{text}"
    );
}

#[test]
fn a_model_whose_output_does_not_match_its_labels_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let body = model_dir_with(
        dir.path(),
        &repo()
            .join("tests/data/ten-classes.onnx")
            .display()
            .to_string(),
    );
    let (code, text) = check(dir.path(), &body);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("does not match its manifest") && text.contains("expected [batch, 1000]"),
        "{text}"
    );
}

#[test]
fn a_model_without_the_embedding_output_its_manifest_names_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let body = model_dir_with(
        dir.path(),
        &repo()
            .join("tests/data/logits-only.onnx")
            .display()
            .to_string(),
    );
    let (code, text) = check(dir.path(), &body);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("does not match its manifest")
            && text.contains("no embedding output named \"embedding\"")
            && text.contains("the model's outputs: \"logits\""),
        "{text}"
    );
}

#[test]
fn a_model_whose_embedding_output_is_not_one_vector_per_image_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let body = model_dir_with(
        dir.path(),
        &repo()
            .join("tests/data/unflattened-embedding.onnx")
            .display()
            .to_string(),
    );
    let (code, text) = check(dir.path(), &body);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("embedding output \"embedding\" has shape [-1, 3, 1, 1]")
            && text.contains("expected [batch, D]"),
        "{text}"
    );
}

#[test]
fn a_manifest_whose_embedding_is_its_score_output_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = repo().join("models/efficientnet-lite0.onnx");
    let body = model_dir_with(dir.path(), &model.display().to_string());
    let manifest = dir.path().join("models/efficientnet-lite0.toml");
    let text = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("embedding = \"embedding\"", "embedding = \"logits\"");
    std::fs::write(&manifest, text).unwrap();
    let (code, text) = check(dir.path(), &body);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("output_tensor.embedding \"logits\" must name another output"),
        "{text}"
    );
}

#[test]
fn a_model_with_another_input_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let body = model_dir_with(
        dir.path(),
        &repo()
            .join("tests/data/small-input.onnx")
            .display()
            .to_string(),
    );
    let (code, text) = check(dir.path(), &body);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("input \"input\" has shape [-1, 3, 128, 128]")
            && text.contains("NCHW [batch, 3, 224, 224]"),
        "{text}"
    );
}

#[test]
fn a_missing_onnx_runtime_library_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &format!("{MODEL}[cameras.t]\nsource = \"test\"\n"),
    );
    let out = vigil()
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .current_dir(dir.path())
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("ONNX Runtime library not found") && text.contains("make setup"),
        "{text}"
    );
}

#[test]
fn problems_never_quote_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    // An unterminated password string: the syntax error names the line, not its text.
    let (code, text) = check(
        dir.path(),
        "[mqtt]\nusername = \"u\"\npassword = \"Hunter2-Secret\n[cameras.a]\nsource = \"test\"\n",
    );
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("line 3"), "{text}");
    assert!(!text.contains("Hunter2"), "{text}");
    // A raw '/' in a URL's password: refused, asking for percent-encoding, the password hidden.
    let (code, text) = check(
        dir.path(),
        "[cameras.door]\nsource = \"rtsp\"\nurl = \"rtsp://viewer:Sl4sh/Hunter2@cam.local/live\"\n",
    );
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("cameras.door.url"), "{text}");
    assert!(text.contains("percent-encode"), "{text}");
    assert!(
        !text.contains("Hunter2") && !text.contains("Sl4sh"),
        "{text}"
    );
}

#[test]
fn out_of_range_numbers_are_refused_with_their_key() {
    let dir = tempfile::tempdir().unwrap();
    // An analysis rate so small that its interval overflowed a Duration (the camera's thread
    // panicked at start), a backoff whose doubling would overflow, a queue too big to allocate.
    let (code, text) = check(
        dir.path(),
        "[pipeline]\ncamera_queue = 1000000000000\nbatch_load = 1.5\n\
         [cameras.a]\nsource = \"test\"\nanalyze_fps = 1e-20\nretry_max = \"1000000000years\"\n",
    );
    assert_eq!(code, 1, "{text}");
    for key in [
        "cameras.a.analyze_fps: must be 0 (all frames) or between",
        "cameras.a.retry_max: must be at most 1day",
        "pipeline.camera_queue: must be at most 1000",
        "pipeline.batch_load: must be from 0 (always batch) to 1",
    ] {
        assert!(text.contains(key), "missing {key:?} in:\n{text}");
    }
}

#[test]
fn a_network_listen_address_needs_a_token_or_an_explicit_opt_out() {
    let dir = tempfile::tempdir().unwrap();
    let body = |http: &str| {
        format!(
            "{MODEL}[http]\nlisten = \"0.0.0.0:8080\"\n{http}\n[cameras.t]\nsource = \"test\"\n"
        )
    };
    let (code, text) = check(dir.path(), &body(""));
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("http.listen") && text.contains("http.allow_unauthenticated"),
        "{text}"
    );
    // `vigil run` refuses it too, before listening.
    let mut run = vigil();
    run.args(["run", "--config"])
        .arg(write_config(dir.path(), &body("")));
    let mut run = Running::spawn(run);
    let status = run.wait(std::time::Duration::from_secs(30));
    let log = run.log_text();
    assert!(!status.success(), "{log}");
    assert!(log.contains("http.allow_unauthenticated"), "{log}");
    assert!(!log.contains("HTTP server listening"), "{log}");
    // A token, or saying so on purpose, makes it valid.
    for ok in ["token = \"s3cret\"", "allow_unauthenticated = true"] {
        let (code, text) = check(dir.path(), &body(ok));
        assert_eq!(code, 0, "{ok}: {text}");
    }
}

#[test]
fn heads_and_their_labels_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dataset");
    // Head "door" has a training set with the label "package" (not trained yet): its label may
    // be named in thresholds already; a typo may not.
    std::fs::create_dir_all(data.join("door/package")).unwrap();
    std::fs::create_dir_all(data.join("door/nothing")).unwrap();
    let body = |extra: &str| {
        format!(
            "{MODEL}[teach]\ndata = \"{}\"\n{extra}\n\
             [cameras.a]\nsource = \"test\"\nhead = \"door\"\nthresholds = {{ package = 0.8 }}\n\
             [cameras.a.zones.steps]\nrect = [0.0, 0.0, 0.5, 0.5]\nhead = \"../x\"\n\
             thresholds = {{ pakage = 0.8 }}\n",
            data.display()
        )
    };
    let (code, text) = check(dir.path(), &body("[teach.capture]\nband = [0.8, 0.2]\n"));
    assert_eq!(code, 1, "{text}");
    for key in [
        "cameras.a.zones.steps.head: head names may hold only",
        "cameras.a.zones.steps.thresholds.pakage: unknown label \"pakage\"",
        "teach.capture.band: must be [low, high]",
    ] {
        assert!(text.contains(key), "missing {key:?} in:\n{text}");
    }
    assert!(!text.contains("cameras.a.thresholds.package"), "{text}");
}
