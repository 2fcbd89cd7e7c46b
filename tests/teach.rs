//! Teaching vigil its own classes, on training sets the tests make (objects pasted into a real
//! background under random light, noise and JPEG quality): `vigil train` and `classify --head`
//! through the real binary and model, and the live loop end to end against mosquitto: frames
//! captured into the inbox, labelled and trained through HTTP, the new version live without a
//! restart, its event fired, no frame dropped.

mod common;
#[path = "common/teach_data.rs"]
mod teach_data;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use teach_data::Props;

/// The two tests each keep both cores busy: one at a time, so that the live one's timing holds.
static HEAVY: Mutex<()> = Mutex::new(());

fn config(dir: &Path, extra: &str) -> PathBuf {
    write_config(
        dir,
        &format!(
            "{MODEL}[teach]\ndata = \"{}\"\nheads = \"{}\"\n{extra}",
            dir.join("dataset").display(),
            dir.join("heads").display()
        ),
    )
}

fn vigil_out(args: &[&str]) -> Output {
    vigil().args(args).output().expect("vigil runs")
}

fn stdout_json(out: &Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn a_head_trained_on_20_images_per_class_labels_200_held_out_images() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let cfg = cfg.to_str().unwrap();
    let props = Props::porch(&repo().join("fixtures"));
    let set = dir.path().join("dataset/porch");
    props.write(&set, 20, 1);

    // A label with too few images is refused, naming it.
    std::fs::create_dir_all(set.join("cat")).unwrap();
    std::fs::copy(set.join("nothing/1-0000.jpg"), set.join("cat/a.jpg")).unwrap();
    let out = vigil_out(&["train", "-c", cfg, "porch"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("label \"cat\" has 1 image(s)"), "{err}");
    std::fs::remove_dir_all(set.join("cat")).unwrap();
    // So is a file that is not an image.
    std::fs::write(set.join("package/broken.jpg"), b"not a jpeg").unwrap();
    let out = vigil_out(&["train", "-c", cfg, "porch"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("broken.jpg"), "{err}");
    std::fs::remove_file(set.join("package/broken.jpg")).unwrap();

    let started = Instant::now();
    let report = stdout_json(&vigil_out(&["train", "-c", cfg, "porch"]), "vigil train");
    let wall = started.elapsed();
    assert_eq!(report["version"], 1, "{report}");
    assert_eq!(report["live"], true, "{report}");
    assert_eq!(report["samples"], 60);
    assert_eq!(report["labels"], json!(["nothing", "package", "squirrel"]));
    let cv = report["metrics"]["accuracy"].as_f64().unwrap();
    assert!(cv >= 0.9, "cross-validated accuracy {cv}: {report}");
    let confusion = report["metrics"]["confusion"].as_array().unwrap();
    assert_eq!(confusion.len(), 3);
    eprintln!(
        "trained 60 images in {:.2} s (embedding {:.2} s), cross-validated accuracy {cv:.3}",
        wall.as_secs_f64(),
        report["seconds"]["embedding"]
    );

    // 200 held-out images (another seed): 67 of each label but one.
    let held = dir.path().join("held-out");
    props.write(&held, 67, 99);
    std::fs::remove_file(held.join("squirrel/99-0066.jpg")).unwrap();
    let mut paths: Vec<PathBuf> = ["nothing", "package", "squirrel"]
        .iter()
        .flat_map(|l| std::fs::read_dir(held.join(l)).unwrap().flatten())
        .map(|e| e.path())
        .collect();
    paths.sort();
    assert_eq!(paths.len(), 200);
    let mut args = vec!["classify", "-c", cfg, "--head", "porch"];
    args.extend(paths.iter().map(|p| p.to_str().unwrap()));
    let lines = json_lines(&vigil_out(&args));
    assert_eq!(lines.len(), 200);
    let mut right = 0;
    for l in &lines {
        assert_eq!(l["head"], json!({"name": "porch", "version": 1}), "{l}");
        let truth = Path::new(l["camera"].as_str().unwrap())
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let top = l["top"][0]["label"].as_str().unwrap();
        right += usize::from(top == truth);
    }
    let accuracy = right as f64 / 200.0;
    eprintln!("held-out accuracy: {right}/200");
    assert!(accuracy >= 0.97, "held-out accuracy {accuracy}");

    // Retraining on the same set is instant (every embedding cached) and not worse than
    // version 1 on the same folds: in service. Two at once (the CLI beside the HTTP API, two
    // operators) each get a version of their own: 2 and 3.
    let (a, b) = std::thread::scope(|s| {
        let retrain = || vigil_out(&["train", "-c", cfg, "porch"]);
        let (a, b) = (s.spawn(retrain), s.spawn(retrain));
        (a.join().unwrap(), b.join().unwrap())
    });
    let reports = [stdout_json(&a, "retrain"), stdout_json(&b, "retrain")];
    let mut versions: Vec<u64> = reports
        .iter()
        .map(|r| r["version"].as_u64().unwrap())
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, [2, 3], "{reports:?}");
    for report in &reports {
        assert_eq!(report["embedded"], 0, "{report}");
        assert_eq!(report["live"], true, "{report}");
    }
    let list = stdout_json(&vigil_out(&["heads", "-c", cfg]), "vigil heads");
    let porch = &list["heads"][0];
    assert_eq!(porch["head"], "porch");
    assert!(
        [2, 3].contains(&porch["current"].as_u64().unwrap()),
        "{porch}"
    );
    assert_eq!(porch["versions"].as_array().unwrap().len(), 3);
    assert!(
        vigil_out(&["heads", "-c", cfg, "pin", "porch", "2"])
            .status
            .success()
    );
    let out = vigil_out(&["heads", "-c", cfg, "rollback", "porch"]);
    assert!(out.status.success());
    let list = stdout_json(&vigil_out(&["heads", "-c", cfg]), "vigil heads");
    assert_eq!(list["heads"][0]["current"], 1);
    let out = vigil_out(&["heads", "-c", cfg, "pin", "porch", "7"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no version 7"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A head name that is not a folder name is refused before any file is touched.
    let out = vigil_out(&["train", "-c", cfg, "../etc"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a head name"));
}

/// A looping clip of `frames` images of label `label` of the porch set, `fps` frames per second.
fn clip(dir: &Path, props: &Props, label: usize, frames: usize, fps: u32, seed: u64) -> PathBuf {
    let jpgs = dir.join(format!("frames-{label}"));
    std::fs::create_dir_all(&jpgs).unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    for i in 0..frames {
        let img = props.render(label, &mut rng);
        let path = jpgs.join(format!("{i:05}.jpg"));
        std::fs::write(&path, vigil::images::encode_jpeg(&img, 90).unwrap()).unwrap();
    }
    let out = dir.join(format!("clip-{label}.mp4"));
    encode_clip(&jpgs, fps, &out);
    out
}

struct Http {
    agent: ureq::Agent,
    base: String,
}

impl Http {
    fn new(vigil: &Running) -> Http {
        let addr = vigil.http_addr(Duration::from_secs(60));
        Http {
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(30)))
                .build()
                .into(),
            base: format!("http://{addr}"),
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let result = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            (_, Some(b)) => self
                .agent
                .post(&url)
                .content_type("application/json")
                .send(b.to_string().as_bytes()),
            _ => self.agent.post(&url).send_empty(),
        };
        let mut r = result.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = r.status().as_u16();
        let bytes = r.body_mut().read_to_vec().unwrap();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, json)
    }

    fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, json) = self.call(method, path, body);
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {json}"
        );
        json
    }
}

/// Frames dropped for being behind, all cameras.
fn dropped(http: &Http) -> f64 {
    let body = metrics(http.base.trim_start_matches("http://").parse().unwrap());
    ["pkg", "empty"]
        .iter()
        .map(|c| {
            metric_value(
                &body,
                &format!("vigil_camera_frames_dropped_total{{camera=\"{c}\",reason=\"behind\"}}"),
            )
            .unwrap_or_else(|| panic!("no drop counter for {c}"))
        })
        .sum()
}

#[test]
fn the_live_loop_captures_labels_trains_and_switches_without_a_restart() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let props = Props::porch(&repo().join("fixtures"));
    // Two cameras bound to head "porch": one sees packages, the other an empty porch.
    let pkg = clip(dir.path(), &props, 1, 40, 4, 7);
    let empty = clip(dir.path(), &props, 0, 40, 4, 8);
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, "vigil/#");
    let camera = |path: &Path| {
        format!(
            "source = \"file\"\npath = \"{}\"\nloop = true\nrealtime = true\nhead = \"porch\"\n",
            path.display()
        )
    };
    let body = format!(
        "{MODEL}[mqtt]\nport = {}\n[events]\nmin_duration = \"0s\"\n\
         [decide]\nthreshold = 0.6\n\
         [teach]\ndata = \"{}\"\nheads = \"{}\"\n\
         [teach.capture]\nband = [0.0, 1.0]\ninterval = \"200ms\"\nmin_distance = 0.01\n\
         [cameras.pkg]\n{}[cameras.empty]\n{}",
        broker.port,
        dir.path().join("dataset").display(),
        dir.path().join("heads").display(),
        camera(&pkg),
        camera(&empty),
    );
    let mut vigil = run_vigil(dir.path(), &body);
    let http = Http::new(&vigil);

    // Untrained, the head's regions keep the model's labels (version 0) and feed its inbox.
    let listed = http.ok("GET", "/api/heads", None);
    assert_eq!(listed["heads"][0]["head"], "porch", "{listed}");
    assert_eq!(listed["heads"][0]["current"], Value::Null);
    assert_eq!(listed["heads"][0]["regions"], json!(["empty", "pkg"]));
    let (status, _) = http.call("POST", "/api/cameras/nope/wrong", None);
    assert_eq!(status, 404);
    let inbox = wait_for(Duration::from_secs(90), "6 captures of each camera", || {
        let inbox = http.ok("GET", "/api/heads/porch/inbox", None);
        let count = |c: &str| {
            inbox["samples"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["camera"] == c)
                .count()
        };
        (count("pkg") >= 6 && count("empty") >= 6).then_some(inbox)
    });
    let sample = &inbox["samples"][0];
    assert_eq!(sample["head"], "porch");
    assert_eq!(sample["head_version"], 0);
    assert!(
        sample["model"]
            .as_str()
            .unwrap()
            .starts_with("efficientnet")
    );
    let id = sample["id"].as_str().unwrap();
    let image = http
        .agent
        .get(format!(
            "{}/api/heads/porch/inbox/{id}/image.jpg",
            http.base
        ))
        .call()
        .unwrap()
        .body_mut()
        .read_to_vec()
        .unwrap();
    assert_eq!(&image[..2], &[0xff, 0xd8], "a JPEG");

    // Label through HTTP: the camera tells the truth here.
    let mut labelled = 0;
    for s in inbox["samples"].as_array().unwrap() {
        let label = if s["camera"] == "pkg" {
            "package"
        } else {
            "nothing"
        };
        let id = s["id"].as_str().unwrap();
        http.ok(
            "POST",
            &format!("/api/heads/porch/inbox/{id}/label"),
            Some(&json!({ "label": label })),
        );
        labelled += 1;
    }
    assert!(labelled >= 12);
    // Bad requests are refused with the reason, and nothing moves.
    let (status, j) = http.call(
        "POST",
        "/api/heads/porch/inbox/../label",
        Some(&json!({"label": "x"})),
    );
    assert!(status == 400 || status == 404, "{status} {j}");
    let (status, j) = http.call(
        "POST",
        "/api/heads/porch/inbox/nope/label",
        Some(&json!({"label": "../up"})),
    );
    assert_eq!(status, 400, "{j}");
    let (status, j) = http.call(
        "POST",
        "/api/heads/porch/inbox/nope/label",
        Some(&json!({"label": "ok"})),
    );
    assert_eq!(status, 404, "{j}");

    // Train through HTTP; the switch must not drop a frame.
    let dropped_before = dropped(&http);
    let started = http.call("POST", "/api/heads/porch/train", None);
    assert_eq!(started.0, 202, "{}", started.1);
    let job = wait_for(Duration::from_secs(120), "the training job", || {
        let job = http.ok("GET", "/api/heads/porch/train", None);
        (job["state"] != "running").then_some(job)
    });
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["report"]["version"], 1);
    assert_eq!(job["report"]["live"], true);

    // The new version is live: payloads carry it, and "package" starts an event on pkg only.
    let events = sub.collect_until(Duration::from_secs(60), |got| {
        got.iter().any(|m| {
            m.topic == "vigil/events"
                && m.json()["type"] == "start"
                && m.json()["label"] == "package"
        })
    });
    let start = events
        .iter()
        .find(|m| m.topic == "vigil/events" && m.json()["label"] == "package")
        .unwrap_or_else(|| panic!("no package event: {}", vigil.log_text()))
        .json();
    assert_eq!(start["camera"], "pkg", "{start}");
    assert_eq!(start["head"], json!({"name": "porch", "version": 1}));
    assert!(
        !events.iter().any(|m| m.topic == "vigil/events"
            && m.json()["camera"] == "empty"
            && m.json()["label"] == "package"),
        "the empty porch raised a package event"
    );
    vigil.wait_log(Duration::from_secs(10), "head versions put in service");
    assert_eq!(
        dropped(&http),
        dropped_before,
        "frames were dropped during the switch"
    );

    // Flags: the next frames of the flagged camera land in the inbox as "flagged".
    http.ok("POST", "/api/cameras/empty/wrong", None);
    sub.publish("vigil/pkg/set/wrong", "event 42", false);
    wait_for(
        Duration::from_secs(30),
        "flagged captures of both cameras",
        || {
            let inbox = http.ok("GET", "/api/heads/porch/inbox", None);
            let flagged =
                |c: &str| {
                    inbox["samples"].as_array().unwrap().iter().any(|s| {
                        s["camera"] == c && s["reason"] == "flagged" && s["head_version"] == 1
                    })
                };
            (flagged("pkg") && flagged("empty")).then_some(())
        },
    );

    // Wrong on an event: the picture that started it goes to the inbox, not what the camera
    // sees when the flag comes.
    let event = start["id"].as_str().unwrap();
    let flag_sent = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let flagged = http.ok("POST", &format!("/api/events/{event}/wrong"), None);
    assert_eq!(
        (&flagged["event"], &flagged["head"], &flagged["camera"]),
        (&start["id"], &json!("porch"), &json!("pkg")),
        "{flagged}"
    );
    let sample_id = flagged["sample"].as_str().unwrap().to_string();
    let of_event = |inbox: &Value| {
        inbox["samples"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == sample_id.as_str())
            .cloned()
    };
    let sample = of_event(&http.ok("GET", "/api/heads/porch/inbox", None))
        .unwrap_or_else(|| panic!("sample {sample_id} not in the inbox"));
    assert_eq!(
        (&sample["reason"], &sample["event"]),
        (&json!("flagged"), &start["id"]),
        "{sample}"
    );
    // RFC 3339 times in UTC with milliseconds, as vigil writes them: ordered as strings.
    let taken = sample["time"].as_str().unwrap();
    assert!(
        start["start"].as_str().unwrap() <= taken && taken < flag_sent.as_str(),
        "the sample ({taken}) is not the event's picture (started {}, flagged {flag_sent})",
        start["start"]
    );
    // The same through MQTT, with the event id as payload: discarded, it comes back flagged.
    http.ok(
        "DELETE",
        &format!("/api/heads/porch/inbox/{sample_id}"),
        None,
    );
    sub.publish("vigil/pkg/set/wrong", event, false);
    let back = wait_for(Duration::from_secs(30), "the MQTT flag's sample", || {
        of_event(&http.ok("GET", "/api/heads/porch/inbox", None))
    });
    assert_eq!(
        (&back["reason"], &back["event"]),
        (&json!("flagged"), &start["id"])
    );
    // Unknown events are a 404 naming them.
    let (status, j) = http.call("POST", "/api/events/pkg-nope-1-1/wrong", None);
    assert_eq!(status, 404, "{j}");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("pkg-nope-1-1"),
        "{j}"
    );

    let listed = http.ok("GET", "/api/heads", None);
    assert_eq!(listed["heads"][0]["current"], 1, "{listed}");
    assert!(listed["heads"][0]["labels"]["package"].as_u64().unwrap() >= 6);

    // Rolling forward by hand: activating a version that does not exist is a 404.
    let (status, _) = http.call("POST", "/api/heads/porch/versions/9/activate", None);
    assert_eq!(status, 404);
    let status = vigil.interrupt(Duration::from_secs(30));
    assert!(status.success(), "{}", vigil.log_text());
}
