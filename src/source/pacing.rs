//! A file played in real time (`realtime = true`) is paced on the pipeline's clock as its coded
//! frames reach the decoder, as `clocksync` would: before anything may skip them.
//!
//! The appsink's own sync paces only the frames that reach it. With motion gating a still scene
//! sends it almost none (skipped at the converter, or before the decoder with `motion.coded`), so
//! the file ran at several times real time and decoded every frame for nothing. (Its loops
//! stalled too, for want of a frame to preroll the sink after the seek: `gate.rs` passes one.)

use std::sync::{Arc, Mutex};

use gstreamer as gst;
use gstreamer::prelude::*;

use crate::sync::lock;

/// One pipeline run's pacing: the wait in progress, so that a flush or the run's end cuts it
/// short (a file with a gap in its timestamps would otherwise hold its thread that long).
#[derive(Default)]
pub struct Pacing {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    waiting: Option<gst::ClockId>,
    /// The run is ending: no more waits.
    stopped: bool,
}

impl Pacing {
    /// Paces the buffers of the decoder's sink `pad`.
    pub fn attach(self: &Arc<Self>, pad: &gst::Pad) {
        let pacing = self.clone();
        let probed = gst::PadProbeType::BUFFER
            | gst::PadProbeType::BUFFER_LIST
            | gst::PadProbeType::EVENT_FLUSH;
        pad.add_probe(probed, move |pad, info| {
            match &info.data {
                Some(gst::PadProbeData::Buffer(buffer)) => pacing.wait(pad, buffer),
                Some(gst::PadProbeData::BufferList(list)) => {
                    if let Some(buffer) = list.get(0) {
                        pacing.wait(pad, buffer);
                    }
                }
                Some(gst::PadProbeData::Event(event))
                    if event.type_() == gst::EventType::FlushStart =>
                {
                    pacing.cut_short();
                }
                _ => {}
            }
            gst::PadProbeReturn::Ok
        });
    }

    /// Waits until `buffer`'s time (decoding time, else presentation time) comes on the clock of
    /// `pad`'s element. Nothing to wait for before the pipeline plays (no clock yet), for a
    /// buffer without a time, or outside a time segment.
    fn wait(&self, pad: &gst::Pad, buffer: &gst::BufferRef) {
        let Some(at) = buffer.dts_or_pts() else {
            return;
        };
        let Some(segment) = pad.sticky_event::<gst::event::Segment>(0) else {
            return;
        };
        let Some(running) = segment
            .segment()
            .downcast_ref::<gst::ClockTime>()
            .and_then(|s| s.to_running_time(at))
        else {
            return;
        };
        let Some(element) = pad.parent_element() else {
            return;
        };
        let (Some(clock), Some(base)) = (element.clock(), element.base_time()) else {
            return;
        };
        let id = clock.new_single_shot_id(base + running);
        {
            let mut state = lock(&self.state);
            if state.stopped {
                return;
            }
            state.waiting = Some((*id).clone());
        }
        let _ = id.wait();
        lock(&self.state).waiting = None;
    }

    /// The run ends: the wait in progress ends, and no other starts.
    pub fn stop(&self) {
        let mut state = lock(&self.state);
        state.stopped = true;
        if let Some(id) = state.waiting.take() {
            id.unschedule();
        }
    }

    /// Ends the wait in progress, if any (a flush).
    fn cut_short(&self) {
        if let Some(id) = lock(&self.state).waiting.take() {
            id.unschedule();
        }
    }
}
