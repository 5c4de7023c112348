//! Level interrupt lines as the OR of any number of sources.
//!
//! A [`Line`] counts its asserted [`IrqSource`]s; the line is high while the count is non-zero.
//! Asserting or de-asserting a source is one atomic swap and one atomic add: O(1) and lock-free
//! unless the count crosses zero. Only then is the new level pushed to the irqchip
//! (`KVM_IRQ_LINE`, or vmirq's IOAPIC), and no lock is held across that push: one thread at a
//! time pushes (it wins an atomic flag), and a thread that finds the flag taken only bumps the
//! line's epoch and returns; the pusher re-reads the count until no change arrived during its
//! push, so the last level pushed always matches the count. The protocol is model-checked with
//! `loom`. There is no cap on sources (Linux once capped them at BITS_PER_LONG).
//!
//! Ownership: a line holds the VM's delivery state; the VM keeps only a weak map of its lines,
//! so dropping every handle frees both (REFERENCE §7: `Arc` cycles between a line and its chip
//! kept whole VMs alive).

#[cfg(loom)]
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::route::Gsi;

/// Where a line's level goes: the in-kernel irqchip line, or the userspace IOAPIC's pins.
pub(crate) trait LevelSink: Send + Sync {
    fn set_level(&self, gsi: Gsi, level: bool);
    /// The last handle of `gsi`'s line went.
    fn line_dropped(&self, gsi: Gsi);
}

/// The combining push protocol of one line. See the module docs.
pub(crate) struct LevelPush {
    asserted: AtomicUsize,
    /// Edges asked for and not yet given.
    pulses: AtomicUsize,
    /// Bumped by every change; the pusher loops until it saw none during a pass.
    epoch: AtomicUsize,
    /// Held by the one thread pushing.
    pushing: AtomicBool,
    /// The level last pushed; touched only by the flag holder.
    pushed: AtomicBool,
}

impl LevelPush {
    pub(crate) fn new() -> Self {
        Self {
            asserted: AtomicUsize::new(0),
            pulses: AtomicUsize::new(0),
            epoch: AtomicUsize::new(0),
            pushing: AtomicBool::new(false),
            pushed: AtomicBool::new(false),
        }
    }

    /// One more source asserts; true if the line went high.
    pub(crate) fn raise(&self) -> bool {
        self.asserted.fetch_add(1, Ordering::SeqCst) == 0
    }

    /// One source stopped asserting; true if the line went low.
    pub(crate) fn lower(&self) -> bool {
        self.asserted.fetch_sub(1, Ordering::SeqCst) == 1
    }

    /// Asks for an edge: raise and drop the line, unless it is high already.
    pub(crate) fn request_pulse(&self) {
        self.pulses.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn count(&self) -> usize {
        self.asserted.load(Ordering::SeqCst)
    }

    /// The level the irqchip last got from this line.
    pub(crate) fn pushed(&self) -> bool {
        self.pushed.load(Ordering::SeqCst)
    }

    /// A restored line: the irqchip already has `level` (from the snapshot), so the sources
    /// that re-assert it push nothing. Only on a line nobody pushes yet.
    pub(crate) fn seed(&self, level: bool) {
        self.pushed.store(level, Ordering::SeqCst);
    }

    /// After a change: push levels through `push` until the pushed level matches the count
    /// and every requested edge was given, or leave it to the thread already pushing.
    pub(crate) fn sync(&self, push: impl Fn(bool)) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        loop {
            if self
                .pushing
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                // The holder re-checks the epoch after releasing the flag: it will see ours.
                return;
            }
            let mut seen;
            loop {
                seen = self.epoch.load(Ordering::SeqCst);
                let level = self.asserted.load(Ordering::SeqCst) > 0;
                let pushed = self.pushed.load(Ordering::Relaxed);
                if self.pulses.swap(0, Ordering::SeqCst) > 0 && !level && !pushed {
                    push(true);
                    push(false);
                }
                if level != pushed {
                    push(level);
                    self.pushed.store(level, Ordering::Relaxed);
                }
                if self.epoch.load(Ordering::SeqCst) == seen {
                    break;
                }
            }
            self.pushing.store(false, Ordering::SeqCst);
            if self.epoch.load(Ordering::SeqCst) == seen {
                return;
            }
        }
    }
}

/// One GSI's level line. Obtain with [`crate::IoapicPin::line`] or [`crate::GsiRoute::line`].
pub struct Line {
    gsi: Gsi,
    state: LevelPush,
    sink: Arc<dyn LevelSink>,
}

impl Line {
    pub(crate) fn new(gsi: Gsi, sink: Arc<dyn LevelSink>) -> Self {
        Self {
            gsi,
            state: LevelPush::new(),
            sink,
        }
    }

    /// The line's GSI.
    pub fn gsi(&self) -> Gsi {
        self.gsi
    }

    /// A new, de-asserted source on this line.
    pub fn source(self: &Arc<Self>) -> IrqSource {
        IrqSource {
            line: Arc::clone(self),
            asserted: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether any source asserts the line.
    pub fn is_asserted(&self) -> bool {
        self.state.count() > 0
    }

    /// Sources asserting the line now.
    pub fn asserted_sources(&self) -> usize {
        self.state.count()
    }

    /// The level the irqchip last got from this line (for a snapshot).
    pub(crate) fn pushed_level(&self) -> bool {
        self.state.pushed()
    }

    /// Restore: the irqchip already holds `level` for this line.
    pub(crate) fn seed(&self, level: bool) {
        self.state.seed(level);
    }

    /// Restore, once the sources are back: pushes the count's level if it differs from the
    /// seeded one (a line no source holds any more drops). An unchanged high level is not
    /// pushed again: KVM restores a level pin's IRR, and re-asserting an edge pin whose edge
    /// was delivered (KVM saves its IRR without `irr_delivered`) would deliver it twice. KVM's
    /// per-source bit, not saved, is not needed to lower the line later.
    pub(crate) fn settle(&self) {
        self.sync();
    }

    /// A source on this line as a snapshot saved it: asserted if it was (the line's seeded
    /// level already says so to the irqchip: nothing is delivered now).
    pub fn restore_source(
        self: &Arc<Self>,
        state: &crate::snapshot::SourceState,
    ) -> Result<IrqSource, crate::snapshot::SnapshotError> {
        if state.gsi != self.gsi {
            return Err(crate::snapshot::SnapshotError::Invalid(format!(
                "a source of {} restored on the line of {}",
                state.gsi, self.gsi
            )));
        }
        let source = self.source();
        if state.asserted {
            source.assert();
        }
        Ok(source)
    }

    /// An edge: raise and drop the line, unless a source holds it high already (then there is
    /// no edge to give, as on a wire).
    pub(crate) fn pulse(&self) {
        self.state.request_pulse();
        self.sync();
    }

    fn sync(&self) {
        self.state
            .sync(|level| self.sink.set_level(self.gsi, level));
    }
}

impl std::fmt::Debug for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Line")
            .field("gsi", &self.gsi)
            .field("asserted_sources", &self.asserted_sources())
            .finish()
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        self.sink.line_dropped(self.gsi);
    }
}

/// One device's input to a [`Line`]. Dropping it de-asserts.
pub struct IrqSource {
    line: Arc<Line>,
    asserted: std::sync::atomic::AtomicBool,
}

impl IrqSource {
    /// Asserts this source (idempotent). The line goes high if it was low.
    pub fn assert(&self) {
        use std::sync::atomic::Ordering::AcqRel;
        if !self.asserted.swap(true, AcqRel) && self.line.state.raise() {
            self.line.sync();
        }
    }

    /// De-asserts this source (idempotent). The line goes low if no other source holds it.
    pub fn deassert(&self) {
        use std::sync::atomic::Ordering::AcqRel;
        if self.asserted.swap(false, AcqRel) && self.line.state.lower() {
            self.line.sync();
        }
    }

    /// Asserts or de-asserts.
    pub fn set(&self, level: bool) {
        if level {
            self.assert()
        } else {
            self.deassert()
        }
    }

    /// Whether this source asserts now.
    pub fn is_asserted(&self) -> bool {
        self.asserted.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The line it drives.
    pub fn line(&self) -> &Arc<Line> {
        &self.line
    }
}

impl crate::snapshot::Save for IrqSource {
    fn save(&self) -> crate::snapshot::ObjectState {
        crate::snapshot::ObjectState::Source(crate::snapshot::SourceState {
            gsi: self.line.gsi,
            asserted: self.is_asserted(),
        })
    }
}

impl Drop for IrqSource {
    fn drop(&mut self) {
        self.deassert();
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::router::lock;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<bool>>);

    impl LevelSink for Recorder {
        fn set_level(&self, _gsi: Gsi, level: bool) {
            lock(&self.0).push(level);
        }
        fn line_dropped(&self, _gsi: Gsi) {}
    }

    fn line() -> (Arc<Line>, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        (Arc::new(Line::new(Gsi(9), rec.clone())), rec)
    }

    #[test]
    fn a_sync_with_nothing_to_do_pushes_nothing() {
        // Written to kill a surviving mutant (docs/mutants.md): no pulse asked, line low.
        let push = LevelPush::new();
        let pushed = Mutex::new(Vec::new());
        push.sync(|level| pushed.lock().unwrap().push(level));
        assert!(pushed.lock().unwrap().is_empty(), "a phantom edge");
        push.request_pulse();
        push.sync(|level| pushed.lock().unwrap().push(level));
        assert_eq!(*pushed.lock().unwrap(), [true, false], "the asked-for edge");
    }

    #[test]
    fn a_source_says_whether_it_asserts_and_a_line_names_itself() {
        let (line, _rec) = line();
        let s = line.source();
        assert!(!s.is_asserted());
        s.assert();
        assert!(s.is_asserted());
        let debug = format!("{line:?}");
        assert!(
            debug.contains("Gsi(9)") && debug.contains("asserted_sources: 1"),
            "{debug}"
        );
        s.deassert();
        assert!(!s.is_asserted());
    }

    #[test]
    fn line_is_the_or_of_ten_thousand_sources() {
        let (line, rec) = line();
        let sources: Vec<_> = (0..10_000).map(|_| line.source()).collect();
        for s in &sources {
            s.assert();
            s.assert();
        }
        assert_eq!(line.asserted_sources(), 10_000);
        for s in &sources[1..] {
            s.deassert();
        }
        assert!(line.is_asserted());
        drop(sources);
        assert!(!line.is_asserted());
        assert_eq!(
            *lock(&rec.0),
            [true, false],
            "only zero crossings reach the irqchip"
        );
    }

    #[test]
    fn pulse_on_a_held_line_gives_no_edge() {
        let (line, rec) = line();
        line.pulse();
        let s = line.source();
        s.assert();
        line.pulse();
        drop(s);
        assert_eq!(*lock(&rec.0), [true, false, true, false]);
    }

    #[test]
    fn concurrent_sources_leave_the_pushed_level_equal_to_the_count() {
        let (line, rec) = line();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let line = line.clone();
                std::thread::spawn(move || {
                    let s = line.source();
                    for i in 0..5_000 {
                        s.set(i % 2 == 0);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(!line.is_asserted());
        let pushes = lock(&rec.0);
        assert_eq!(pushes.last(), Some(&false));
        assert!(
            pushes.windows(2).all(|w| w[0] != w[1]),
            "one pusher at a time: pushes alternate"
        );
    }
}

/// Model checks of the push protocol (`RUSTFLAGS="--cfg loom" cargo test -p vmirq --lib
/// loom`; CI runs it): whatever the interleaving, one thread pushes at a time, and when every
/// thread has returned the last level pushed matches the count and every edge asked for on a
/// low line was given.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::{Arc, Mutex};
    use loom::thread;

    #[derive(Default)]
    struct Chip {
        pushes: Mutex<Vec<bool>>,
        busy: AtomicBool,
    }

    impl Chip {
        fn push(&self, level: bool) {
            assert!(
                !self.busy.swap(true, Ordering::SeqCst),
                "two pushers at once"
            );
            self.pushes.lock().unwrap().push(level);
            self.busy.store(false, Ordering::SeqCst);
        }
    }

    #[test]
    fn loom_last_push_matches_the_count() {
        loom::model(|| {
            let p = Arc::new(LevelPush::new());
            let chip = Arc::new(Chip::default());
            let t = {
                let (p, chip) = (p.clone(), chip.clone());
                thread::spawn(move || {
                    if p.raise() {
                        p.sync(|l| chip.push(l));
                    }
                    if p.lower() {
                        p.sync(|l| chip.push(l));
                    }
                })
            };
            if p.raise() {
                p.sync(|l| chip.push(l));
            }
            t.join().unwrap();
            let pushes = chip.pushes.lock().unwrap();
            assert_eq!(pushes.last(), Some(&true), "{pushes:?}");
            assert!(pushes.windows(2).all(|w| w[0] != w[1]), "{pushes:?}");
        });
    }

    #[test]
    fn loom_a_pulse_on_a_low_line_is_given() {
        loom::model(|| {
            let p = Arc::new(LevelPush::new());
            let chip = Arc::new(Chip::default());
            let t = {
                let (p, chip) = (p.clone(), chip.clone());
                thread::spawn(move || {
                    p.request_pulse();
                    p.sync(|l| chip.push(l));
                })
            };
            if p.raise() {
                p.sync(|l| chip.push(l));
            }
            if p.lower() {
                p.sync(|l| chip.push(l));
            }
            t.join().unwrap();
            let pushes = chip.pushes.lock().unwrap();
            // The line was high at some point either way: an edge reached the chip.
            assert!(pushes.contains(&true), "{pushes:?}");
            assert_eq!(pushes.last(), Some(&false), "{pushes:?}");
        });
    }
}
