//! One stop signal for vigil's threads: set once, seen by every holder, and waited on rather than
//! polled (a thread that sleeps between retries wakes up the moment the stop comes).
//!
//! A [`Shutdown`] can have children (a camera's own stop inside the pipeline's): stopping a parent
//! stops its children, stopping a child leaves the parent running. [`spawn`] starts a thread whose
//! end can be waited for with a deadline.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::sync::lock;

struct Inner {
    stopped: AtomicBool,
    /// Dropped on stop: every receiver then wakes up at once.
    wake: Mutex<Option<Sender<()>>>,
    woken: Receiver<()>,
    children: Mutex<Vec<Weak<Inner>>>,
}

impl Inner {
    fn new(stopped: bool) -> Arc<Inner> {
        let (tx, rx) = crossbeam_channel::bounded(0);
        let inner = Arc::new(Inner {
            stopped: AtomicBool::new(false),
            wake: Mutex::new(Some(tx)),
            woken: rx,
            children: Mutex::new(Vec::new()),
        });
        if stopped {
            inner.stop();
        }
        inner
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        lock(&self.wake).take();
        let children = std::mem::take(&mut *lock(&self.children));
        for child in children.iter().filter_map(Weak::upgrade) {
            child.stop();
        }
    }
}

/// A stop signal; clones share it.
#[derive(Clone)]
pub struct Shutdown(Arc<Inner>);

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Shutdown(stopped: {})", self.is_stopped())
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown(Inner::new(false))
    }

    /// A signal of its own that also fires when this one does (at once if this one has already).
    pub fn child(&self) -> Shutdown {
        let child = Inner::new(false);
        {
            let mut children = lock(&self.0.children);
            children.retain(|c| c.strong_count() > 0);
            children.push(Arc::downgrade(&child));
        }
        // A stop that raced with the registration above reaches the child here.
        if self.is_stopped() {
            child.stop();
        }
        Shutdown(child)
    }

    /// Stops every holder (and every child). Idempotent.
    pub fn stop(&self) {
        self.0.stop();
    }

    pub fn is_stopped(&self) -> bool {
        self.0.stopped.load(Ordering::SeqCst)
    }

    /// Waits at most `d`; true when the stop came (at once if it already had).
    pub fn stopped_within(&self, d: Duration) -> bool {
        if self.is_stopped() {
            return true;
        }
        matches!(
            self.0.woken.recv_timeout(d),
            Err(RecvTimeoutError::Disconnected)
        )
    }

    /// Becomes ready (disconnected) on stop: for `crossbeam_channel::select!`.
    pub fn receiver(&self) -> &Receiver<()> {
        &self.0.woken
    }
}

/// How a supervised thread (or task) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub name: String,
    /// Why it failed: its panic's message, or what ended it before its time. None: a normal end.
    pub panic: Option<String>,
}

/// Where supervised threads report their end, also by a panic: no thread dies unobserved.
#[derive(Clone)]
pub struct Exits(Sender<Exit>);

impl Exits {
    pub fn new() -> (Exits, Receiver<Exit>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (Exits(tx), rx)
    }

    /// Reports an end observed elsewhere (an async task's).
    pub fn report(&self, exit: Exit) {
        let _ = self.0.send(exit);
    }

    /// Starts a named thread that reports its end here (a panic is caught and reported with its
    /// message; the default hook has printed it already).
    pub fn spawn(
        &self,
        name: String,
        f: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<Joinable> {
        let tx = self.0.clone();
        spawn(name.clone(), move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let panic = outcome.err().map(|p| panic_message(p.as_ref()));
            let _ = tx.send(Exit { name, panic });
        })
    }
}

/// The message a panic was raised with.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (
        payload.downcast_ref::<&str>(),
        payload.downcast_ref::<String>(),
    ) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "(no message)".into(),
    }
}

/// A thread whose end can be waited for with a deadline.
pub struct Joinable {
    thread: JoinHandle<()>,
    /// Disconnected when the thread ends (also by a panic).
    done: Receiver<()>,
}

/// Starts a named thread.
pub fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> std::io::Result<Joinable> {
    let (done_tx, done) = crossbeam_channel::bounded::<()>(0);
    let thread = std::thread::Builder::new().name(name).spawn(move || {
        let _done = done_tx;
        f()
    })?;
    Ok(Joinable { thread, done })
}

impl Joinable {
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits at most `deadline` for the thread to end and joins it; gives the handle back if it
    /// is still running.
    pub fn join_within(self, deadline: Duration) -> Result<(), Joinable> {
        match self.done.recv_timeout(deadline) {
            Err(RecvTimeoutError::Timeout) => Err(self),
            _ => {
                let _ = self.thread.join();
                Ok(())
            }
        }
    }

    pub fn join(self) {
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_waiting_thread_wakes_at_the_stop_not_at_its_timeout() {
        let s = Shutdown::new();
        let waiter = s.clone();
        let t = std::thread::spawn(move || {
            let started = Instant::now();
            (
                waiter.stopped_within(Duration::from_secs(30)),
                started.elapsed(),
            )
        });
        std::thread::sleep(Duration::from_millis(20));
        s.stop();
        let (stopped, waited) = t.join().unwrap();
        assert!(stopped);
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        assert!(s.stopped_within(Duration::from_secs(30)));
    }

    #[test]
    fn without_a_stop_the_wait_times_out() {
        let s = Shutdown::new();
        assert!(!s.stopped_within(Duration::from_millis(10)));
        assert!(!s.is_stopped());
    }

    #[test]
    fn a_parent_stops_its_children_and_not_the_other_way() {
        let parent = Shutdown::new();
        let a = parent.child();
        let b = parent.child();
        a.stop();
        assert!(a.is_stopped() && !b.is_stopped() && !parent.is_stopped());
        parent.stop();
        assert!(b.is_stopped());
        assert!(b.stopped_within(Duration::ZERO));
        // A child made after the stop is stopped from birth.
        assert!(parent.child().is_stopped());
    }

    #[test]
    fn a_thread_is_joined_as_soon_as_it_ends_and_kept_while_it_runs() {
        let s = Shutdown::new();
        let waiter = s.clone();
        let t = spawn("t".into(), move || {
            waiter.stopped_within(Duration::from_secs(30));
        })
        .unwrap();
        let t = t.join_within(Duration::from_millis(20)).unwrap_err();
        s.stop();
        let started = Instant::now();
        assert!(t.join_within(Duration::from_secs(30)).is_ok());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_supervised_thread_reports_its_end_and_its_panic() {
        let (exits, ended) = Exits::new();
        exits.spawn("calm".into(), || {}).unwrap().join();
        exits
            .spawn("doomed".into(), || panic!("boom {}", 7))
            .unwrap()
            .join();
        let got: Vec<Exit> = ended.try_iter().collect();
        assert_eq!(
            got,
            [
                Exit {
                    name: "calm".into(),
                    panic: None
                },
                Exit {
                    name: "doomed".into(),
                    panic: Some("boom 7".into())
                },
            ]
        );
    }

    #[test]
    fn select_sees_the_stop() {
        let s = Shutdown::new();
        let (_tx, never) = crossbeam_channel::bounded::<u8>(0);
        s.stop();
        crossbeam_channel::select! {
            recv(never) -> _ => panic!("nothing was sent"),
            recv(s.receiver()) -> r => assert!(r.is_err()),
        }
    }
}
