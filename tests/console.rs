//! The operator console in a real browser: Debian's chromium, driven through chromedriver
//! (WebDriver) with fantoccini, against a running vigil with real cameras, a real broker and the
//! real model. Each screen shows the real state: the camera tiles, an event within a second of
//! its MQTT message, a zone drawn by mouse and saved (in the file, comments kept, and in the next
//! frames' results), an inbox labelled and a head trained, the figures, the login with a token.
//! Screenshots of each screen go to `target/console/` (with `VIGIL_SCREENSHOTS=docs/console`,
//! there too: the README's pictures).

mod common;
#[path = "common/teach_data.rs"]
mod teach_data;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::actions::{InputSource, MOUSE_BUTTON_LEFT, MouseActions, PointerAction};
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// One browser at a time: the event timing must not wait behind another test's chromium.
static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver) is installed: run `make setup`");
        wait_for(Duration::from_secs(20), "chromedriver to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Driver { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A headless chromium of `width` x `height`.
async fn browser(driver: &Driver, width: u32, height: u32) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     format!("--window-size={width},{height}")],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("chromium starts under chromedriver")
}

/// Polls `f` until it gives a value, at most `timeout`.
async fn until<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn css(c: &Client, selector: &str) -> Vec<Element> {
    c.find_all(Locator::Css(selector)).await.unwrap_or_default()
}

async fn text_of(c: &Client, selector: &str) -> Option<String> {
    let e = c.find(Locator::Css(selector)).await.ok()?;
    e.text().await.ok()
}

async fn click(c: &Client, selector: &str) {
    let e = c.find(Locator::Css(selector)).await;
    e.unwrap_or_else(|e| panic!("{selector}: {e}"))
        .click()
        .await
        .unwrap();
}

async fn type_into(c: &Client, selector: &str, text: &str) {
    let e = c.find(Locator::Css(selector)).await;
    e.unwrap_or_else(|e| panic!("{selector}: {e}"))
        .send_keys(text)
        .await
        .unwrap();
}

/// Waits for the browser to be on `path`.
async fn on_path(c: &Client, path: &str) {
    until(Duration::from_secs(10), path, || async {
        let u = c.current_url().await.ok()?;
        (u.path() == path).then_some(())
    })
    .await;
}

/// Evaluates `script` (a function body) in the page.
async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![]).await.expect("the script runs")
}

/// Saves a screenshot of the page's top as `<name>.png` (see the module's comment).
async fn screenshot(c: &Client, name: &str) {
    js(c, "window.scrollTo(0, 0); return 1;").await;
    save_screenshot(c, name).await;
}

/// The same, with the element `selector` scrolled into view.
async fn screenshot_at(c: &Client, name: &str, selector: &str) {
    let script = format!("document.querySelector('{selector}').scrollIntoView(); return 1;");
    js(c, &script).await;
    save_screenshot(c, name).await;
}

async fn save_screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("a screenshot");
    let mut dirs = vec![repo().join("target/console")];
    if let Ok(d) = std::env::var("VIGIL_SCREENSHOTS") {
        dirs.push(repo().join(d));
    }
    for dir in dirs {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), &png).unwrap();
    }
}

/// The page fits its width: nothing scrolls sideways.
async fn fits_width(c: &Client) -> bool {
    js(
        c,
        "return document.documentElement.scrollWidth <= window.innerWidth + 1;",
    )
    .await
    .as_bool()
    .unwrap()
}

/// A running vigil with two live test cameras and a looping clip that starts a "baboon" event
/// every few seconds, its broker, and its HTTP server's base URL.
struct Street {
    _dir: tempfile::TempDir,
    broker: Mosquitto,
    vigil: Running,
    base: String,
}

fn street(extra: &str) -> Street {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start();
    let clip = make_clip(dir.path(), &[("baboon.jpg", 40), ("orange.jpg", 40)]);
    let vigil = run_vigil(
        dir.path(),
        &format!(
            "{MODEL}[mqtt]\nport = {}\n[events]\nwatch = [\"baboon\"]\nmin_duration = \"0s\"\n\
             cooldown = \"0s\"\n{extra}\
             [cameras.clip]\nsource = \"file\"\npath = \"{}\"\nloop = true\nrealtime = true\n\
             analyze_fps = 10\n\
             [cameras.door]\nsource = \"test\"\npattern = \"ball\"\nfps = 10\nanalyze_fps = 5\n\
             [cameras.yard]\nsource = \"test\"\npattern = \"smpte\"\nfps = 10\nanalyze_fps = 2\n",
            broker.port,
            clip.display()
        ),
    );
    let base = base(&vigil);
    Street {
        _dir: dir,
        broker,
        vigil,
        base,
    }
}

fn base(vigil: &Running) -> String {
    let addr: SocketAddr = vigil.http_addr(Duration::from_secs(60));
    format!("http://{addr}")
}

/// chromedriver and a 1280x800 headless chromium under it.
async fn chromium() -> (Driver, Client) {
    let driver = Driver::start();
    let c = browser(&driver, 1280, 800).await;
    (driver, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_and_events_show_the_cameras_and_an_event_within_a_second_of_its_mqtt_message() {
    let _one = BROWSER.lock().await;
    let street = street("");
    let sub = Subscriber::start(street.broker.port, "vigil/events");
    let base = &street.base;
    let (_driver, c) = chromium().await;

    // Live: a tile per camera, each with its analysed frame, label and state.
    c.goto(&format!("{base}/")).await.unwrap();
    until(
        Duration::from_secs(30),
        "three online tiles with a frame and a label",
        || async {
            let tiles = css(&c, "article.tile[data-state=online]").await;
            let framed = js(
                &c,
                "return [...document.querySelectorAll('article.tile')].filter(t => { \
               const i = t.querySelector('img.frame'); \
               return i && i.complete && i.naturalWidth > 0 && \
                      t.querySelector('.label').textContent.trim() !== ''; }).length;",
            )
            .await;
            (tiles.len() == 3 && framed == json!(3)).then_some(())
        },
    )
    .await;
    let names: Vec<String> = {
        let mut v = Vec::new();
        for t in css(&c, "article.tile").await {
            v.push(t.attr("data-camera").await.unwrap().unwrap());
        }
        v
    };
    assert_eq!(names, ["clip", "door", "yard"]);
    // Each tile's rates, e.g. "5.0 analysed/s" for the door (5 a second).
    until(
        Duration::from_secs(10),
        "the door's analysed rate",
        || async {
            let t = text_of(&c, "article.tile[data-camera=door] .figures").await?;
            let rate: f64 = t
                .split(" analysed/s")
                .next()?
                .rsplit(' ')
                .next()?
                .parse()
                .ok()?;
            (3.0..7.0).contains(&rate).then_some(())
        },
    )
    .await;
    // Refreshed as frames are analysed: the door's frame changes.
    let src = |c: &Client| {
        let c = c.clone();
        async move {
            js(
                &c,
                "return document.querySelector('article.tile[data-camera=door] img.frame').src;",
            )
            .await
        }
    };
    let first = src(&c).await;
    until(
        Duration::from_secs(10),
        "the door's tile to show a newer frame",
        || async { (src(&c).await != first).then_some(()) },
    )
    .await;
    // Paused by its MQTT command: the badge says so within a second or two.
    sub.publish("vigil/yard/set/enabled", "OFF", false);
    until(
        Duration::from_secs(5),
        "the yard's tile to say paused",
        || async {
            let badge = text_of(&c, "article.tile[data-camera=yard] [data-state]").await?;
            badge.contains("paused").then_some(())
        },
    )
    .await;
    screenshot(&c, "live").await;

    // Events: newest first, and live.
    c.goto(&format!("{base}/events")).await.unwrap();
    c.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("#events"))
        .await
        .unwrap();
    // The page has its feed open before the next event: the next "start" on MQTT must appear.
    until(
        Duration::from_secs(10),
        "the live feed to be open",
        || async {
            js(&c, "return document.body.dataset.stream || null;")
                .await
                .as_str()
                .map(|_| ())
        },
    )
    .await;
    let mut delays = Vec::new();
    for _ in 0..3 {
        let (id, seen_at) = wait_for(Duration::from_secs(60), "an event start on MQTT", || {
            sub.messages
                .recv_timeout(Duration::from_millis(200))
                .ok()
                .filter(|m| m.json()["type"] == "start")
                .map(|m| (m.json()["id"].as_str().unwrap().to_string(), Instant::now()))
        });
        let selector = format!("li.event[data-id=\"{id}\"]");
        until(Duration::from_secs(5), "the event in the page", || async {
            (!css(&c, &selector).await.is_empty()).then_some(())
        })
        .await;
        delays.push(seen_at.elapsed());
    }
    eprintln!("event on the page after its MQTT message: {delays:?}");
    assert!(
        delays.iter().all(|d| *d < Duration::from_secs(1)),
        "{delays:?}"
    );
    // Each row: camera, label, score, snapshot, model version; filters narrow the list.
    let row = css(&c, "li.event").await.remove(0);
    assert_eq!(
        row.attr("data-camera").await.unwrap().as_deref(),
        Some("clip")
    );
    assert_eq!(
        row.attr("data-label").await.unwrap().as_deref(),
        Some("baboon")
    );
    let text = row.text().await.unwrap();
    assert!(text.contains("efficientnet-lite0"), "{text}");
    // The model's own classes: no head to teach, so "Wrong" is off and says why.
    let wrong = row.find(Locator::Css("button.wrong")).await.unwrap();
    assert!(!wrong.is_enabled().await.unwrap());
    let why = wrong.attr("title").await.unwrap().unwrap_or_default();
    assert!(why.contains("bind a head"), "{why}");
    until(
        Duration::from_secs(10),
        "a snapshot image loaded",
        || async {
            js(
                &c,
                "const i = document.querySelector('li.event img.snapshot'); \
             return !!(i && i.complete && i.naturalWidth > 0);",
            )
            .await
            .as_bool()
            .filter(|b| *b)
        },
    )
    .await;
    type_into(&c, "#f-label", "orange\n").await;
    until(
        Duration::from_secs(5),
        "the label filter to empty the list",
        || async {
            css(&c, "li.event[data-label=baboon]")
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;
    c.find(Locator::Css("#f-label"))
        .await
        .unwrap()
        .clear()
        .await
        .unwrap();
    js(&c, "document.getElementById('f-label').dispatchEvent(new Event('input', {bubbles: true})); return 1;").await;
    until(Duration::from_secs(5), "the list back", || async {
        (!css(&c, "li.event").await.is_empty()).then_some(())
    })
    .await;
    screenshot(&c, "events").await;

    // A phone's width: the tiles stack, nothing scrolls sideways.
    c.set_window_size(390, 844).await.unwrap();
    c.goto(&format!("{base}/")).await.unwrap();
    until(
        Duration::from_secs(10),
        "the tiles at phone width",
        || async { (css(&c, "article.tile").await.len() == 3).then_some(()) },
    )
    .await;
    assert!(
        fits_width(&c).await,
        "the Live screen scrolls sideways at 390 px"
    );
    screenshot(&c, "live-phone").await;
    c.close().await.unwrap();
}

const COMMENTED: &str = "# The door camera, watched from the hall.\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_drawn_by_mouse_is_saved_in_the_file_and_used_by_the_next_frames() {
    let _one = BROWSER.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, "vigil/door/#");
    let vigil = run_vigil(
        dir.path(),
        &format!(
            "{MODEL}[mqtt]\nport = {}\npublish_frames = true\n\
             {COMMENTED}[cameras.door]\nsource = \"test\"\npattern = \"ball\"\nfps = 10\n\
             analyze_fps = 5   # five a second is plenty\n",
            broker.port
        ),
    );
    let config = dir.path().join("vigil.toml");
    let base = base(&vigil);
    let (_driver, c) = chromium().await;
    c.goto(&format!("{base}/cameras/door")).await.unwrap();
    until(Duration::from_secs(30), "the frame in the editor", || async {
        js(&c, "const i = document.getElementById('frame'); return i.complete && i.naturalWidth > 0;")
            .await
            .as_bool()
            .filter(|b| *b)
    })
    .await;

    // Drag from 20% x 30% to 60% x 80% of the frame.
    let stage = c.find(Locator::Css("#frame")).await.unwrap();
    let size = js(
        &c,
        "const r = document.getElementById('frame').getBoundingClientRect(); return [r.width, r.height];",
    )
    .await;
    let (w, h) = (size[0].as_f64().unwrap(), size[1].as_f64().unwrap());
    // Offsets are from the element's centre.
    let at = |fx: f64, fy: f64| (w * (fx - 0.5), h * (fy - 0.5));
    let ((x0, y0), (x1, y1)) = (at(0.2, 0.3), at(0.6, 0.8));
    let drag = MouseActions::new("mouse".into())
        .then(PointerAction::MoveToElement {
            element: stage.clone(),
            duration: None,
            x: x0,
            y: y0,
        })
        .then(PointerAction::Down {
            button: MOUSE_BUTTON_LEFT,
        })
        .then(PointerAction::MoveToElement {
            element: stage.clone(),
            duration: Some(Duration::from_millis(200)),
            x: x1,
            y: y1,
        })
        .then(PointerAction::Up {
            button: MOUSE_BUTTON_LEFT,
        });
    c.perform_actions(drag).await.unwrap();
    let name = until(Duration::from_secs(5), "the new zone's row", || async {
        css(&c, "#zones li.zone").await.into_iter().next()
    })
    .await
    .find(Locator::Css("input.zone-name"))
    .await
    .unwrap();
    name.clear().await.unwrap();
    name.send_keys("steps").await.unwrap();

    // A threshold out of range is refused beside its field, and the file is untouched.
    let thresholds = c
        .find(Locator::Css("li.zone input.zone-thresholds"))
        .await
        .unwrap();
    thresholds.send_keys("ping-pong ball=2").await.unwrap();
    let before = std::fs::read_to_string(&config).unwrap();
    click(&c, "#save").await;
    let status = until(Duration::from_secs(10), "the refusal", || async {
        text_of(&c, "#save-status")
            .await
            .filter(|t| t.contains("Not saved"))
    })
    .await;
    let beside = text_of(&c, "li.zone .error[data-for=thresholds]")
        .await
        .unwrap_or_default();
    assert!(
        beside.contains("0..1") || beside.contains("between"),
        "{status} / {beside:?}"
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), before);
    screenshot(&c, "camera-refused").await;

    thresholds.clear().await.unwrap();
    thresholds.send_keys("ping-pong ball=0.4").await.unwrap();
    click(&c, "#save").await;
    until(Duration::from_secs(30), "the save", || async {
        text_of(&c, "#save-status")
            .await
            .filter(|t| t.contains("Saved"))
    })
    .await;
    let saved = std::fs::read_to_string(&config).unwrap();
    assert!(saved.contains(COMMENTED), "the comments stay:\n{saved}");
    assert!(saved.contains("# five a second is plenty"), "{saved}");
    let parsed: toml::Table = saved.parse().unwrap();
    let zone = &parsed["cameras"]["door"]["zones"]["steps"];
    let rect: Vec<f64> = zone["rect"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_float().unwrap())
        .collect();
    for (got, want) in rect.iter().zip([0.2, 0.3, 0.6, 0.8]) {
        assert!((got - want).abs() < 0.02, "{rect:?}");
    }
    assert_eq!(zone["thresholds"]["ping-pong ball"].as_float(), Some(0.4));
    // The next frames' results are about the zone.
    let got = sub.collect_until(Duration::from_secs(20), |got| {
        got.iter()
            .any(|m| m.topic == "vigil/door/frames" && m.json_opt()["zone"] == "steps")
    });
    assert!(
        got.iter()
            .any(|m| m.topic == "vigil/door/frames" && m.json_opt()["zone"] == "steps"),
        "no result for the zone; topics: {:?}",
        got.iter().map(|m| &m.topic).collect::<Vec<_>>()
    );
    // The editor shows the saved zone after a reload of the page.
    c.refresh().await.unwrap();
    until(Duration::from_secs(10), "the saved zone listed", || async {
        (!css(&c, "#zones li.zone[data-zone=steps]").await.is_empty()).then_some(())
    })
    .await;
    // A polygon: four clicks, then Enter.
    click(&c, "#add-polygon").await;
    let frame = c.find(Locator::Css("#frame")).await.unwrap();
    let mut points = MouseActions::new("mouse".into());
    for (fx, fy) in [(0.65, 0.1), (0.95, 0.1), (0.95, 0.5), (0.7, 0.4)] {
        let (x, y) = at(fx, fy);
        points = points
            .then(PointerAction::MoveToElement {
                element: frame.clone(),
                duration: None,
                x,
                y,
            })
            .then(PointerAction::Down {
                button: MOUSE_BUTTON_LEFT,
            })
            .then(PointerAction::Up {
                button: MOUSE_BUTTON_LEFT,
            });
    }
    c.perform_actions(points).await.unwrap();
    c.active_element()
        .await
        .unwrap()
        .send_keys("\u{E007}")
        .await
        .unwrap();
    let row = until(Duration::from_secs(5), "the polygon's row", || async {
        let rows = css(&c, "#zones li.zone").await;
        (rows.len() == 2).then(|| rows.into_iter().last()).flatten()
    })
    .await;
    let name = row.find(Locator::Css("input.zone-name")).await.unwrap();
    name.clear().await.unwrap();
    name.send_keys("path").await.unwrap();
    click(&c, "#save").await;
    until(Duration::from_secs(30), "the polygon saved", || async {
        let saved = std::fs::read_to_string(&config).ok()?;
        let parsed: toml::Table = saved.parse().ok()?;
        let p = parsed["cameras"]["door"]["zones"].get("path")?["polygon"]
            .as_array()?
            .len();
        (p == 4).then_some(())
    })
    .await;
    screenshot(&c, "camera").await;
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_teach_screen_labels_the_inbox_and_trains_a_head() {
    let _one = BROWSER.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let props = teach_data::Props::porch(&repo().join("fixtures")).first(2);
    let data = dir.path().join("dataset");
    props.write(&data.join("porch"), 8, 3);
    // A camera bound to head "porch" whose frames land in its inbox.
    let frames = dir.path().join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    let mut rng = fastrand::Rng::with_seed(5);
    for i in 0..20 {
        let img = props.render(1, &mut rng);
        vigil::images::write(&frames.join(format!("{i:05}.jpg")), &img).unwrap();
    }
    let clip = dir.path().join("porch.mp4");
    encode_clip(&frames, 4, &clip);
    let broker = Mosquitto::start();
    let vigil = run_vigil(
        dir.path(),
        &format!(
            "{MODEL}[mqtt]\nport = {}\n[teach]\ndata = \"{}\"\nheads = \"{}\"\n\
             [teach.capture]\nband = [0.0, 1.0]\ninterval = \"300ms\"\nmin_distance = 0.01\n\
             [cameras.porch]\nsource = \"file\"\npath = \"{}\"\nloop = true\nrealtime = true\n\
             head = \"porch\"\n",
            broker.port,
            data.display(),
            dir.path().join("heads").display(),
            clip.display()
        ),
    );
    let base = base(&vigil);
    let (_driver, c) = chromium().await;
    c.goto(&format!("{base}/teach")).await.unwrap();
    let head = "section.head[data-head=porch]";
    until(
        Duration::from_secs(60),
        "captured samples in the inbox",
        || async {
            let n = css(&c, &format!("{head} figure.sample")).await.len();
            if n >= 2 {
                return Some(());
            }
            // The page shows the inbox as it was; look again.
            c.refresh().await.ok()?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            None
        },
    )
    .await;
    let count = |label: &'static str| {
        let c = c.clone();
        async move {
            let t = text_of(&c, &format!("{head} .label-counts li[data-label={label}]"))
                .await
                .unwrap_or_default();
            t.rsplit(':')
                .next()
                .and_then(|n| n.trim().parse::<usize>().ok())
        }
    };
    assert_eq!(count("package").await, Some(8));
    screenshot(&c, "teach-inbox").await;
    // One by click, one by key.
    let sample = css(&c, &format!("{head} figure.sample")).await.remove(0);
    let id = sample.attr("data-id").await.unwrap().unwrap();
    sample
        .find(Locator::Css("button.label-btn[data-label=package]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        Duration::from_secs(10),
        "the labelled sample gone and counted",
        || async {
            let gone = css(&c, &format!("figure.sample[data-id=\"{id}\"]"))
                .await
                .is_empty();
            (gone && count("package").await == Some(9)).then_some(())
        },
    )
    .await;
    let labelled = data.join("porch/package").join(format!("{id}.jpg"));
    assert!(labelled.is_file(), "{} is not there", labelled.display());
    let next = css(&c, &format!("{head} figure.sample")).await.remove(0);
    let keys = ["nothing", "package"];
    let digit = js(
        &c,
        &format!(
            "const b = [...document.querySelectorAll('{head} figure.sample')][0] \
               .querySelectorAll('button.label-btn'); \
             return [...b].findIndex(x => x.dataset.label === '{}') + 1;",
            keys[1]
        ),
    )
    .await
    .as_u64()
    .unwrap();
    assert!(digit >= 1);
    next.send_keys(&digit.to_string()).await.unwrap();
    until(
        Duration::from_secs(10),
        "the second sample labelled by key",
        || async { (count("package").await == Some(10)).then_some(()) },
    )
    .await;

    // Train: progress, then the result with its confusion matrix, and version 1 in service.
    click(&c, &format!("{head} button.train")).await;
    let result = until(Duration::from_secs(90), "the training's result", || async {
        let t = text_of(&c, &format!("{head} .train-result")).await?;
        t.contains('%').then_some(t)
    })
    .await;
    assert!(
        !css(&c, &format!("{head} table.confusion")).await.is_empty(),
        "{result}"
    );
    until(Duration::from_secs(10), "version 1 listed", || async {
        (!css(&c, &format!("{head} table.versions tr[data-version=\"1\"]"))
            .await
            .is_empty())
        .then_some(())
    })
    .await;
    let current = std::fs::read_to_string(dir.path().join("heads/porch/current")).ok();
    assert_eq!(current.as_deref().map(str::trim), Some("1"));
    screenshot_at(&c, "teach", "section.head .train-result").await;
    // A second version from one more example, then a switch from the versions table.
    until(
        Duration::from_secs(30),
        "another sample to label",
        || async {
            if let Some(s) = css(&c, &format!("{head} figure.sample"))
                .await
                .into_iter()
                .next()
            {
                return Some(s);
            }
            click(&c, &format!("{head} button.refresh")).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            None
        },
    )
    .await
    .find(Locator::Css("button.label-btn[data-label=package]"))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    until(
        Duration::from_secs(10),
        "the third label counted",
        || async { (count("package").await == Some(11)).then_some(()) },
    )
    .await;
    click(&c, &format!("{head} button.train")).await;
    until(Duration::from_secs(90), "version 2 listed", || async {
        (!css(&c, &format!("{head} table.versions tr[data-version=\"2\"]"))
            .await
            .is_empty())
        .then_some(())
    })
    .await;
    let heads_dir = dir.path().join("heads/porch");
    let before = std::fs::read_to_string(heads_dir.join("current")).unwrap();
    let other = if before.trim() == "2" { "1" } else { "2" };
    click(
        &c,
        &format!("{head} table.versions tr[data-version=\"{other}\"] button.activate"),
    )
    .await;
    until(Duration::from_secs(10), "the switch", || async {
        let now = std::fs::read_to_string(heads_dir.join("current")).ok()?;
        (now.trim() == other).then_some(())
    })
    .await;
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_screen_charts_the_last_minutes() {
    let _one = BROWSER.lock().await;
    let street = street("");
    let base = &street.base;
    let (_driver, c) = chromium().await;
    c.goto(&format!("{base}/system")).await.unwrap();
    until(
        Duration::from_secs(30),
        "charts with lines for latency and each camera",
        || async {
            let lines = js(
                &c,
                "return ['latency', 'camera:clip', 'camera:door', 'camera:yard'].filter(s => { \
               const g = document.querySelector(`svg.chart[data-series=\"${s}\"] path.line`); \
               return g && (g.getAttribute('d') || '').includes('L'); }).length;",
            )
            .await;
            (lines == json!(4)).then_some(())
        },
    )
    .await;
    let provider = text_of(&c, "#provider").await.unwrap_or_default();
    assert!(provider.contains("cpu"), "{provider:?}");
    let mqtt = text_of(&c, "#mqtt").await.unwrap_or_default();
    assert!(mqtt.to_lowercase().contains("connected"), "{mqtt:?}");
    screenshot(&c, "system").await;
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_console_asks_for_it_once_and_keeps_a_strict_httponly_session() {
    let _one = BROWSER.lock().await;
    let street = street("[http]\nlisten = \"127.0.0.1:0\"\ntoken = \"s3cret-console-token\"\n");
    let base = &street.base;
    let (_driver, c) = chromium().await;
    c.goto(&format!("{base}/events")).await.unwrap();
    let url = c.current_url().await.unwrap();
    assert_eq!(url.path(), "/login", "{url}");
    type_into(&c, "#token", "wrong").await;
    click(&c, "#login").await;
    let error = until(Duration::from_secs(10), "the refusal", || async {
        text_of(&c, "#login-error").await
    })
    .await;
    assert!(error.contains("Wrong token"), "{error}");
    screenshot(&c, "login").await;
    type_into(&c, "#token", "s3cret-console-token").await;
    click(&c, "#login").await;
    // Back where it was going, signed in: the page's own API calls work with the cookie.
    on_path(&c, "/events").await;
    until(
        Duration::from_secs(30),
        "events listed through the cookie",
        || async { (!css(&c, "li.event").await.is_empty()).then_some(()) },
    )
    .await;
    // The cookie: invisible to scripts, strict.
    assert_eq!(js(&c, "return document.cookie;").await, json!(""));
    let cookie = c.get_named_cookie("vigil_session").await.unwrap();
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(format!("{:?}", cookie.same_site()), "Some(Strict)");
    // Without the cookie (another client), the API still wants the bearer token.
    let plain = ureq::get(&format!("{base}/api/cameras")).call();
    assert!(
        matches!(plain, Err(ureq::Error::StatusCode(401))),
        "{plain:?}"
    );
    // The session works for the JSON API too, but a state-changing request from another
    // origin is refused (a page elsewhere cannot ride on the cookie).
    let session = format!("vigil_session={}", cookie.value());
    let reload = |origin: &str| {
        ureq::post(&format!("{base}/api/reload"))
            .header("Cookie", &session)
            .header("Origin", origin)
            .send_empty()
            .map(|r| r.status().as_u16())
    };
    assert!(matches!(
        reload("http://evil.example"),
        Err(ureq::Error::StatusCode(403))
    ));
    assert_eq!(reload(base).unwrap(), 200);
    // Log out: the session is gone.
    click(&c, "form.logout button").await;
    on_path(&c, "/login").await;
    c.goto(&format!("{base}/")).await.unwrap();
    assert_eq!(c.current_url().await.unwrap().path(), "/login");
    assert!(
        !street.vigil.log_text().contains("s3cret-console-token"),
        "the token is in the log"
    );
    c.close().await.unwrap();
}
