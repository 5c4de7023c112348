//! Level interrupt lines as the OR of any number of sources.
//!
//! A [`Line`] counts its asserted [`IrqSource`]s; the line is high while the count is non-zero.
//! Asserting or de-asserting a source is one atomic swap and one atomic add: O(1) and lock-free
//! unless the count crosses zero. Only then is the new level pushed to the irqchip, under the
//! line's own lock (never another line's), which re-reads the count so concurrent transitions
//! are applied in a consistent order and the last push always matches the count.
//! There is no cap on sources (Linux once capped them at BITS_PER_LONG).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::route::Gsi;
use crate::router::lock;

/// Where a line's level goes: the in-kernel irqchip line, or the userspace IOAPIC's pins.
pub(crate) trait LevelSink: Send + Sync {
    fn set_level(&self, gsi: Gsi, level: bool);
}

/// One GSI's level line. Obtain with [`crate::Interrupts::line`].
pub struct Line {
    gsi: Gsi,
    asserted: AtomicUsize,
    /// The level last pushed to the irqchip; held while pushing.
    pushed: Mutex<bool>,
    sink: Arc<dyn LevelSink>,
}

impl Line {
    pub(crate) fn new(gsi: Gsi, sink: Arc<dyn LevelSink>) -> Self {
        Self {
            gsi,
            asserted: AtomicUsize::new(0),
            pushed: Mutex::new(false),
            sink,
        }
    }

    pub fn gsi(&self) -> Gsi {
        self.gsi
    }

    /// A new, de-asserted source on this line.
    pub fn source(self: &Arc<Self>) -> IrqSource {
        IrqSource {
            line: Arc::clone(self),
            asserted: AtomicBool::new(false),
        }
    }

    /// Whether any source asserts the line.
    pub fn is_asserted(&self) -> bool {
        self.asserted.load(Ordering::Acquire) > 0
    }

    /// Sources asserting the line now.
    pub fn asserted_sources(&self) -> usize {
        self.asserted.load(Ordering::Acquire)
    }

    /// An edge: raise and drop the line, unless a source holds it high already (then there is
    /// no edge to give, as on a wire).
    pub(crate) fn pulse(&self) {
        let pushed = lock(&self.pushed);
        if !*pushed {
            self.sink.set_level(self.gsi, true);
            self.sink.set_level(self.gsi, false);
        }
    }

    fn sync(&self) {
        let mut pushed = lock(&self.pushed);
        let level = self.is_asserted();
        if level != *pushed {
            *pushed = level;
            self.sink.set_level(self.gsi, level);
        }
    }
}

/// One device's input to a [`Line`]. Dropping it de-asserts.
pub struct IrqSource {
    line: Arc<Line>,
    asserted: AtomicBool,
}

impl IrqSource {
    pub fn assert(&self) {
        if !self.asserted.swap(true, Ordering::AcqRel)
            && self.line.asserted.fetch_add(1, Ordering::AcqRel) == 0
        {
            self.line.sync();
        }
    }

    pub fn deassert(&self) {
        if self.asserted.swap(false, Ordering::AcqRel)
            && self.line.asserted.fetch_sub(1, Ordering::AcqRel) == 1
        {
            self.line.sync();
        }
    }

    pub fn set(&self, level: bool) {
        if level {
            self.assert()
        } else {
            self.deassert()
        }
    }

    pub fn is_asserted(&self) -> bool {
        self.asserted.load(Ordering::Acquire)
    }

    pub fn line(&self) -> &Arc<Line> {
        &self.line
    }
}

impl Drop for IrqSource {
    fn drop(&mut self) {
        self.deassert();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<bool>>);

    impl LevelSink for Recorder {
        fn set_level(&self, _gsi: Gsi, level: bool) {
            lock(&self.0).push(level);
        }
    }

    fn line() -> (Arc<Line>, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        (Arc::new(Line::new(Gsi(9), rec.clone())), rec)
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
        assert_eq!(lock(&rec.0).last(), Some(&false));
    }
}
