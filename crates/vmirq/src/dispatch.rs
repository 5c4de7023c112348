//! The userspace irqfd dispatcher: one epoll set per VM over every eventfd vmirq serves in
//! userspace (user-path irqfds, internal watches, the IOAPIC's storm-guard timer).
//!
//! Two ways to run it ([`Dispatch`]): vmirq's own thread (the default; started with the first
//! entry, asleep in `epoll_wait` while nothing fires, so idle irqfds cost no CPU), or the
//! VMM's event loop, which polls one descriptor ([`crate::Interrupts::event_fd`]) and calls
//! [`crate::Interrupts::service`], or serves single irqfds by token (crosvm's
//! `service_irq_event` shape). In event-loop mode vmirq owns no thread at all.
//!
//! Pausing ([`Dispatcher::pause`]) takes every entry out of the epoll set: nothing is read or
//! acted on and nothing wakes the thread or the VMM's loop, while the counts wait in the
//! eventfds; [`Dispatcher::resume`] puts them back (level-triggered: a count fires at once).
//!
//! Locks, in order: `membership` (which entries are in the epoll set: add, pause, resume),
//! then `entries` (the token map, a leaf taken briefly); an entry's `busy` is held while
//! its event is read and acted on, and is never waited on with `membership` held (an action
//! may add an entry). Removal marks the entry dead, then waits on `busy`, so when
//! it returns nothing more fires; an action that removes an entry — its own or another — from
//! inside the dispatcher (any thread that is running actions) does not wait, since the only
//! action in flight may be the caller. Actions take no lock a remover may hold except the
//! IOAPIC's and a resampler's, which no one holds while removing an irqfd.

use std::cell::Cell;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::resample::Resampler;
use crate::route::Gsi;
use crate::router::lock;

/// Who runs the userspace irqfds' actions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Dispatch {
    /// One vmirq thread per VM, started with the first userspace irqfd.
    #[default]
    Thread,
    /// The VMM's event loop: it waits on [`crate::Interrupts::event_fd`] and calls
    /// [`crate::Interrupts::service`]; vmirq starts no thread.
    EventLoop,
}

/// What a userspace irqfd's owner hears about its injections.
#[derive(Default)]
pub(crate) struct Report {
    pub(crate) failures: AtomicU64,
    pub(crate) last_error: Mutex<Option<crate::Error>>,
}

impl Report {
    pub(crate) fn fail(&self, e: crate::Error) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_error) = Some(e);
    }
}

/// What the dispatcher calls to deliver. Implemented by the core's delivery state.
pub(crate) trait Inject: Send + Sync {
    /// An edge irqfd fired: deliver one interrupt on `gsi`.
    fn inject_edge(&self, gsi: Gsi) -> Result<(), crate::Error>;
    /// A level irqfd fired: assert its GSI's resampled input until the guest's EOI.
    fn assert_resampled(&self, resampler: &Resampler<EventFd>);
}

/// What a userspace entry does when its eventfd fires.
pub(crate) enum Action {
    Edge(Gsi, Arc<Report>),
    Level(Arc<Resampler<EventFd>>),
    /// An internal consumer of an eventfd (a Xen callback GSI's resamplefd, the storm timer).
    Callback(Arc<dyn Fn() + Send + Sync>),
}

/// One entry as the dispatcher sees it. `fd` is read (its count consumed) before the action.
struct Entry {
    fd: Box<dyn AsRawFd + Send + Sync>,
    read: fn(RawFd) -> bool,
    action: Action,
    busy: Mutex<()>,
    dead: AtomicBool,
}

thread_local! {
    /// The dispatcher whose actions this thread is running now (its address), if any.
    static RUNNING: Cell<usize> = const { Cell::new(0) };
}

/// The per-VM dispatcher.
pub(crate) struct Dispatcher {
    mode: Dispatch,
    epoll: Epoll,
    entries: Mutex<HashMap<u64, Arc<Entry>>>,
    next_token: AtomicU64,
    stop: EventFd,
    thread: Mutex<Option<JoinHandle<()>>>,
    inject: Arc<dyn Inject>,
    /// Held while entries join or leave the epoll set as a whole (add, pause, resume).
    membership: Mutex<()>,
    /// Set while paused; [`Dispatcher::serve`] checks it under the entry's `busy`.
    paused: AtomicBool,
}

const STOP_TOKEN: u64 = 0;

impl Dispatcher {
    pub(crate) fn new(mode: Dispatch, inject: Arc<dyn Inject>) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        Ok(Self {
            mode,
            epoll,
            entries: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(1),
            stop,
            thread: Mutex::new(None),
            inject,
            membership: Mutex::new(()),
            paused: AtomicBool::new(false),
        })
    }

    pub(crate) fn mode(&self) -> Dispatch {
        self.mode
    }

    /// Adds an eventfd (vmirq's own duplicate, set non-blocking here); starts the thread on
    /// first use in thread mode. Level-triggered epoll: a count already there fires at once.
    pub(crate) fn add(self: &Arc<Self>, fd: EventFd, action: Action) -> std::io::Result<u64> {
        set_nonblocking(fd.as_raw_fd())?;
        self.add_entry(Box::new(fd), read_eventfd, action)
    }

    /// Adds any readable descriptor with its own way to consume readiness.
    pub(crate) fn add_entry(
        self: &Arc<Self>,
        fd: Box<dyn AsRawFd + Send + Sync>,
        read: fn(RawFd) -> bool,
        action: Action,
    ) -> std::io::Result<u64> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let raw = fd.as_raw_fd();
        let entry = Arc::new(Entry {
            fd,
            read,
            action,
            busy: Mutex::new(()),
            dead: AtomicBool::new(false),
        });
        let _membership = lock(&self.membership);
        lock(&self.entries).insert(token, entry);
        let paused = self.paused.load(Ordering::Acquire);
        if let Err(e) = self.ensure_thread().and_then(|()| {
            if paused {
                return Ok(()); // joins the epoll set at resume
            }
            self.epoll.ctl(
                ControlOperation::Add,
                raw,
                EpollEvent::new(EventSet::IN, token),
            )
        }) {
            lock(&self.entries).remove(&token);
            return Err(e);
        }
        Ok(token)
    }

    /// Stops serving: every entry leaves the epoll set, and when this returns no action is
    /// running or will run until [`Dispatcher::resume`]. Signals meanwhile stay in the
    /// eventfds. Idempotent.
    pub(crate) fn pause(&self) {
        let entries: Vec<Arc<Entry>> = {
            let _membership = lock(&self.membership);
            if self.paused.swap(true, Ordering::AcqRel) {
                return;
            }
            let entries: Vec<Arc<Entry>> = lock(&self.entries).values().cloned().collect();
            for e in &entries {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    e.fd.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            entries
        };
        // An action already running ends before pause returns; one that starts later sees
        // `paused` under `busy` and does nothing. (From inside an action: only the others.)
        if !self.running_here() {
            for e in &entries {
                drop(lock(&e.busy));
            }
        }
    }

    /// Serves again: every entry rejoins the epoll set; counts that arrived while paused
    /// fire at once. Idempotent.
    pub(crate) fn resume(&self) -> std::io::Result<()> {
        let _membership = lock(&self.membership);
        if !self.paused.load(Ordering::Acquire) {
            return Ok(());
        }
        let entries: Vec<(u64, RawFd)> = lock(&self.entries)
            .iter()
            .map(|(t, e)| (*t, e.fd.as_raw_fd()))
            .collect();
        self.paused.store(false, Ordering::Release);
        for (token, raw) in entries {
            let added = self.epoll.ctl(
                ControlOperation::Add,
                raw,
                EpollEvent::new(EventSet::IN, token),
            );
            match added {
                Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether [`Dispatcher::pause`] is in force.
    pub(crate) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Removes an entry. When this returns, its eventfd will not be read or acted on again.
    pub(crate) fn remove(&self, token: u64) {
        let Some(entry) = lock(&self.entries).remove(&token) else {
            return;
        };
        entry.dead.store(true, Ordering::Release);
        let _in_flight_done = (!self.running_here()).then(|| lock(&entry.busy));
        // The fd may already be gone from the set if the entry was never added; ignore.
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            entry.fd.as_raw_fd(),
            EpollEvent::default(),
        );
    }

    /// Number of entries (userspace irqfds and watches).
    pub(crate) fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    /// Threads this dispatcher runs now (0 or 1).
    pub(crate) fn threads(&self) -> usize {
        usize::from(lock(&self.thread).is_some())
    }

    /// The epoll descriptor: readable while any entry has an event.
    pub(crate) fn event_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the epoll fd is owned by `self.epoll` and outlives the borrow of `self`.
        unsafe { BorrowedFd::borrow_raw(self.epoll.as_raw_fd()) }
    }

    /// Every entry's (token, descriptor), for an event loop that polls them one by one.
    pub(crate) fn tokens(&self) -> Vec<(u64, RawFd)> {
        lock(&self.entries)
            .iter()
            .map(|(t, e)| (*t, e.fd.as_raw_fd()))
            .collect()
    }

    /// Serves whatever is ready now, without blocking; returns how many events were handled.
    pub(crate) fn service(&self) -> std::io::Result<usize> {
        let mut events = vec![EpollEvent::default(); 64];
        let mut handled = 0;
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..n] {
                if ev.data() != STOP_TOKEN {
                    handled += usize::from(self.serve(ev.data()));
                }
            }
            if n < events.len() {
                return Ok(handled);
            }
        }
    }

    /// Serves one entry if its eventfd has a count; returns whether it acted.
    pub(crate) fn serve(&self, token: u64) -> bool {
        let Some(entry) = lock(&self.entries).get(&token).cloned() else {
            return false;
        };
        let _busy = lock(&entry.busy);
        // A read that finds the counter empty (EAGAIN) was a stale readiness.
        if entry.dead.load(Ordering::Acquire)
            || self.paused.load(Ordering::Acquire)
            || !(entry.read)(entry.fd.as_raw_fd())
        {
            return false;
        }
        let outer = RUNNING.with(|r| r.replace(self as *const Self as usize));
        match &entry.action {
            Action::Edge(gsi, report) => {
                if let Err(e) = self.inject.inject_edge(*gsi) {
                    tracing::warn!("irqfd on {gsi}: injection failed: {e}");
                    report.fail(e);
                }
            }
            Action::Level(resampler) => self.inject.assert_resampled(resampler),
            Action::Callback(f) => f(),
        }
        RUNNING.with(|r| r.set(outer));
        true
    }

    fn ensure_thread(self: &Arc<Self>) -> std::io::Result<()> {
        if self.mode == Dispatch::EventLoop {
            return Ok(());
        }
        let mut thread = lock(&self.thread);
        if thread.is_none() {
            let me = Arc::clone(self);
            let handle = std::thread::Builder::new()
                .name("vmirq-dispatch".into())
                .spawn(move || me.run())?;
            *thread = Some(handle);
        }
        Ok(())
    }

    fn run(&self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("vmirq dispatcher: epoll_wait failed, stopping: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                if ev.data() == STOP_TOKEN {
                    return;
                }
                self.serve(ev.data());
            }
        }
    }

    fn running_here(&self) -> bool {
        RUNNING.with(Cell::get) == self as *const Self as usize
    }

    /// Stops and joins the thread (detaches it when called from the thread itself, as when
    /// an action drops the last reference to the VM's interrupts).
    pub(crate) fn shutdown(&self) {
        let _ = self.stop.write(1);
        let handle = lock(&self.thread).take();
        if let Some(t) = handle {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// Consumes an eventfd's count; false if it had none.
fn read_eventfd(fd: RawFd) -> bool {
    let mut count = 0u64;
    // SAFETY: reads 8 bytes into a local u64 from a descriptor the entry owns.
    let n = unsafe { libc::read(fd, (&mut count as *mut u64).cast(), 8) };
    n == 8
}

fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above; only the O_NONBLOCK status flag changes.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
