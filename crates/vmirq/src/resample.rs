//! The shared resampler of one GSI: "on ack, de-assert and notify" in userspace.
//!
//! Every level irqfd with a resamplefd on a GSI joins the GSI's one `Resampler` (as in Linux
//! `virt/kvm/eventfd.c` since the fix for two ack notifiers racing on one GSI). The level the
//! irqfds assert is the IOAPIC's *resampled input* of the GSI's pin, one input shared by all of
//! them; the IOAPIC model drops it on the guest's EOI, and the resampler then signals every
//! member's resamplefd.
//!
//! Locking: `members` guards membership, and is held while notifying, so a member is notified
//! of every acknowledgement that happens while it belongs. Removing the last member de-asserts
//! the input under the same lock, so a member added concurrently never has its assertion
//! cleared by a leaving one. Asserting takes no resampler lock. Lock order: `members`, then the
//! line (the IOAPIC); acknowledgement runs after the IOAPIC's lock is released.

#[cfg(loom)]
use loom::sync::{Mutex, MutexGuard};
#[cfg(not(loom))]
use std::sync::{Mutex, MutexGuard};

use crate::route::Gsi;

/// Something a resampler notifies: a resamplefd (or a test's counter).
pub trait Notify: Send + Sync {
    /// The guest acknowledged the line.
    fn notify(&self);
}

impl Notify for vmm_sys_util::eventfd::EventFd {
    fn notify(&self) {
        // A full counter (2^64 - 2 pending) already tells the device to look: nothing lost.
        let _ = self.write(1);
    }
}

/// The line a resampler's members assert: the IOAPIC's resampled input of the GSI's pins.
pub(crate) trait ResampledLine {
    fn set_resampled(&self, gsi: Gsi, level: bool);
}

struct Members<N> {
    list: Vec<(u64, N)>,
    next_id: u64,
}

/// See the module docs.
pub(crate) struct Resampler<N> {
    gsi: Gsi,
    members: Mutex<Members<N>>,
}

impl<N: Notify> Resampler<N> {
    pub(crate) fn new(gsi: Gsi) -> Self {
        Self {
            gsi,
            members: Mutex::new(Members {
                list: Vec::new(),
                next_id: 0,
            }),
        }
    }

    pub(crate) fn gsi(&self) -> Gsi {
        self.gsi
    }

    /// Joins a member; returns its id for [`Resampler::leave`].
    pub(crate) fn join(&self, notify: N) -> u64 {
        let mut m = lock(&self.members);
        let id = m.next_id;
        m.next_id += 1;
        m.list.push((id, notify));
        id
    }

    /// A member's trigger fired: assert the shared input (it stays up until the guest's EOI).
    pub(crate) fn assert(&self, line: &dyn ResampledLine) {
        line.set_resampled(self.gsi, true);
    }

    /// The guest acknowledged the GSI and the input was dropped: notify every member.
    pub(crate) fn acked(&self) {
        let m = lock(&self.members);
        for (_, n) in &m.list {
            n.notify();
        }
    }

    /// A member leaves. The last one to leave de-asserts the input (Linux
    /// `irqfd_resampler_shutdown`): a deassigned irqfd never leaves the line asserted.
    /// Returns whether the resampler is now empty.
    pub(crate) fn leave(&self, id: u64, line: &dyn ResampledLine) -> bool {
        let mut m = lock(&self.members);
        m.list.retain(|(i, _)| *i != id);
        let empty = m.list.is_empty();
        if empty {
            line.set_resampled(self.gsi, false);
        }
        empty
    }

    #[cfg(loom)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.members).list.len()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Model checks of the resampler protocol against every interleaving of trigger, guest EOI,
/// assign and deassign (`RUSTFLAGS="--cfg loom" cargo test -p vmirq --lib loom`; CI runs it).
/// The dispatcher entry's `busy` lock (held while its event is acted on; removal marks the entry
/// dead, then takes it) and the IOAPIC's resampled input are modelled as the core uses them: a
/// trigger asserts only while its irqfd is live; the EOI drops the input under the IOAPIC lock,
/// then the resampler notifies.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::{AtomicUsize, Ordering};
    use loom::sync::Arc;
    use loom::thread;

    #[derive(Default)]
    struct Counter(Arc<AtomicUsize>);

    impl Notify for Counter {
        fn notify(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The IOAPIC's resampled input of the GSI's pin.
    #[derive(Default)]
    struct Line {
        resampled: Mutex<bool>,
    }

    impl ResampledLine for Line {
        fn set_resampled(&self, _gsi: Gsi, level: bool) {
            *self.resampled.lock().unwrap() = level;
        }
    }

    impl Line {
        /// Guest EOI: the model drops an asserted input; returns whether it did.
        fn eoi(&self) -> bool {
            std::mem::take(&mut *self.resampled.lock().unwrap())
        }

        fn asserted(&self) -> bool {
            *self.resampled.lock().unwrap()
        }
    }

    struct Irqfd {
        live: Mutex<bool>,
    }

    impl Irqfd {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                live: Mutex::new(true),
            })
        }

        /// The dispatcher read the trigger eventfd.
        fn trigger(&self, r: &Resampler<Counter>, line: &Line) {
            let live = self.live.lock().unwrap();
            if *live {
                r.assert(line);
            }
        }

        /// Deassign: stop the trigger, then leave the resampler.
        fn deassign(&self, id: u64, r: &Resampler<Counter>, line: &Line) {
            *self.live.lock().unwrap() = false;
            r.leave(id, line);
        }
    }

    fn counter() -> (Counter, Arc<AtomicUsize>) {
        let c = Arc::new(AtomicUsize::new(0));
        (Counter(c.clone()), c)
    }

    #[test]
    fn loom_deassigned_irqfd_never_leaves_the_line_asserted() {
        loom::model(|| {
            let r = Arc::new(Resampler::new(Gsi(5)));
            let line = Arc::new(Line::default());
            let (n, notified) = counter();
            let x = r.join(n);
            let fd = Irqfd::new();
            let t1 = {
                let (r, line, fd) = (r.clone(), line.clone(), fd.clone());
                thread::spawn(move || fd.trigger(&r, &line))
            };
            let t2 = {
                let (r, line) = (r.clone(), line.clone());
                thread::spawn(move || {
                    if line.eoi() {
                        r.acked();
                    }
                })
            };
            fd.deassign(x, &r, &line);
            t1.join().unwrap();
            t2.join().unwrap();
            assert!(
                !line.asserted(),
                "a deassigned irqfd left the line asserted"
            );
            assert!(notified.load(Ordering::SeqCst) <= 1);
        });
    }

    #[test]
    fn loom_every_ack_notifies_every_remaining_member_once() {
        loom::model(|| {
            let r = Arc::new(Resampler::new(Gsi(5)));
            let line = Arc::new(Line::default());
            let (nx, _) = counter();
            let (ny, y_notified) = counter();
            let x = r.join(nx);
            let _y = r.join(ny);
            let fd_x = Irqfd::new();
            let acked = Arc::new(AtomicUsize::new(0));
            let t1 = {
                let (r, line, fd_x) = (r.clone(), line.clone(), fd_x.clone());
                thread::spawn(move || fd_x.trigger(&r, &line))
            };
            let t2 = {
                let (r, line, acked) = (r.clone(), line.clone(), acked.clone());
                thread::spawn(move || {
                    if line.eoi() {
                        r.acked();
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                })
            };
            fd_x.deassign(x, &r, &line);
            t1.join().unwrap();
            t2.join().unwrap();
            // The line was de-asserted by the EOI exactly when Y heard of it.
            assert_eq!(
                y_notified.load(Ordering::SeqCst),
                acked.load(Ordering::SeqCst)
            );
            // If still asserted, Y remains to be notified at the next EOI.
            assert!(!line.asserted() || r.len() == 1);
        });
    }

    #[test]
    fn loom_a_joining_irqfd_keeps_its_assertion_when_the_last_one_leaves() {
        loom::model(|| {
            let r = Arc::new(Resampler::new(Gsi(5)));
            let line = Arc::new(Line::default());
            let (nx, _) = counter();
            let x = r.join(nx);
            let fd_x = Irqfd::new();
            let t1 = {
                let (r, line) = (r.clone(), line.clone());
                thread::spawn(move || fd_x.deassign(x, &r, &line))
            };
            let (ny, _) = counter();
            let _y = r.join(ny);
            Irqfd::new().trigger(&r, &line);
            t1.join().unwrap();
            assert!(
                line.asserted(),
                "a leaving irqfd cleared a joining one's assertion"
            );
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    // Written to kill mutants cargo-mutants found surviving (docs/mutants.md).

    struct Counter(Arc<AtomicU32>);

    impl Notify for Counter {
        fn notify(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[derive(Default)]
    struct Input(std::sync::Mutex<Vec<bool>>);

    impl ResampledLine for Input {
        fn set_resampled(&self, _gsi: Gsi, level: bool) {
            self.0.lock().unwrap().push(level);
        }
    }

    #[test]
    fn a_member_leaving_takes_only_itself_and_the_last_one_drops_the_input() {
        let r = Resampler::new(Gsi(18));
        let (a, b, c) = (Arc::default(), Arc::default(), Arc::default());
        let ids = [
            r.join(Counter(Arc::clone(&a))),
            r.join(Counter(Arc::clone(&b))),
            r.join(Counter(Arc::clone(&c))),
        ];
        assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
        let input = Input::default();
        assert!(!r.leave(ids[1], &input), "two members remain");
        assert!(
            input.0.lock().unwrap().is_empty(),
            "dropped with members left"
        );
        r.acked();
        let counts = |x: &Arc<AtomicU32>| x.load(Ordering::SeqCst);
        assert_eq!((counts(&a), counts(&b), counts(&c)), (1, 0, 1));
        assert!(!r.leave(ids[0], &input));
        assert!(r.leave(ids[2], &input), "the last member leaves it empty");
        assert_eq!(*input.0.lock().unwrap(), [false]);
    }
}
