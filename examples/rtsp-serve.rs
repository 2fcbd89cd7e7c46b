//! An RTSP server for benchmarks: serves an H.264 MP4 file, as it is (demuxed and packetised,
//! never re-encoded), at `rtsp://127.0.0.1:<port>/cam`, in real time, to every client on its own
//! (each client starts at the file's beginning).
//!
//! ```text
//! cargo run --release --example rtsp-serve -- <port> <clip.mp4>
//! ```

use gstreamer as gst;
use gstreamer::glib;
use gstreamer_rtsp_server as rtsp;
use gstreamer_rtsp_server::prelude::*;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(port), Some(clip)) = (args.next(), args.next()) else {
        eprintln!("usage: rtsp-serve <port> <clip.mp4>");
        std::process::exit(2);
    };
    if !std::path::Path::new(&clip).is_file() {
        eprintln!("rtsp-serve: {clip} is not a file");
        std::process::exit(2);
    }
    gst::init().expect("GStreamer initialises");
    let server = rtsp::RTSPServer::new();
    server.set_address("127.0.0.1");
    server.set_service(&port);
    let factory = rtsp::RTSPMediaFactory::new();
    factory.set_launch(&format!(
        "( filesrc location=\"{clip}\" ! qtdemux ! h264parse config-interval=-1 ! rtph264pay name=pay0 pt=96 )"
    ));
    factory.set_shared(false);
    server
        .mount_points()
        .expect("the server has mount points")
        .add_factory("/cam", factory);
    let _source = server.attach(None).expect("the RTSP server binds its port");
    println!("RTSP server listening on 127.0.0.1:{port}");
    glib::MainLoop::new(None, false).run();
}
