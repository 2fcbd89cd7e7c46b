//! An RTSP server for benchmarks: serves H.264 MP4 files, as they are (demuxed and packetised,
//! never re-encoded), in real time, to every client on its own (each client starts at the file's
//! beginning). The first file is at `rtsp://127.0.0.1:<port>/cam`; file k (from 0) is also at
//! `/cam<k>`.
//!
//! ```text
//! cargo run --release --example rtsp-serve -- <port> <clip.mp4> [<clip.mp4>...]
//! ```

use gstreamer as gst;
use gstreamer::glib;
use gstreamer_rtsp_server as rtsp;
use gstreamer_rtsp_server::prelude::*;

fn main() {
    let mut args = std::env::args().skip(1);
    let port = args.next();
    let clips: Vec<String> = args.collect();
    let Some(port) = port.filter(|_| !clips.is_empty()) else {
        eprintln!("usage: rtsp-serve <port> <clip.mp4> [<clip.mp4>...]");
        std::process::exit(2);
    };
    if let Some(missing) = clips.iter().find(|c| !std::path::Path::new(c).is_file()) {
        eprintln!("rtsp-serve: {missing} is not a file");
        std::process::exit(2);
    }
    gst::init().expect("GStreamer initialises");
    let server = rtsp::RTSPServer::new();
    server.set_address("127.0.0.1");
    server.set_service(&port);
    let mounts = server.mount_points().expect("the server has mount points");
    for (k, clip) in clips.iter().enumerate() {
        let factory = rtsp::RTSPMediaFactory::new();
        factory.set_launch(&format!(
            "( filesrc location=\"{clip}\" ! qtdemux ! h264parse config-interval=-1 ! rtph264pay name=pay0 pt=96 )"
        ));
        factory.set_shared(false);
        if k == 0 {
            mounts.add_factory("/cam", factory.clone());
        }
        mounts.add_factory(&format!("/cam{k}"), factory);
    }
    let _source = server.attach(None).expect("the RTSP server binds its port");
    println!("RTSP server listening on 127.0.0.1:{port}");
    glib::MainLoop::new(None, false).run();
}
