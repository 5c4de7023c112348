//! [`TimerService`]: one host thread for every Xen vCPU timer of every guest that shares it.
//!
//! Xen keeps a single-shot and a periodic timer per vCPU (xen/common/sched/core.c); a VM with
//! 128 vCPUs must not cost 256 host threads. The service keeps its timers in a deadline heap
//! served by one thread, started at the first arm and asleep on a condvar until the earliest
//! deadline (no polling, no timer slack: `Condvar::wait_timeout` sleeps on a futex with an
//! exact timeout). A [`Timer`] is an owned object: dropping it disarms it and waits for a
//! firing in flight, unless the drop runs inside that very callback.
//!
//! Lock: `Shared::state`, held to change the heap and never across a callback.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{JoinHandle, ThreadId};
use std::time::Instant;

type Callback = Arc<dyn Fn() + Send + Sync>;

struct Entry {
    /// The armed deadline's generation; a heap item of another generation is stale.
    generation: u64,
    armed: bool,
    callback: Callback,
}

#[derive(Default)]
struct State {
    /// (deadline, timer id, generation), earliest first; stale items are skipped when popped.
    heap: BinaryHeap<Reverse<(Instant, u64, u64)>>,
    timers: HashMap<u64, Entry>,
    next_id: u64,
    /// The timer whose callback runs right now.
    firing: Option<u64>,
    thread: Option<(JoinHandle<()>, ThreadId)>,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the service thread (a new earliest deadline, shutdown) and droppers waiting for a
    /// firing to finish.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One thread serving any number of [`Timer`]s. Dropping the service stops its thread; timers
/// still alive then never fire.
pub struct TimerService {
    shared: Arc<Shared>,
}

impl Default for TimerService {
    fn default() -> Self {
        Self::new()
    }
}

impl TimerService {
    /// A service with no thread yet.
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
            }),
        }
    }

    /// A disarmed timer that runs `callback` on the service thread at each expiry.
    pub fn timer(&self, callback: impl Fn() + Send + Sync + 'static) -> Timer {
        let mut s = self.shared.lock();
        let id = s.next_id;
        s.next_id += 1;
        s.timers.insert(
            id,
            Entry {
                generation: 0,
                armed: false,
                callback: Arc::new(callback),
            },
        );
        Timer {
            shared: Arc::clone(&self.shared),
            id,
        }
    }

    /// Whether the service thread has been started (by the first arm).
    pub fn has_thread(&self) -> bool {
        self.shared.lock().thread.is_some()
    }

    /// Timers armed now.
    pub fn armed(&self) -> usize {
        self.shared
            .lock()
            .timers
            .values()
            .filter(|e| e.armed)
            .count()
    }
}

impl Drop for TimerService {
    fn drop(&mut self) {
        let thread = {
            let mut s = self.shared.lock();
            s.shutdown = true;
            s.thread.take()
        };
        self.shared.changed.notify_all();
        if let Some((handle, id)) = thread {
            if std::thread::current().id() != id {
                let _ = handle.join();
            }
        }
    }
}

fn run(shared: &Shared) {
    // No timer slack: the default 50 µs would be added to every deadline (prctl(2)).
    // SAFETY: PR_SET_TIMERSLACK takes a value and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64) };
    let mut s = shared.lock();
    loop {
        if s.shutdown {
            return;
        }
        let now = Instant::now();
        match s.heap.peek().copied() {
            Some(Reverse((deadline, id, generation))) if deadline <= now => {
                s.heap.pop();
                let Some(entry) = s.timers.get_mut(&id) else {
                    continue;
                };
                if !entry.armed || entry.generation != generation {
                    continue;
                }
                entry.armed = false;
                let callback = Arc::clone(&entry.callback);
                s.firing = Some(id);
                drop(s);
                callback();
                s = shared.lock();
                s.firing = None;
                shared.changed.notify_all();
            }
            Some(Reverse((deadline, ..))) => {
                s = shared
                    .changed
                    .wait_timeout(s, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            None => s = shared.changed.wait(s).unwrap_or_else(|e| e.into_inner()),
        }
    }
}

/// One timer of a [`TimerService`]: armed for one deadline at a time.
pub struct Timer {
    shared: Arc<Shared>,
    id: u64,
}

impl Timer {
    /// Fires once at `deadline` (at once if it passed), replacing any deadline armed before.
    pub fn arm(&self, deadline: Instant) {
        let mut s = self.shared.lock();
        if s.shutdown {
            return;
        }
        let Some(entry) = s.timers.get_mut(&self.id) else {
            return;
        };
        entry.generation += 1;
        entry.armed = true;
        let generation = entry.generation;
        s.heap.push(Reverse((deadline, self.id, generation)));
        // Stale items of disarmed timers would pile up under a guest re-arming in a loop:
        // rebuild the heap from the live ones when they outnumber those twice over.
        if s.heap.len() > 64 && s.heap.len() > 2 * s.timers.len() {
            let timers = &s.timers;
            let live: Vec<_> = s
                .heap
                .iter()
                .copied()
                .filter(|Reverse((_, id, g))| {
                    timers
                        .get(id)
                        .is_some_and(|e| e.armed && e.generation == *g)
                })
                .collect();
            s.heap = live.into();
        }
        if s.thread.is_none() {
            let shared = Arc::clone(&self.shared);
            match std::thread::Builder::new()
                .name("vmirq-xen-timer".into())
                .spawn(move || run(&shared))
            {
                Ok(handle) => {
                    let id = handle.thread().id();
                    s.thread = Some((handle, id));
                }
                Err(e) => tracing::error!("cannot start the Xen timer thread: {e}"),
            }
        }
        drop(s);
        self.shared.changed.notify_all();
    }

    /// Disarms; a firing already running completes.
    pub fn disarm(&self) {
        if let Some(entry) = self.shared.lock().timers.get_mut(&self.id) {
            entry.armed = false;
            entry.generation += 1;
        }
    }

    /// Waits until no firing of this timer runs (at once when called from inside one).
    pub fn wait_idle(&self) {
        let mut s = self.shared.lock();
        let on_service_thread = s
            .thread
            .as_ref()
            .is_some_and(|(_, id)| *id == std::thread::current().id());
        while s.firing == Some(self.id) && !on_service_thread {
            s = self
                .shared
                .changed
                .wait(s)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Whether the timer is armed.
    pub fn is_armed(&self) -> bool {
        self.shared
            .lock()
            .timers
            .get(&self.id)
            .is_some_and(|e| e.armed)
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.shared.lock().timers.remove(&self.id);
        // Nothing fires for this timer once drop returns: wait out a callback in flight,
        // unless this drop runs inside it.
        self.wait_idle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn no_thread_until_the_first_arm_then_one_for_every_timer() {
        let service = TimerService::new();
        let (tx, rx) = mpsc::channel();
        let timers: Vec<Timer> = (0..100)
            .map(|i| {
                let tx = tx.clone();
                service.timer(move || tx.send(i).unwrap())
            })
            .collect();
        assert!(!service.has_thread());
        // Deadlines 10 µs apart from 50 ms on: all armed before the first is due, even on a
        // loaded machine (arming them one by one past their deadlines would fire them in
        // arming order).
        let base = Instant::now() + Duration::from_millis(50);
        for (i, t) in timers.iter().enumerate().rev() {
            t.arm(base + Duration::from_micros(i as u64 * 10));
        }
        assert!(service.has_thread());
        let fired: Vec<i32> = (0..100).map(|_| rx.recv().unwrap()).collect();
        assert_eq!(fired, (0..100).collect::<Vec<_>>(), "in deadline order");
        assert_eq!(service.armed(), 0);
    }

    #[test]
    fn rearming_replaces_the_deadline_and_disarm_cancels() {
        let service = TimerService::new();
        let count = Arc::new(AtomicU32::new(0));
        let (tx, rx) = mpsc::channel();
        let c = Arc::clone(&count);
        let t = service.timer(move || {
            c.fetch_add(1, Ordering::SeqCst);
            tx.send(()).unwrap();
        });
        let far = Instant::now() + Duration::from_secs(3600);
        t.arm(far);
        assert!(t.is_armed());
        t.arm(Instant::now());
        rx.recv().unwrap();
        assert!(!t.is_armed());
        t.arm(far);
        t.disarm();
        assert!(!t.is_armed());
        // A control timer fired later proves the thread ran past the first one's old items.
        let (ctl_tx, ctl_rx) = mpsc::channel();
        let ctl = service.timer(move || ctl_tx.send(()).unwrap());
        ctl.arm(Instant::now());
        ctl_rx.recv().unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 1, "the far deadline fired");
    }

    #[test]
    fn drop_waits_for_its_callback_and_may_run_inside_it() {
        let service = TimerService::new();
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let done = Arc::new(AtomicU32::new(0));
        let d = Arc::clone(&done);
        let t = service.timer(move || {
            entered_tx.send(()).unwrap();
            release_rx.lock().unwrap().recv().unwrap();
            d.store(1, Ordering::SeqCst);
        });
        t.arm(Instant::now());
        entered_rx.recv().unwrap();
        let dropper = std::thread::spawn(move || drop(t));
        release_tx.send(()).unwrap();
        dropper.join().unwrap();
        assert_eq!(done.load(Ordering::SeqCst), 1, "drop returned mid-callback");
        // A timer dropped from inside its own callback does not deadlock.
        let slot: Arc<Mutex<Option<Timer>>> = Arc::default();
        let (tx, rx) = mpsc::channel();
        let s = Arc::clone(&slot);
        let t = service.timer(move || {
            drop(s.lock().unwrap().take());
            tx.send(()).unwrap();
        });
        *slot.lock().unwrap() = Some(t);
        if let Some(t) = slot.lock().unwrap().as_ref() {
            t.arm(Instant::now());
        }
        rx.recv().unwrap();
        assert!(slot.lock().unwrap().is_none());
    }

    #[test]
    fn many_far_timers_leave_the_thread_asleep_and_the_heap_bounded() {
        let service = TimerService::new();
        let far = Instant::now() + Duration::from_secs(3600);
        let timers: Vec<Timer> = (0..1000).map(|_| service.timer(|| {})).collect();
        for _ in 0..10 {
            for t in &timers {
                t.arm(far);
            }
        }
        assert_eq!(service.armed(), 1000);
        let heap = service.shared.lock().heap.len();
        assert!(heap <= 2 * 1000 + 1, "{heap} heap items for 1000 timers");
    }
}
