//! Key frames of live cameras decoded by a few decoders that all cameras share
//! (`pipeline.key_frame_decoders`).
//!
//! With `decode = "keyframes"` a camera decodes a frame a second at most, and with motion gating
//! far fewer. A decoder per camera still holds its context, its reference pictures and a pool
//! of output frames for the camera's whole life: most of a live camera's memory. A key frame
//! needs no other picture, so any decoder of its codec can decode it. The camera's own decoder
//! (inside its pipeline, where the template put it) is still built and receives the stream's
//! caps, but its buffers are taken at its sink pad and decoded here instead, on the camera's
//! streaming thread; the frame goes to the camera's gate and queue as its own would have.
//!
//! Each shared decoder is a small pipeline: a pad of ours, a decoder made by the camera decoder's
//! own factory, `videoconvert` and an appsink. Its segment is a key-units trick mode, so the
//! decoder hands each picture out as soon as it is decoded: one buffer in, at most one out,
//! within the push. A decoder switches between cameras by a caps event when their caps differ
//! (the codec reopens; cameras with the same caps do not).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::{Mutex, MutexGuard};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app::AppSink;

/// A decoded key frame: the picture and its caps.
pub struct Decoded {
    pub buffer: gst::Buffer,
    pub caps: gst::Caps,
}

/// The shared decoders. Each slot holds one decoder per decoder factory it met (H.264 and
/// H.265 cameras each keep theirs), built on first use.
pub struct KeyFrameDecoders {
    slots: Vec<Mutex<Vec<Decoder>>>,
    next: AtomicUsize,
}

static SHARED: OnceLock<KeyFrameDecoders> = OnceLock::new();

/// Sets how many shared decoders there are (0: none, each camera decodes its own key frames).
/// The first call counts; `vigil run` makes it at its start.
pub fn configure(count: usize) {
    if count > 0 {
        let _ = SHARED.set(KeyFrameDecoders::new(count));
    }
}

/// The shared decoders, when `configure` set up any.
pub fn shared() -> Option<&'static KeyFrameDecoders> {
    SHARED.get()
}

impl KeyFrameDecoders {
    pub fn new(count: usize) -> KeyFrameDecoders {
        KeyFrameDecoders {
            slots: (0..count).map(|_| Mutex::new(Vec::new())).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Decodes `buffer`, a key frame in `caps`, with a decoder made by `factory`. `None`: the
    /// decoder gave no picture for it (damaged data). An error names the cause; the decoder that
    /// failed is dropped and built again on its next use.
    pub fn decode(
        &self,
        factory: &gst::ElementFactory,
        caps: &gst::Caps,
        buffer: gst::Buffer,
    ) -> Result<Option<Decoded>, String> {
        let mut slot = self.pick(factory, caps);
        let decoder = match slot.iter().position(|d| d.factory == *factory) {
            Some(i) => slot.swap_remove(i),
            None => Decoder::new(factory, caps)?,
        };
        let (decoder, out) = decoder.decode(caps, buffer)?;
        slot.push(decoder);
        // Handed to the camera that has waited longest: with the std mutex a camera could lose
        // the race to others round after round in a burst (64 cameras seeing something at once)
        // until its next key frame had come.
        MutexGuard::unlock_fair(slot);
        Ok(out)
    }

    /// A free slot: one whose decoder for `factory` is already set for `caps` (no reopening),
    /// or else one that has a decoder for `factory`; when all are busy, the next in turn,
    /// waited for behind the cameras already waiting there.
    fn pick(
        &self,
        factory: &gst::ElementFactory,
        caps: &gst::Caps,
    ) -> MutexGuard<'_, Vec<Decoder>> {
        let rank = |decoders: &Vec<Decoder>| {
            let mine = decoders.iter().find(|d| d.factory == *factory);
            match mine {
                Some(d) if d.caps == *caps => 0,
                Some(_) => 1,
                None => 2,
            }
        };
        // The best free slot so far is held, the others let go at once (no list per frame).
        let mut best: Option<(u8, MutexGuard<'_, Vec<Decoder>>)> = None;
        for slot in &self.slots {
            let Some(guard) = slot.try_lock() else {
                continue;
            };
            let r = rank(&guard);
            if best.as_ref().is_none_or(|(b, _)| r < *b) {
                best = Some((r, guard));
                if r == 0 {
                    break;
                }
            }
        }
        if let Some((_, guard)) = best {
            return guard;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        self.slots[turn].lock()
    }
}

/// One shared decoder: `our pad ! <decoder> ! videoconvert ! appsink`.
struct Decoder {
    factory: gst::ElementFactory,
    /// The caps last sent.
    caps: gst::Caps,
    pipeline: gst::Pipeline,
    src: gst::Pad,
    sink: AppSink,
}

impl Decoder {
    fn new(factory: &gst::ElementFactory, caps: &gst::Caps) -> Result<Decoder, String> {
        let name = factory.name();
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            format!("shared key-frame decoder ({name}): {what}: {e}")
        };
        let decoder = factory
            .create()
            .build()
            .map_err(|e| failed("cannot be made", &e))?;
        if decoder.find_property("max-threads").is_some() {
            decoder.set_property_from_str("max-threads", "1");
        }
        if decoder.find_property("direct-rendering").is_some() {
            decoder.set_property("direct-rendering", false);
        }
        let convert = gst::ElementFactory::make("videoconvert")
            .build()
            .map_err(|e| failed("videoconvert", &e))?;
        let sink = AppSink::builder()
            .caps(
                &gst::Caps::builder("video/x-raw")
                    .field("format", gst::List::new(["I420", "BGR"]))
                    .build(),
            )
            .sync(false)
            .enable_last_sample(false)
            .build();
        // No preroll: a buffer must go through within the push.
        sink.set_property("async", false);
        let pipeline = gst::Pipeline::with_name("vigil-key-frames");
        pipeline
            .add_many([&decoder, &convert, sink.upcast_ref()])
            .and_then(|_| gst::Element::link_many([&decoder, &convert, sink.upcast_ref()]))
            .map_err(|e| failed("cannot be linked", &e))?;
        let src = gst::Pad::builder(gst::PadDirection::Src)
            .name("key-frames")
            .build();
        let target = decoder
            .static_pad("sink")
            .ok_or("decoder without a sink pad")?;
        src.link(&target)
            .map_err(|e| failed("cannot be linked", &e))?;
        pipeline
            .set_state(gst::State::Playing)
            .map_err(|e| failed("cannot start", &e))?;
        src.set_active(true)
            .map_err(|e| failed("cannot start", &e))?;
        let mut segment = gst::FormattedSegment::<gst::ClockTime>::new();
        segment.set_flags(gst::SegmentFlags::TRICKMODE_KEY_UNITS);
        let started = src.push_event(gst::event::StreamStart::new("vigil-key-frames"))
            && src.push_event(gst::event::Caps::new(caps))
            && src.push_event(gst::event::Segment::new(segment.upcast_ref()));
        let decoder = Decoder {
            factory: factory.clone(),
            caps: caps.clone(),
            pipeline,
            src,
            sink,
        };
        if !started {
            return Err(decoder.failure("does not take the stream"));
        }
        tracing::info!(decoder = %name, "shared key-frame decoder started");
        Ok(decoder)
    }

    /// Pushes one key frame and takes the picture it gave, if any. The decoder is given back
    /// unless it failed.
    fn decode(
        mut self,
        caps: &gst::Caps,
        buffer: gst::Buffer,
    ) -> Result<(Decoder, Option<Decoded>), String> {
        if *caps != self.caps {
            if !self.src.push_event(gst::event::Caps::new(caps)) {
                return Err(self.failure("refused the camera's caps"));
            }
            self.caps = caps.clone();
        }
        if let Err(flow) = self.src.push(buffer) {
            return Err(self.failure(&format!("{flow:?}")));
        }
        // Normally one picture; anything more (a decoder that held one back) is not this
        // camera's frame for sure, and is dropped.
        let mut out = None;
        while let Some(sample) = self.sink.try_pull_sample(gst::ClockTime::ZERO) {
            out = Some(sample);
        }
        self.forget_messages();
        let out = out.and_then(|s| {
            Some(Decoded {
                buffer: s.buffer_owned()?,
                caps: s.caps_owned()?,
            })
        });
        Ok((self, out))
    }

    /// The decoder's own reason, from its bus, for a failure seen as `what`.
    fn failure(&self, what: &str) -> String {
        let bus = self.pipeline.bus().expect("a pipeline has a bus");
        let reason = bus
            .timed_pop_filtered(gst::ClockTime::ZERO, &[gst::MessageType::Error])
            .and_then(|m| match m.view() {
                gst::MessageView::Error(e) => Some(e.error().to_string()),
                _ => None,
            });
        let name = self.factory.name();
        match reason {
            Some(r) => format!("shared key-frame decoder ({name}): {what}: {r}"),
            None => format!("shared key-frame decoder ({name}): {what}"),
        }
    }

    /// Nobody watches this pipeline's bus: its messages would pile up.
    fn forget_messages(&self) {
        if let Some(bus) = self.pipeline.bus() {
            while bus.pop().is_some() {}
        }
    }
}

impl Drop for Decoder {
    fn drop(&mut self) {
        let _ = self.src.set_active(false);
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}
