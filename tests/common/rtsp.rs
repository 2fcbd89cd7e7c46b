//! A real RTSP server (gst-rtsp-server) for the tests, run as a separate process so that a test
//! can kill it (SIGKILL) and start it again on the same port. The process is this very test
//! binary, re-run with `VIGIL_TEST_RTSP_PORT` set: see [`serve_if_asked`].

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gstreamer as gst;
use gstreamer_rtsp_server as rtsp;
use gstreamer_rtsp_server::prelude::*;

use super::{fixture, wait_for};

pub const USER: &str = "viewer";
/// Every character that must be percent-encoded in a URL's password, and some more.
pub const PASSWORD: &str = "s3cret/pa?55#w@rd%";
/// [`PASSWORD`] as it is written in a URL.
pub const PASSWORD_ENCODED: &str = "s3cret%2Fpa%3F55%23w%40rd%25";

/// The streams the server offers.
fn mounts(clip: &str) -> Vec<(&'static str, String, bool)> {
    let h264 = "x264enc tune=zerolatency speed-preset=ultrafast key-int-max=25 ! rtph264pay name=pay0 pt=96 config-interval=-1";
    vec![
        // (path, launch line, shared between clients)
        (
            "/h264",
            format!("( videotestsrc is-live=true pattern=ball ! video/x-raw,width=640,height=480,framerate=25/1 ! {h264} )"),
            true,
        ),
        (
            "/small",
            format!("( videotestsrc is-live=true pattern=smpte ! video/x-raw,width=320,height=240,framerate=10/1 ! {h264} )"),
            true,
        ),
        (
            "/h265",
            "( videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=15/1 ! x265enc tune=zerolatency speed-preset=ultrafast key-int-max=15 ! rtph265pay name=pay0 pt=96 config-interval=-1 )".into(),
            true,
        ),
        (
            "/clip",
            format!("( filesrc location=\"{clip}\" ! qtdemux ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=-1 )"),
            false,
        ),
        // 20 frames, then nothing (see FREEZE_AFTER): connected, but frozen.
        (
            "/frozen",
            format!("( videotestsrc is-live=true ! video/x-raw,width=320,height=240,framerate=10/1 ! {h264} )"),
            false,
        ),
        // Like /small, but only over UDP (as VLC's server): see `udp_only`.
        (
            "/udp-only",
            format!("( videotestsrc is-live=true pattern=smpte ! video/x-raw,width=320,height=240,framerate=10/1 ! {h264} )"),
            false,
        ),
        // Random bytes of the H.264 stream overwritten.
        (
            "/garbage",
            "( videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=25/1 ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=10 ! h264parse ! breakmydata probability=0.0005 seed=7 skip=100 ! rtph264pay name=pay0 pt=96 config-interval=-1 )".into(),
            true,
        ),
    ]
}

/// Packets the `/frozen` stream sends before it stops sending anything (the connection stays).
const FREEZE_AFTER: u64 = 40;

/// Runs the server forever when this process was started as one (see [`RtspServer::start`]).
pub fn serve_if_asked() {
    let Ok(port) = std::env::var("VIGIL_TEST_RTSP_PORT") else {
        return;
    };
    let clip = std::env::var("VIGIL_TEST_RTSP_CLIP").unwrap();
    let with_auth = std::env::var("VIGIL_TEST_RTSP_AUTH").is_ok();
    gst::init().unwrap();
    let server = rtsp::RTSPServer::new();
    server.set_address("127.0.0.1");
    server.set_service(&port);
    if with_auth {
        // Every stream needs USER / PASSWORD (basic authentication).
        let auth = rtsp::RTSPAuth::new();
        let token = rtsp::RTSPToken::builder()
            .field(rtsp::RTSP_TOKEN_MEDIA_FACTORY_ROLE, "user")
            .build();
        auth.add_basic(rtsp::RTSPAuth::make_basic(USER, PASSWORD).as_str(), &token);
        server.set_auth(Some(&auth));
    }
    let mount_points = server.mount_points().unwrap();
    for (path, launch, shared) in mounts(&clip) {
        let factory = rtsp::RTSPMediaFactory::new();
        factory.set_launch(&launch);
        factory.set_shared(shared);
        if with_auth {
            factory.add_role_from_structure(
                &gst::Structure::builder("user")
                    .field(rtsp::RTSP_PERM_MEDIA_FACTORY_ACCESS, true)
                    .field(rtsp::RTSP_PERM_MEDIA_FACTORY_CONSTRUCT, true)
                    .build(),
            );
        }
        if path == "/udp-only" {
            factory.set_protocols(rtsp::gst_rtsp::RTSPLowerTrans::UDP);
        }
        if path == "/frozen" {
            factory.connect_media_configure(|_, media| {
                let bin = media.element().downcast::<gst::Bin>().unwrap();
                let pay = bin.by_name("pay0").unwrap();
                let sent = std::sync::atomic::AtomicU64::new(0);
                pay.static_pad("src").unwrap().add_probe(
                    gst::PadProbeType::BUFFER | gst::PadProbeType::BUFFER_LIST,
                    move |_, _| {
                        if sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < FREEZE_AFTER {
                            gst::PadProbeReturn::Ok
                        } else {
                            gst::PadProbeReturn::Handled
                        }
                    },
                );
            });
        }
        mount_points.add_factory(path, factory);
    }
    let _source = server.attach(None).expect("the RTSP server binds its port");
    println!("RTSP server listening on 127.0.0.1:{port}");
    glib::MainLoop::new(None, false).run();
}

use gstreamer::glib;

/// A test RTSP server process on `port`, killed (SIGKILL) on drop.
pub struct RtspServer {
    pub port: u16,
    child: Child,
}

impl RtspServer {
    /// Starts the server and waits until it accepts connections.
    pub fn start(port: u16) -> RtspServer {
        Self::spawn(port, false)
    }

    /// A server whose every stream needs [`USER`] and [`PASSWORD`].
    pub fn start_with_auth(port: u16) -> RtspServer {
        Self::spawn(port, true)
    }

    fn spawn(port: u16, auth: bool) -> RtspServer {
        let exe: PathBuf = std::env::current_exe().unwrap();
        let mut cmd = Command::new(exe);
        if auth {
            cmd.env("VIGIL_TEST_RTSP_AUTH", "1");
        }
        let child = cmd
            .args(["--ignored", "--exact", "rtsp_server_process", "--nocapture"])
            .env("VIGIL_TEST_RTSP_PORT", port.to_string())
            .env("VIGIL_TEST_RTSP_CLIP", fixture("photos.mp4"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(Duration::from_secs(20), "the RTSP server to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        RtspServer { port, child }
    }

    pub fn url(&self, path: &str) -> String {
        format!("rtsp://127.0.0.1:{}{path}", self.port)
    }

    /// Kills the server abruptly, as a crash or a power cut would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
