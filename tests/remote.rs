//! `provider = "remote"` against a real NVIDIA Triton Inference Server: PyPI's nvidia-pytriton
//! runs the tritonserver binary it carries, serving a Python function that runs the bundled ONNX
//! model with onnxruntime (tests/triton/serve.py; `make setup` installs it into .deps/triton).

mod common;
#[path = "common/teach_data.rs"]
mod teach_data;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// A tritonserver serving the model, in a process group of its own so that killing it kills
/// the server and pytriton's helpers at once.
struct Triton {
    child: Child,
    grpc: u16,
    http: u16,
    metrics: u16,
    args: Vec<String>,
}

impl Triton {
    fn python() -> std::path::PathBuf {
        let python = repo().join(".deps/triton/bin/python");
        assert!(
            python.is_file(),
            "{} is missing: run `make setup` (it installs nvidia-pytriton)",
            python.display()
        );
        python
    }

    /// Starts a server with serve.py's extra `args`, and waits until its model is ready.
    fn start(args: &[&str]) -> Triton {
        let (grpc, http, metrics) = (free_port(), free_port(), free_port());
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let t = Triton {
            child: Self::serve(grpc, http, metrics, &args),
            grpc,
            http,
            metrics,
            args,
        };
        t.wait_ready();
        t
    }

    /// serve.py on these ports, in a process group of its own.
    fn serve(grpc: u16, http: u16, metrics: u16, args: &[String]) -> Child {
        Command::new(Self::python())
            .arg(repo().join("tests/triton/serve.py"))
            .arg("--model")
            .arg(repo().join("models/efficientnet-lite0.onnx"))
            .args(["--grpc-port", &grpc.to_string()])
            .args(["--http-port", &http.to_string()])
            .args(["--metrics-port", &metrics.to_string()])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("serve.py starts")
    }

    fn url(&self) -> String {
        format!("grpc://127.0.0.1:{}", self.grpc)
    }

    /// Polls the server's own readiness of the model (its HTTP binding).
    fn wait_ready(&self) {
        let name = self
            .args
            .iter()
            .position(|a| a == "--name")
            .map(|i| self.args[i + 1].clone())
            .unwrap_or_else(|| "efficientnet-lite0".into());
        let url = format!("http://127.0.0.1:{}/v2/models/{name}/ready", self.http);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        wait_for(
            Duration::from_secs(90),
            "Triton's model to be ready",
            || agent.get(&url).call().ok().filter(|r| r.status() == 200),
        );
    }

    /// SIGKILL to the whole group: the server dies at once, requests in flight and all.
    fn kill(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            // The group may be gone already (after SIGTERM): nothing to say then.
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
        // pytriton's shared-memory regions are named after the process that started it.
        if let Ok(dir) = std::fs::read_dir("/dev/shm") {
            let prefix = format!("pytrtion{}-", self.child.id());
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Kills the server and starts a new one on the same ports.
    fn restart(&mut self) {
        self.kill();
        self.child = Self::serve(self.grpc, self.http, self.metrics, &self.args);
        self.wait_ready();
    }
}

impl Drop for Triton {
    /// SIGTERM first, so that pytriton frees its shared memory; SIGKILL when that takes long.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.child.id())])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill();
    }
}

/// A config classifying with the server at `url`, with `extra` lines in `[inference.remote]`.
fn remote_config(dir: &Path, url: &str, extra: &str) -> std::path::PathBuf {
    write_config(
        dir,
        &format!(
            "{MODEL}[inference]\nprovider = \"remote\"\n[inference.remote]\nurl = \"{url}\"\n{extra}\n"
        ),
    )
}

fn classify(config: Option<&Path>, files: &[&str]) -> std::process::Output {
    let mut c = vigil();
    c.arg("classify");
    if let Some(config) = config {
        c.arg("--config").arg(config);
    }
    c.args(files.iter().map(|f| fixture(f)));
    c.output().expect("vigil runs")
}

/// (file, frame, top-5 (label, score)).
type FrameTop = (String, u64, Vec<(String, f64)>);

/// Every frame's top-5 (label, score), by file and frame (files are classified side by side).
fn tops(out: &std::process::Output) -> Vec<FrameTop> {
    let mut all: Vec<_> = json_lines(out)
        .iter()
        .map(|l| {
            let top = l["top"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    (
                        t["label"].as_str().unwrap().to_string(),
                        t["score"].as_f64().unwrap(),
                    )
                })
                .collect();
            (
                l["camera"].as_str().unwrap().to_string(),
                l["frame"].as_u64().unwrap(),
                top,
            )
        })
        .collect();
    all.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    all
}

/// Remote and local results frame by frame: the same top-1 everywhere, every top-5 score
/// within 1e-4.
fn assert_same(remote: &std::process::Output, local: &std::process::Output) {
    let (r, l) = (tops(remote), tops(local));
    assert_eq!(r.len(), l.len(), "as many frames");
    assert!(r.len() > 300, "the clip and the photos: {} lines", r.len());
    for (a, b) in r.iter().zip(&l) {
        assert_eq!((&a.0, a.1), (&b.0, b.1), "the same frames");
        assert_eq!(a.2[0].0, b.2[0].0, "top-1 of {} frame {}", a.0, a.1);
        for (x, y) in a.2.iter().zip(&b.2) {
            assert!(
                x.0 == y.0 && (x.1 - y.1).abs() <= 1e-4,
                "{} frame {}: remote {x:?} local {y:?}",
                a.0,
                a.1
            );
        }
    }
}

const FILES: [&str; 5] = [
    "photos.mp4",
    "squirrel_cls.jpg",
    "orange.jpg",
    "baboon.jpg",
    "chicky_512.png",
];

#[test]
fn remote_results_equal_local_ones_frame_by_frame() {
    let triton = Triton::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = remote_config(dir.path(), &triton.url(), "");
    let remote = classify(Some(&config), &FILES);
    let log = String::from_utf8_lossy(&remote.stderr);
    assert!(
        log.contains(&format!(
            "execution provider: remote ({}, model efficientnet-lite0)",
            triton.url()
        )),
        "{log}"
    );
    let local = classify(None, &FILES);
    assert_same(&remote, &local);

    // Heads read the embedding output: one trained over remote labels the same images the same
    // way whether the embeddings then come from the server or from the local model.
    let data = dir.path().join("dataset");
    let heads = dir.path().join("heads");
    teach_data::Props::porch(&repo().join("fixtures")).write(&data.join("porch"), 8, 3);
    let teach = format!(
        "[teach]\ndata = \"{}\"\nheads = \"{}\"\n",
        data.display(),
        heads.display()
    );
    let remote_cfg = remote_config(dir.path(), &triton.url(), "");
    let remote_text = std::fs::read_to_string(&remote_cfg).unwrap();
    let remote_cfg = dir.path().join("remote.toml");
    std::fs::write(&remote_cfg, format!("{teach}{remote_text}")).unwrap();
    let local_cfg = dir.path().join("local.toml");
    std::fs::write(
        &local_cfg,
        format!(
            "{teach}{}",
            MODEL.replace("{repo}", &repo().display().to_string())
        ),
    )
    .unwrap();
    let out = vigil()
        .args(["train", "-c"])
        .arg(&remote_cfg)
        .arg("porch")
        .output()
        .unwrap();
    let report = &json_lines(&out)[0];
    assert_eq!(report["version"], 1, "{report}");
    let images: Vec<_> = ["nothing", "package", "squirrel"]
        .iter()
        .flat_map(|l| {
            std::fs::read_dir(data.join("porch").join(l))
                .unwrap()
                .flatten()
        })
        .map(|e| e.path())
        .take(12)
        .collect();
    let with_head = |config: &Path| {
        let out = vigil()
            .arg("classify")
            .arg("--config")
            .arg(config)
            .args(["--head", "porch"])
            .args(&images)
            .output()
            .unwrap();
        let mut lines: Vec<(String, String, f64)> = json_lines(&out)
            .iter()
            .map(|l| {
                assert_eq!(l["head"]["name"], "porch", "{l}");
                (
                    l["camera"].as_str().unwrap().to_string(),
                    l["top"][0]["label"].as_str().unwrap().to_string(),
                    l["top"][0]["score"].as_f64().unwrap(),
                )
            })
            .collect();
        lines.sort_by(|a, b| a.0.cmp(&b.0));
        lines
    };
    let (r, l) = (with_head(&remote_cfg), with_head(&local_cfg));
    assert_eq!(r.len(), images.len());
    for (a, b) in r.iter().zip(&l) {
        assert_eq!(
            (&a.0, &a.1),
            (&b.0, &b.1),
            "head label over remote and local"
        );
        assert!((a.2 - b.2).abs() <= 1e-4, "{a:?} against {b:?}");
    }
}

#[test]
fn a_server_that_does_not_serve_the_manifest_model_is_refused_by_name() {
    // The scores output declared with 10 classes where the manifest has 1000 labels.
    let triton = Triton::start(&["--classes", "10"]);
    let dir = tempfile::tempdir().unwrap();
    let out = classify(
        Some(&remote_config(dir.path(), &triton.url(), "")),
        &["orange.jpg"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "model \"efficientnet-lite0\" on the inference server {} does not match its manifest: output \"logits\" has shape [-1, 10]; expected [batch, 1000]",
            triton.url()
        )),
        "{err}"
    );
    // A name the server does not serve.
    let out = classify(
        Some(&remote_config(
            dir.path(),
            &triton.url(),
            "model = \"nope\"",
        )),
        &["orange.jpg"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no ready model named \"nope\""), "{err}");
    drop(triton);

    // No server at all: refused at start, naming the address...
    let nobody = format!("grpc://127.0.0.1:{}", free_port());
    let cfg = remote_config(dir.path(), &nobody, "timeout = \"1s\"");
    let out = classify(Some(&cfg), &["orange.jpg"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("inference server {nobody} unavailable")),
        "{err}"
    );
    // ... unless the local model may stand in, which it does, saying so.
    let cfg = remote_config(
        dir.path(),
        &nobody,
        "timeout = \"1s\"\nfallback = \"local\"",
    );
    let out = classify(Some(&cfg), &["orange.jpg", "baboon.jpg"]);
    // Images go in on their own threads: their lines come in any order.
    let mut top: Vec<(String, String)> = json_lines(&out)
        .iter()
        .map(|l| {
            let camera = l["camera"].as_str().unwrap();
            let file = Path::new(camera).file_name().unwrap().to_string_lossy();
            (file.into_owned(), l["top"][0]["label"].to_string())
        })
        .collect();
    top.sort();
    assert_eq!(
        top,
        [
            ("baboon.jpg".to_string(), "\"baboon\"".to_string()),
            ("orange.jpg".to_string(), "\"orange\"".to_string())
        ]
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("INFERENCE SERVER UNAVAILABLE at start"),
        "{log}"
    );
    assert!(log.contains("classified by the local model"), "{log}");
}

fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut r = agent
        .get(&format!("http://{addr}{path}"))
        .call()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

fn remote_metric(addr: std::net::SocketAddr, name: &str) -> f64 {
    let body = metrics(addr);
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn vigil_rides_out_a_server_killed_and_restarted_mid_run() {
    let mut triton = Triton::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start();
    let body = format!(
        "{MODEL}[inference]\nprovider = \"remote\"\n[inference.remote]\nurl = \"{}\"\ntimeout = \"1s\"\nmax_backoff = \"1s\"\n\
         [pipeline]\ntune_batch = false\n\
         [mqtt]\nport = {}\n\
         [cameras.live]\nsource = \"test\"\nwidth = 160\nheight = 120\nfps = 10\nanalyze_fps = 5\n",
        triton.url(),
        broker.port
    );
    let mut vigil = run_vigil(dir.path(), &body);
    let addr = vigil.http_addr(Duration::from_secs(60));
    wait_for(
        Duration::from_secs(60),
        "frames classified by the server",
        || (remote_metric(addr, "vigil_remote_frames_total") >= 5.0).then_some(()),
    );
    let (status, ready) = get(addr, "/readyz");
    assert_eq!(status, 200, "{ready}");

    // The predict endpoint goes through the server too, and agrees with a local classify.
    let local = json_lines(&classify(None, &["baboon.jpg"]));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .build()
        .into();
    let jpeg = std::fs::read(fixture("baboon.jpg")).unwrap();
    let before = remote_metric(addr, "vigil_remote_frames_total");
    let mut r = agent
        .post(&format!(
            "http://{addr}/v1/models/efficientnet-lite0:predict"
        ))
        .content_type("image/jpeg")
        .send(&jpeg[..])
        .unwrap();
    assert_eq!(r.status(), 200);
    let j: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    let p = &j["predictions"][0]["top"][0];
    assert_eq!(p["label"], local[0]["top"][0]["label"], "{j}");
    let d = p["score"].as_f64().unwrap() - local[0]["top"][0]["score"].as_f64().unwrap();
    assert!(d.abs() <= 1e-4, "predict over remote vs local: {d}");
    assert!(remote_metric(addr, "vigil_remote_frames_total") > before);

    // The server dies: vigil says so and counts what it cannot classify.
    triton.kill();
    wait_for(
        Duration::from_secs(30),
        "/readyz to say the server is down",
        || {
            let (status, body) = get(addr, "/readyz");
            (status == 503 && body.contains("inference server") && body.contains("down"))
                .then_some(())
        },
    );
    assert_eq!(remote_metric(addr, "vigil_remote_up"), 0.0);
    let (_, cameras) = get(addr, "/api/cameras");
    let cameras: Value = serde_json::from_str(&cameras).unwrap();
    let inference = &cameras["cameras"][0]["inference"];
    assert_eq!(inference["state"], "down", "{cameras}");
    assert_eq!(inference["frames"], "dropped", "{cameras}");
    let dropped = |addr| {
        let body = metrics(addr);
        metric_value(&body, "vigil_stage_items_dropped_total{stage=\"infer\"}").unwrap_or(0.0)
    };
    wait_for(Duration::from_secs(30), "frames counted as dropped", || {
        (dropped(addr) >= 5.0).then_some(())
    });

    // It comes back: vigil finds it again by itself, and frames go to it.
    triton.restart();
    let frames = remote_metric(addr, "vigil_remote_frames_total");
    wait_for(
        Duration::from_secs(60),
        "frames classified after the restart",
        || (remote_metric(addr, "vigil_remote_frames_total") >= frames + 5.0).then_some(()),
    );
    assert_eq!(remote_metric(addr, "vigil_remote_up"), 1.0);
    assert!(remote_metric(addr, "vigil_remote_recoveries_total") >= 1.0);
    let (status, ready) = get(addr, "/readyz");
    assert_eq!(status, 200, "{ready}");
    let log = vigil.log_text();
    assert!(log.contains("INFERENCE SERVER UNAVAILABLE"), "{log}");
    assert!(log.contains("inference server answers again"), "{log}");

    // And it stops promptly: nothing waits on the server forever.
    triton.kill();
    let status = vigil.interrupt(Duration::from_secs(20));
    assert!(status.success(), "{}", vigil.log_text());
}
