//! Edge irqfds: an eventfd signal becomes one interrupt on a GSI.
//!
//! Two paths behind one API. When the hypervisor can deliver every route of the GSI itself,
//! the eventfd is registered as a kernel irqfd ([`IrqfdPath::Kernel`]); otherwise one
//! userspace [`Dispatcher`] thread per VM waits on all such eventfds with a single epoll and
//! injects through the core ([`IrqfdPath::User`]). The thread starts with the first userspace
//! irqfd and sleeps in `epoll_wait` while nothing fires: idle irqfds cost no CPU.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::resample::Resampler;
use crate::route::Gsi;
use crate::router::lock;

/// Which path delivers an irqfd's events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IrqfdPath {
    /// The hypervisor reads the eventfd and injects (KVM_IRQFD).
    Kernel,
    /// vmirq's dispatcher thread reads the eventfd and injects through the core.
    User,
}

impl std::fmt::Display for IrqfdPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IrqfdPath::Kernel => "kernel",
            IrqfdPath::User => "user",
        })
    }
}

/// What the dispatcher does when an irqfd's eventfd fires. Implemented by the core's
/// delivery state.
pub(crate) trait Inject: Send + Sync {
    /// An edge irqfd fired: deliver one interrupt on `gsi`.
    fn inject_from_irqfd(&self, gsi: Gsi);
    /// A level irqfd fired: assert its GSI's resampled input until the guest's EOI.
    fn assert_resampled(&self, resampler: &Resampler<EventFd>);
}

/// What a userspace irqfd does when it fires.
pub(crate) enum Action {
    Edge(Gsi),
    Level(Arc<Resampler<EventFd>>),
    /// An internal consumer of an eventfd (e.g. a Xen callback GSI's resamplefd).
    Callback(Arc<dyn Fn() + Send + Sync>),
}

/// One userspace irqfd as the dispatcher sees it.
pub(crate) struct UserIrqfd {
    fd: EventFd,
    action: Action,
    /// Held while an event is read and acted on. Deassign sets `dead` and then takes it, so
    /// when deassign returns no action is in flight and none will start. (On the dispatcher
    /// thread itself — an action tearing down an irqfd — the in-flight action is the caller,
    /// so setting `dead` suffices and waiting would deadlock.)
    busy: Mutex<()>,
    dead: std::sync::atomic::AtomicBool,
}

/// The per-VM userspace irqfd thread. Lock order: `entries`, then an entry's `busy`.
pub(crate) struct Dispatcher {
    epoll: Epoll,
    entries: Mutex<HashMap<u64, Arc<UserIrqfd>>>,
    next_token: AtomicU64,
    stop: EventFd,
    thread: Mutex<Option<JoinHandle<()>>>,
    thread_id: std::sync::OnceLock<std::thread::ThreadId>,
}

const STOP_TOKEN: u64 = 0;

impl Dispatcher {
    pub(crate) fn new() -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        Ok(Self {
            epoll,
            entries: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(1),
            stop,
            thread: Mutex::new(None),
            thread_id: std::sync::OnceLock::new(),
        })
    }

    /// Adds `fd` (the dispatcher's own duplicate, set non-blocking) for `gsi`; starts the
    /// thread on first use. Level-triggered epoll: a count already in the eventfd fires at once.
    pub(crate) fn add(
        self: &Arc<Self>,
        fd: EventFd,
        action: Action,
        inject: &Arc<dyn Inject>,
    ) -> std::io::Result<u64> {
        set_nonblocking(fd.as_raw_fd())?;
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let raw = fd.as_raw_fd();
        let entry = Arc::new(UserIrqfd {
            fd,
            action,
            busy: Mutex::new(()),
            dead: std::sync::atomic::AtomicBool::new(false),
        });
        lock(&self.entries).insert(token, entry);
        self.ensure_thread(inject)?;
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            raw,
            EpollEvent::new(EventSet::IN, token),
        ) {
            lock(&self.entries).remove(&token);
            return Err(e);
        }
        Ok(token)
    }

    /// Removes an irqfd. When this returns, its eventfd will not be read or injected again.
    pub(crate) fn remove(&self, token: u64) {
        let Some(entry) = lock(&self.entries).remove(&token) else {
            return;
        };
        entry.dead.store(true, Ordering::Release);
        let _in_flight_done = (!self.on_dispatcher_thread()).then(|| lock(&entry.busy));
        // The fd may already be gone from the set if the entry was never added; ignore.
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            entry.fd.as_raw_fd(),
            EpollEvent::default(),
        );
    }

    /// Number of userspace irqfds.
    pub(crate) fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    fn ensure_thread(self: &Arc<Self>, inject: &Arc<dyn Inject>) -> std::io::Result<()> {
        let mut thread = lock(&self.thread);
        if thread.is_none() {
            let me = Arc::clone(self);
            let inject = Arc::clone(inject);
            let handle = std::thread::Builder::new()
                .name("vmirq-dispatch".into())
                .spawn(move || me.run(&*inject))?;
            let _ = self.thread_id.set(handle.thread().id());
            *thread = Some(handle);
        }
        Ok(())
    }

    fn run(&self, inject: &dyn Inject) {
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
                let token = ev.data();
                if token == STOP_TOKEN {
                    return;
                }
                let entry = lock(&self.entries).get(&token).cloned();
                if let Some(entry) = entry {
                    let _busy = lock(&entry.busy);
                    // A read that finds the counter empty (EAGAIN) was a stale readiness.
                    if !entry.dead.load(Ordering::Acquire) && entry.fd.read().is_ok() {
                        match &entry.action {
                            Action::Edge(gsi) => inject.inject_from_irqfd(*gsi),
                            Action::Level(resampler) => inject.assert_resampled(resampler),
                            Action::Callback(f) => f(),
                        }
                    }
                }
            }
        }
    }

    fn on_dispatcher_thread(&self) -> bool {
        self.thread_id.get() == Some(&std::thread::current().id())
    }

    /// Stops and joins the thread (detaches it when called from the thread itself, as when
    /// an action drops the last reference to the VM's interrupts).
    pub(crate) fn shutdown(&self) {
        let _ = self.stop.write(1);
        let handle = lock(&self.thread).take();
        if let Some(t) = handle {
            if !self.on_dispatcher_thread() {
                let _ = t.join();
            }
        }
    }
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

/// Whether `fd` is an open descriptor.
pub(crate) fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only queries the descriptor table; no memory is passed.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}
