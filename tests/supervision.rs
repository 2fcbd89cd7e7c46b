//! No thread dies silently: a camera whose thread panics is restarted and says why; a core thread
//! that panics stops vigil with an error and a non-zero exit. Panics are injected into the real
//! binary with the `FAILPOINTS` variable.

mod common;

use std::time::Duration;

use common::*;

fn vigil_with_fault(dir: &std::path::Path, fault: &str, body: &str) -> Running {
    let config = write_config(dir, body);
    let mut c = vigil();
    c.env("FAILPOINTS", fault)
        .args(["run", "--config"])
        .arg(&config);
    Running::spawn(c)
}

fn config(port: u16, extra: &str) -> String {
    format!(
        "{MODEL}[mqtt]\nport = {port}\n[pipeline]\nlog_interval = \"1s\"\n{extra}\n\
         [cameras.cam]\nsource = \"test\"\nanalyze_fps = 5\nretry_min = \"200ms\"\nretry_max = \"1s\"\n"
    )
}

#[test]
fn a_camera_whose_thread_panics_is_restarted_and_says_why() {
    let broker = Mosquitto::start();
    let sub = Subscriber::start(broker.port, "vigil/cam/#");
    let dir = tempfile::tempdir().unwrap();
    let mut vigil = vigil_with_fault(
        dir.path(),
        "camera-run=1*panic(injected fault)",
        &config(broker.port, ""),
    );
    let mut panicked = false;
    let got = sub.collect_until(Duration::from_secs(30), |got| {
        panicked = panicked
            || got.iter().any(|m| {
                m.topic == "vigil/cam/status"
                    && m.json()["state"] == "reconnecting"
                    && m.json()["last_error"] == "panicked: injected fault"
            });
        panicked
            && got
                .iter()
                .any(|m| m.topic == "vigil/cam/availability" && m.text() == "online")
    });
    assert!(
        panicked,
        "the panic was not reported: {got:?}\n{}",
        vigil.log_text()
    );
    assert!(
        got.iter()
            .any(|m| m.topic == "vigil/cam/availability" && m.text() == "online"),
        "the camera did not come back: {}",
        vigil.log_text()
    );
    assert!(
        vigil.child.try_wait().unwrap().is_none(),
        "vigil still runs"
    );
    assert!(vigil.interrupt(Duration::from_secs(20)).success());
    assert!(
        vigil
            .log_text()
            .contains("the camera's thread panicked; restarting it"),
        "{}",
        vigil.log_text()
    );
}

#[test]
fn a_core_thread_that_panics_stops_vigil_with_an_error() {
    let broker = Mosquitto::start();
    // The reporter and the MQTT connection's event loop (threads), and the HTTP server's accept
    // loop (an async task) at its first connection.
    for (fault, thread) in [
        ("reporter", "reporter"),
        ("http-accept", "http"),
        ("mqtt-event", "mqtt"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut vigil = vigil_with_fault(
            dir.path(),
            &format!("{fault}=panic(injected fault)"),
            &config(broker.port, ""),
        );
        if fault == "http-accept" {
            let addr = vigil.http_addr(Duration::from_secs(30));
            let _ = std::net::TcpStream::connect(addr);
        }
        let status = vigil.wait(Duration::from_secs(30));
        assert!(!status.success(), "{}", vigil.log_text());
        assert!(
            vigil.log_text().contains(&format!(
                "thread {thread} panicked (injected fault); vigil stops"
            )),
            "{}",
            vigil.log_text()
        );
    }
}
