//! The MQTT outbox: every message waits here until the broker has it, so nothing is lost while
//! the broker is away.
//!
//! rumqttc forgets unacknowledged publishes when it reconnects with a clean session, so vigil
//! keeps its own books: a message is *queued* until it is handed to the client, *handed* until
//! rumqttc sends it (and gives it a packet id), and *in flight* until the broker acknowledges it
//! (QoS 1 and 2). When the connection drops, everything handed or in flight goes back to the front
//! of the queue, in its original order, and is sent again after the reconnect: delivery is at
//! least once, in order (a message whose acknowledgement was lost arrives twice).
//!
//! The outbox is bounded: its capacity counts every message not yet acknowledged (queued, handed
//! and in flight), and every way in honours it, the retained state put back at the front after a
//! reconnect included. When it is full the overflow policy drops the oldest queued message of the
//! lowest kind (per-frame results first, then state changes, events last), or refuses the new one;
//! every drop is counted per kind.

use std::collections::{HashMap, HashSet, VecDeque};

use rumqttc::QoS;
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OverflowPolicy {
    /// Drop the oldest message of the lowest kind queued: per-frame results first, then state
    /// changes, events last.
    #[default]
    DropOldest,
    /// Refuse the new message unless it outranks a queued one (which then goes instead).
    DropNewest,
}

/// What a message is, lowest priority first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Per-frame results (detections, frames).
    Result = 0,
    /// Retained state: availability, camera status, ON/OFF, discovery.
    State = 1,
    Event = 2,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Result, Kind::State, Kind::Event];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Result => "results",
            Kind::State => "state",
            Kind::Event => "events",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Message {
    /// Order of arrival in the outbox.
    pub order: u64,
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
    pub retain: bool,
    pub kind: Kind,
}

/// Counters, per kind where it matters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxStats {
    pub queued_now: usize,
    pub in_flight_now: usize,
    /// Most messages ever waiting at once.
    pub peak: usize,
    pub accepted: [u64; 3],
    pub delivered: [u64; 3],
    pub dropped: [u64; 3],
    /// Messages sent again after a reconnect.
    pub resent: u64,
}

pub struct Outbox {
    capacity: usize,
    policy: OverflowPolicy,
    next_order: u64,
    queue: VecDeque<Message>,
    handed: VecDeque<Message>,
    in_flight: HashMap<u16, Message>,
    stats: OutboxStats,
}

impl Outbox {
    pub fn new(capacity: usize, policy: OverflowPolicy) -> Self {
        Outbox {
            capacity: capacity.max(1),
            policy,
            next_order: 0,
            queue: VecDeque::new(),
            handed: VecDeque::new(),
            in_flight: HashMap::new(),
            stats: OutboxStats::default(),
        }
    }

    /// Queues a message. Returns the kind of the message dropped to make room (or of the new one,
    /// refused), if any.
    pub fn push(
        &mut self,
        topic: String,
        payload: Vec<u8>,
        qos: QoS,
        retain: bool,
        kind: Kind,
    ) -> Option<Kind> {
        let dropped = match self.make_room(kind) {
            Ok(dropped) => dropped,
            Err(refused) => return Some(refused),
        };
        self.next_order += 1;
        self.queue.push_back(Message {
            order: self.next_order,
            topic,
            payload,
            qos,
            retain,
            kind,
        });
        self.stats.accepted[kind as usize] += 1;
        self.stats.peak = self.stats.peak.max(self.waiting());
        dropped
    }

    /// Makes room for a message of `kind` when the outbox is full, by the overflow policy: drops
    /// the oldest queued message of the lowest kind (returned), or refuses the new one (Err, and
    /// counted). Handed and in-flight messages are the client's: they are never dropped.
    fn make_room(&mut self, kind: Kind) -> Result<Option<Kind>, Kind> {
        if self.waiting() < self.capacity {
            return Ok(None);
        }
        let lowest = self.queue.iter().map(|m| m.kind).min();
        let refuse = match lowest {
            None => true,
            Some(lowest) => {
                self.policy == OverflowPolicy::DropNewest && kind <= lowest
                    || self.policy == OverflowPolicy::DropOldest && kind < lowest
            }
        };
        let Some(lowest) = lowest.filter(|_| !refuse) else {
            self.stats.dropped[kind as usize] += 1;
            return Err(kind);
        };
        self.drop_oldest(lowest);
        Ok(Some(lowest))
    }

    /// Puts retained state back at the front (after a reconnect: the broker may have lost it),
    /// within the capacity. `messages` holds the latest payload of each retained topic, the most
    /// important last: a queued retained message of one of those topics is superseded by it and
    /// goes; queued per-frame results make room; what still does not fit is dropped from the
    /// front of `messages`. The last one always gets in (vigil's `online`), by dropping the
    /// oldest queued message if it must. Returns how many were dropped.
    pub fn push_front_state(&mut self, messages: Vec<(String, Vec<u8>, QoS)>) -> usize {
        let topics: HashSet<&str> = messages.iter().map(|(t, _, _)| t.as_str()).collect();
        self.queue
            .retain(|m| !(m.retain && m.kind == Kind::State && topics.contains(m.topic.as_str())));
        let free = self.capacity.saturating_sub(self.waiting());
        let results = self.queue.iter().filter(|m| m.kind == Kind::Result).count();
        let fit = messages.len().min(free + results);
        for _ in 0..fit.saturating_sub(free) {
            self.drop_oldest(Kind::Result);
        }
        let mut dropped = messages.len() - fit;
        if fit == 0
            && dropped > 0
            && let Some(lowest) = self.queue.iter().map(|m| m.kind).min()
        {
            // Full of events: the last one still goes in, for the oldest of them.
            self.drop_oldest(lowest);
            dropped -= 1;
        }
        self.stats.dropped[Kind::State as usize] += dropped as u64;
        for (topic, payload, qos) in messages.into_iter().skip(dropped).rev() {
            self.queue.push_front(Message {
                order: 0,
                topic,
                payload,
                qos,
                retain: true,
                kind: Kind::State,
            });
        }
        self.stats.peak = self.stats.peak.max(self.waiting());
        dropped
    }

    /// Drops the oldest queued message of `kind` (one is queued), counted.
    fn drop_oldest(&mut self, kind: Kind) {
        let at = self
            .queue
            .iter()
            .position(|m| m.kind == kind)
            .expect("a message of that kind is queued");
        self.queue.remove(at);
        self.stats.dropped[kind as usize] += 1;
    }

    /// Messages not yet acknowledged (queued, handed or in flight).
    pub fn waiting(&self) -> usize {
        self.queue.len() + self.handed.len() + self.in_flight.len()
    }

    /// Hands queued messages to `send` in order until it refuses one (the client is full).
    pub fn flush(&mut self, mut send: impl FnMut(&Message) -> bool) {
        while let Some(front) = self.queue.front() {
            if !send(front) {
                break;
            }
            let m = self.queue.pop_front().expect("front exists");
            self.handed.push_back(m);
        }
    }

    /// rumqttc sent the oldest handed message with packet id `pkid`.
    pub fn on_sent(&mut self, pkid: u16) {
        let Some(m) = self.handed.pop_front() else {
            return;
        };
        if m.qos == QoS::AtMostOnce {
            self.stats.delivered[m.kind as usize] += 1;
        } else {
            self.in_flight.insert(pkid, m);
        }
    }

    /// The broker acknowledged packet `pkid` (PUBACK, or PUBCOMP for QoS 2).
    pub fn on_acked(&mut self, pkid: u16) {
        if let Some(m) = self.in_flight.remove(&pkid) {
            self.stats.delivered[m.kind as usize] += 1;
        }
    }

    /// The connection dropped: what was handed or in flight goes back to the front, in order.
    pub fn on_disconnected(&mut self) {
        let mut back: Vec<Message> = self.in_flight.drain().map(|(_, m)| m).collect();
        back.sort_by_key(|m| m.order);
        back.extend(self.handed.drain(..));
        self.stats.resent += back.len() as u64;
        for m in back.into_iter().rev() {
            self.queue.push_front(m);
        }
    }

    pub fn stats(&self) -> OutboxStats {
        OutboxStats {
            queued_now: self.queue.len(),
            in_flight_now: self.handed.len() + self.in_flight.len(),
            ..self.stats.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(o: &mut Outbox, name: &str, kind: Kind) -> Option<Kind> {
        o.push(name.into(), Vec::new(), QoS::AtLeastOnce, false, kind)
    }

    fn topics(o: &mut Outbox) -> Vec<String> {
        let mut out = Vec::new();
        o.flush(|m| {
            out.push(m.topic.clone());
            true
        });
        out
    }

    #[test]
    fn overflow_drops_the_oldest_results_first_and_events_last() {
        let mut o = Outbox::new(3, OverflowPolicy::DropOldest);
        push(&mut o, "r1", Kind::Result);
        push(&mut o, "e1", Kind::Event);
        push(&mut o, "r2", Kind::Result);
        assert_eq!(push(&mut o, "e2", Kind::Event), Some(Kind::Result));
        assert_eq!(push(&mut o, "s1", Kind::State), Some(Kind::Result));
        // Only a state and events left: the state goes before any event.
        assert_eq!(push(&mut o, "e3", Kind::Event), Some(Kind::State));
        // Events only: the oldest event goes; a result is refused outright.
        assert_eq!(push(&mut o, "r3", Kind::Result), Some(Kind::Result));
        assert_eq!(push(&mut o, "e4", Kind::Event), Some(Kind::Event));
        assert_eq!(topics(&mut o), vec!["e2", "e3", "e4"]);
        assert_eq!(o.stats().dropped, [3, 1, 1]);
    }

    #[test]
    fn drop_newest_refuses_what_does_not_outrank_the_queue() {
        let mut o = Outbox::new(2, OverflowPolicy::DropNewest);
        push(&mut o, "r1", Kind::Result);
        push(&mut o, "e1", Kind::Event);
        assert_eq!(push(&mut o, "r2", Kind::Result), Some(Kind::Result));
        assert_eq!(push(&mut o, "e2", Kind::Event), Some(Kind::Result));
        assert_eq!(push(&mut o, "e3", Kind::Event), Some(Kind::Event));
        assert_eq!(topics(&mut o), vec!["e1", "e2"]);
    }

    #[test]
    fn unacknowledged_messages_are_sent_again_in_order_after_a_disconnect() {
        let mut o = Outbox::new(10, OverflowPolicy::DropOldest);
        for t in ["a", "b", "c", "d"] {
            push(&mut o, t, Kind::Event);
        }
        // a, b and c handed; a and b sent (pkids 1, 2); a acknowledged.
        let mut n = 0;
        o.flush(|_| {
            n += 1;
            n <= 3
        });
        o.on_sent(1);
        o.on_sent(2);
        o.on_acked(1);
        assert_eq!(o.stats().delivered[Kind::Event as usize], 1);
        o.on_disconnected();
        assert_eq!(o.stats().resent, 2);
        assert_eq!(topics(&mut o), vec!["b", "c", "d"]);
        assert_eq!(o.waiting(), 3);
    }

    #[test]
    fn the_capacity_counts_messages_in_flight() {
        let mut o = Outbox::new(3, OverflowPolicy::DropOldest);
        for t in ["e1", "e2"] {
            push(&mut o, t, Kind::Event);
        }
        o.flush(|_| true);
        o.on_sent(1);
        o.on_sent(2);
        push(&mut o, "r1", Kind::Result);
        // Two in flight and one queued: full; a new state drops the queued result.
        assert_eq!(push(&mut o, "s1", Kind::State), Some(Kind::Result));
        // Nothing queued below an event: refused rather than over the capacity.
        o.flush(|_| true);
        assert_eq!(push(&mut o, "r2", Kind::Result), Some(Kind::Result));
        assert_eq!(o.waiting(), 3);
        o.on_disconnected();
        assert_eq!(o.waiting(), 3);
        assert_eq!(o.stats().peak, 3);
    }

    fn state(topics: &[&str]) -> Vec<(String, Vec<u8>, QoS)> {
        topics
            .iter()
            .map(|t| (t.to_string(), b"latest".to_vec(), QoS::AtLeastOnce))
            .collect()
    }

    #[test]
    fn republished_state_stays_within_the_capacity() {
        let mut o = Outbox::new(4, OverflowPolicy::DropOldest);
        push(&mut o, "r1", Kind::Result);
        push(&mut o, "e1", Kind::Event);
        o.push(
            "s2".into(),
            b"older".to_vec(),
            QoS::AtLeastOnce,
            true,
            Kind::State,
        );
        push(&mut o, "e2", Kind::Event);
        // s2's queued message is superseded by its latest payload, which leaves one free place;
        // with the result dropped, two of the five fit: the last two.
        assert_eq!(
            o.push_front_state(state(&["s1", "s2", "s3", "s4", "status"])),
            3
        );
        assert_eq!(o.waiting(), 4);
        assert_eq!(o.stats().dropped, [1, 3, 0]);
        assert_eq!(topics(&mut o), vec!["s4", "status", "e1", "e2"]);
    }

    #[test]
    fn the_last_republished_message_always_gets_in() {
        let mut o = Outbox::new(2, OverflowPolicy::DropOldest);
        push(&mut o, "e1", Kind::Event);
        push(&mut o, "e2", Kind::Event);
        assert_eq!(o.push_front_state(state(&["s1", "status"])), 1);
        assert_eq!(o.stats().dropped, [0, 1, 1]);
        assert_eq!(o.waiting(), 2);
        assert_eq!(topics(&mut o), vec!["status", "e2"]);
    }

    #[test]
    fn retained_state_is_republished_first() {
        let mut o = Outbox::new(10, OverflowPolicy::DropOldest);
        push(&mut o, "e1", Kind::Event);
        o.push_front_state(vec![
            ("s1".into(), b"ON".to_vec(), QoS::AtLeastOnce),
            ("s2".into(), b"OFF".to_vec(), QoS::AtLeastOnce),
        ]);
        assert_eq!(topics(&mut o), vec!["s1", "s2", "e1"]);
    }
}
