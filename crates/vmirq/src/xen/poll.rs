//! The wake protocol of `SCHEDOP_poll` (Xen `do_poll`, `evtchn_check_pollers`, `vcpu_kick`).
//!
//! A poller counts itself in (`polling`, SeqCst) under the `pollers` lock, then checks its
//! ports, and sleeps on `wake` until it is marked woken or its deadline passes. A delivery
//! that set a new pending bit (an RMW, SeqCst) loads `polling` (SeqCst) and takes the lock only
//! if somebody polls. The two SeqCst pairs order every interleaving: either the poller's check
//! sees the bit, or the delivery sees the count and marks the poller under the lock. Checked
//! with loom (`loom_tests`): the poller never sleeps through an event.
//!
//! Lock: `pollers` is a leaf, taken on the delivery path under a port's read hold.

#[cfg(loom)]
use loom::sync::{
    atomic::{AtomicU32, AtomicU64, Ordering},
    Condvar, Mutex, MutexGuard,
};
#[cfg(not(loom))]
use std::sync::{
    atomic::{AtomicU32, AtomicU64, Ordering},
    Condvar, Mutex, MutexGuard,
};
use std::time::Instant;

pub(super) struct Poller {
    id: u64,
    vcpu: u32,
    /// The one port a single-port poll waits for; `None` for several ports (woken by any).
    port: Option<u32>,
    woken: bool,
}

/// The vCPUs blocked in a poll.
#[derive(Default)]
pub(super) struct PollState {
    polling: AtomicU32,
    next_id: AtomicU64,
    pollers: Mutex<Vec<Poller>>,
    wake: Condvar,
}

/// A poller counted in; the lock is held until it checks its ports and waits.
pub(super) struct Polling<'a> {
    state: &'a PollState,
    pollers: Option<MutexGuard<'a, Vec<Poller>>>,
    id: u64,
}

impl PollState {
    fn lock(&self) -> MutexGuard<'_, Vec<Poller>> {
        self.pollers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts `vcpu` in as polling `port` (one port) or any port (`None`). The caller checks
    /// its ports next, then calls [`Polling::wait`].
    pub(super) fn enter(&self, vcpu: u32, port: Option<u32>) -> Polling<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut pollers = self.lock();
        pollers.push(Poller {
            id,
            vcpu,
            port,
            woken: false,
        });
        self.polling.fetch_add(1, Ordering::SeqCst);
        Polling {
            state: self,
            pollers: Some(pollers),
            id,
        }
    }

    /// Xen `evtchn_check_pollers` (a new pending bit on `port`) and `vcpu_kick` (an upcall
    /// raised on `kick`). One SeqCst load when nobody polls.
    pub(super) fn check(&self, port: Option<u32>, kick: Option<u32>) {
        // SeqCst load after the caller's SeqCst RMW of the pending bit: the single order of
        // SeqCst operations puts it after a poller's count, or the poller's check after the
        // bit. loom models SeqCst as AcqRel only, so its model reads with an RMW, which AcqRel
        // alone orders the same way.
        #[cfg(not(loom))]
        let polling = self.polling.load(Ordering::SeqCst);
        #[cfg(loom)]
        let polling = self.polling.fetch_add(0, Ordering::SeqCst);
        if polling == 0 {
            return;
        }
        let mut pollers = self.lock();
        let mut woke = false;
        for p in pollers.iter_mut() {
            let on_port = port.is_some_and(|q| p.port.is_none_or(|x| x == q));
            if on_port || kick == Some(p.vcpu) {
                p.woken = true;
                woke = true;
            }
        }
        drop(pollers);
        if woke {
            self.wake.notify_all();
        }
    }

    /// vCPUs polling now.
    pub(super) fn pollers(&self) -> usize {
        self.lock().len()
    }
}

impl Polling<'_> {
    /// Sleeps until woken or `deadline` (None: no timeout).
    pub(super) fn wait(mut self, deadline: Option<Instant>) {
        let Some(mut pollers) = self.pollers.take() else {
            return;
        };
        let wake = &self.state.wake;
        while !pollers.iter().any(|p| p.id == self.id && p.woken) {
            pollers = match deadline {
                Some(at) => {
                    let now = Instant::now();
                    if now >= at {
                        break;
                    }
                    wake.wait_timeout(pollers, at - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => wake.wait(pollers).unwrap_or_else(|e| e.into_inner()),
            };
        }
        self.pollers = Some(pollers);
    }
}

impl Drop for Polling<'_> {
    /// Counts the poller out.
    fn drop(&mut self) {
        let mut pollers = self.pollers.take().unwrap_or_else(|| self.state.lock());
        if let Some(i) = pollers.iter().position(|p| p.id == self.id) {
            pollers.swap_remove(i);
        }
        self.state.polling.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Model checks of the wake protocol (`RUSTFLAGS="--cfg loom" cargo test -p vmirq --lib
/// loom`; CI runs it). The port's pending bit is an atomic set with a SeqCst RMW, as in
/// guest memory.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::AtomicBool;
    use loom::sync::Arc;
    use loom::thread;

    #[test]
    fn loom_a_poller_never_sleeps_through_its_event() {
        loom::model(|| {
            let state = Arc::new(PollState::default());
            let pending = Arc::new(AtomicBool::new(false));
            let sender = {
                let (state, pending) = (state.clone(), pending.clone());
                thread::spawn(move || {
                    // set_pending: a new pending bit, then evtchn_check_pollers.
                    if !pending.fetch_or(true, Ordering::SeqCst) {
                        state.check(Some(5), None);
                    }
                })
            };
            let polling = state.enter(0, Some(5));
            if !pending.load(Ordering::SeqCst) {
                // Would deadlock (loom reports it) if the sender could miss the poller.
                polling.wait(None);
            } else {
                drop(polling);
            }
            sender.join().unwrap();
            assert_eq!(state.pollers(), 0);
        });
    }
}
