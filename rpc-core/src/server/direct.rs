//! Requests handled on the thread that publishes them, where the transport is in process
//! ([`Capabilities::in_process`](crate::Capabilities::in_process)).
//!
//! The embedded broker hands a delivery to a direct consumer on the publisher's thread, after its locks. The
//! server takes a permit there and polls the request's handling once, as its loop would ([`Inline`]): a call
//! that stays in the process then runs on one thread from its publish to its reply, instead of going to the
//! thread of the server's loop and back, which two threads sharing every call pay for in cache misses and
//! wake-ups. A handling that waits moves to a task of its own. A delivery that finds no permit free, or the
//! server stopping, goes to the loop, which takes it like any other.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::inline::Inline;
use super::permits::Slot;
use super::pipeline::handle;
use super::{Shared, Source};
use crate::transport::{Consumer, Delivery};

/// What the server's loop keeps of its direct consumer.
pub(super) struct Direct {
    /// The deliveries it left to the loop.
    pub(super) overflow: Consumer,
    state: Arc<State>,
}

/// What the consumer's sink and the loop share.
struct State {
    /// Set once the server stops taking requests: every delivery goes to the loop then, which releases it.
    stopping: AtomicBool,
    /// The handlings that waited, moved to tasks of their own; `None` once the loop took them to wait for them.
    tasks: Mutex<Option<JoinSet<()>>>,
}

impl Direct {
    /// Has `requests` hand its deliveries to this server on the publisher's thread, if the transport can;
    /// `None` where it cannot (the loop takes them from the stream then).
    pub(super) fn start(shared: &Arc<Shared>, inline: &Arc<Inline>, requests: &mut Consumer) -> Option<Direct> {
        if !shared.transport.capabilities().in_process {
            return None;
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let state = Arc::new(State { stopping: AtomicBool::new(false), tasks: Mutex::new(Some(JoinSet::new())) });
        let (sender, receiver) = mpsc::unbounded_channel();
        let (shared, inline, sink_state) = (Arc::clone(shared), Arc::clone(inline), Arc::clone(&state));
        let sink = move |delivery: Delivery| {
            // The loop takes it when a permit is free, or releases it when stopping. A closed loop is a server
            // that stopped: the delivery dropped with it goes back to the queue with its consumer.
            if sink_state.stopping.load(Ordering::Acquire) || !shared.identity.permits.try_take() {
                let _ = sender.send(delivery);
                return;
            }
            let slot = Slot::taken(Arc::clone(&shared));
            // The publisher may be a thread outside the runtime: the handling's timers and tasks are the server's.
            let _runtime = runtime.enter();
            // The clock as the broker made the delivery, a moment ago.
            let made = delivery.received_at;
            let mut work = handle(slot, delivery, Source::Queue);
            if inline.allows() && inline.run_since(&mut work, made) {
                return;
            }
            match sink_state.tasks.lock().unwrap_or_else(PoisonError::into_inner).as_mut() {
                Some(tasks) => {
                    while tasks.try_join_next().is_some() {}
                    tasks.spawn_on(work, &runtime);
                }
                // The loop is waiting for the last handlings already: this one runs on, unwaited.
                None => drop(runtime.spawn(work)),
            }
        };
        if !requests.direct(Arc::new(sink)) {
            return None;
        }
        Some(Direct { overflow: Consumer::from_channel(receiver, None), state })
    }

    /// From now on every delivery goes to the loop.
    pub(super) fn stop(&self) {
        self.state.stopping.store(true, Ordering::Release);
    }

    /// The handlings that moved to tasks, for the loop to wait for.
    pub(super) fn take_tasks(&self) -> JoinSet<()> {
        self.state.tasks.lock().unwrap_or_else(PoisonError::into_inner).take().unwrap_or_default()
    }
}
