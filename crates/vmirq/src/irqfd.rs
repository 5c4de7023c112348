//! Irqfds: an eventfd bound to a GSI, on the kernel path or vmirq's userspace path.
//!
//! Two contracts, two types (crosvm's `IrqEdgeEvent` / `IrqLevelEvent`): an [`EdgeIrqfd`]
//! injects one interrupt per signal; a [`LevelIrqfd`] asserts a level line that stays high
//! until the guest acknowledges it, then drops it and signals the resamplefd. Both are handles
//! the caller owns: the irqfd is identified by its handle, not by a descriptor number, and
//! dropping the handle unbinds it. The GSI's owner ([`crate::GsiRoute`]) can also disable it:
//! dropping the route disables every irqfd bound to its GSI.
//!
//! One eventfd backs at most one irqfd (KVM: EBUSY). vmirq checks that by the eventfd's
//! identity (the kernel's `eventfd-id`), so a `dup()` of a bound eventfd gets
//! [`crate::Error::IrqfdBusy`] on either path, as KVM answers for its own.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::dispatch::Report;
use crate::interrupts::{Error, Interrupts};
use crate::resample::Resampler;
use crate::route::Gsi;
use crate::router::{lock, GsiLease};

/// Which path delivers an irqfd's events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IrqfdPath {
    /// The hypervisor reads the eventfd and injects (KVM_IRQFD).
    Kernel,
    /// vmirq's dispatcher (its thread, or the VMM's event loop) reads the eventfd and injects
    /// through the core.
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

/// The identity of an eventfd's open file: the same for every descriptor `dup()`ed from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct EventfdId(pub(crate) u64);

/// Reads `fd`'s identity from `/proc/self/fdinfo` (Linux's `eventfd-id`, since 5.19). A kernel
/// without it falls back to the descriptor number, which cannot see through a `dup()`.
pub(crate) fn eventfd_id(fd: RawFd) -> Result<EventfdId, Error> {
    let info = match std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) {
        Ok(info) => info,
        Err(e) if is_fd_exhaustion(&e) => return Err(Error::FdExhausted(e)),
        Err(_) => return Err(Error::BadEventFd),
    };
    let id = info
        .lines()
        .find_map(|l| l.strip_prefix("eventfd-id:"))
        .and_then(|v| v.trim().parse::<u64>().ok());
    Ok(match id {
        Some(id) => EventfdId(id),
        None if info.contains("eventfd-count:") => EventfdId((1 << 63) | fd as u64),
        None => return Err(Error::BadEventFd),
    })
}

/// Whether `fd` is an open descriptor.
pub(crate) fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only queries the descriptor table; no memory is passed.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

fn is_fd_exhaustion(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// vmirq's own duplicate of a caller's eventfd; running out of descriptors is said as such.
pub(crate) fn duplicate(fd: &EventFd) -> Result<EventFd, Error> {
    fd.try_clone().map_err(|e| {
        if is_fd_exhaustion(&e) {
            Error::FdExhausted(e)
        } else {
            Error::BadEventFd
        }
    })
}

/// How a bound irqfd is served.
pub(crate) enum Served {
    /// `KVM_IRQFD`; `edge` unless it has a resamplefd.
    Kernel {
        edge: bool,
    },
    User(u64),
    UserLevel {
        token: u64,
        resampler: Arc<Resampler<EventFd>>,
        member: u64,
    },
}

/// What a bound irqfd holds until it is unbound.
pub(crate) struct Binding {
    pub(crate) owner: Arc<Interrupts>,
    /// vmirq's duplicate of the eventfd: stays valid however the caller's descriptor fares.
    pub(crate) fd: EventFd,
    pub(crate) id: EventfdId,
    pub(crate) served: Served,
    /// Keeps a dynamic GSI from being reused until this irqfd is unbound.
    pub(crate) lease: Option<Arc<GsiLease>>,
}

/// One irqfd, shared by its handle and by the route that owns its GSI (weakly).
pub(crate) struct IrqfdCore {
    pub(crate) gsi: Gsi,
    pub(crate) path: IrqfdPath,
    pub(crate) report: Arc<Report>,
    binding: Mutex<Option<Binding>>,
}

impl IrqfdCore {
    pub(crate) fn new(gsi: Gsi, path: IrqfdPath, report: Arc<Report>, binding: Binding) -> Self {
        Self {
            gsi,
            path,
            report,
            binding: Mutex::new(Some(binding)),
        }
    }

    /// Unbinds (once; later calls return at once). The binding is taken under the lock and
    /// undone outside it: no lock is held across `KVM_IRQFD`.
    pub(crate) fn disable(&self) -> Result<(), Error> {
        let binding = lock(&self.binding).take();
        match binding {
            Some(b) => Arc::clone(&b.owner).unbind(b, self.gsi),
            None => Ok(()),
        }
    }

    fn is_bound(&self) -> bool {
        lock(&self.binding).is_some()
    }

    /// Its snapshot state: a signal waits unserved if vmirq's duplicate of the eventfd still
    /// has a count (the user path while paused; KVM takes kernel irqfds' counts at once).
    fn state(&self, level: bool) -> crate::snapshot::IrqfdState {
        let pending = lock(&self.binding)
            .as_ref()
            .is_some_and(|b| crate::snapshot::has_count(&b.fd));
        crate::snapshot::IrqfdState {
            gsi: self.gsi,
            level,
            pending,
        }
    }
}

/// The handle part both irqfd types share.
struct Handle(Arc<IrqfdCore>);

impl Handle {
    fn take_error(&self) -> Option<Error> {
        lock(&self.0.report.last_error).take()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Err(e) = self.0.disable() {
            tracing::warn!("irqfd on {}: deassign failed: {e}", self.0.gsi);
        }
    }
}

macro_rules! irqfd_handle {
    ($name:ident) => {
        impl $name {
            pub(crate) fn from_core(core: Arc<IrqfdCore>) -> Self {
                Self(Handle(core))
            }

            /// The GSI this irqfd injects on.
            pub fn gsi(&self) -> Gsi {
                self.0 .0.gsi
            }

            /// Which path delivers this irqfd's events.
            pub fn path(&self) -> IrqfdPath {
                self.0 .0.path
            }

            /// Whether it is still bound: false after [`Self::deassign`] or after the owner
            /// of its GSI dropped the route.
            pub fn is_bound(&self) -> bool {
                self.0 .0.is_bound()
            }

            /// Userspace injections from this irqfd that failed (the kernel path reports
            /// nothing: the hypervisor injects). 0 on the kernel path.
            pub fn failures(&self) -> u64 {
                self.0 .0.report.failures.load(Ordering::Relaxed)
            }

            /// The last userspace injection failure, taken (so the next call sees only newer
            /// ones).
            pub fn take_error(&self) -> Option<Error> {
                self.0.take_error()
            }

            /// Unbinds now, reporting a failure to deassign. When this returns, nothing more
            /// is injected from the eventfd. (Dropping the handle does the same and logs a
            /// failure.)
            pub fn deassign(self) -> Result<(), Error> {
                self.0 .0.disable()
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("gsi", &self.gsi())
                    .field("path", &self.path())
                    .finish()
            }
        }
    };
}

/// An edge irqfd: each signal of its eventfd injects one interrupt (signals that arrive
/// before the injection coalesce into it). Dropping it unbinds it.
pub struct EdgeIrqfd(Handle);
irqfd_handle!(EdgeIrqfd);

impl crate::snapshot::Save for EdgeIrqfd {
    fn save(&self) -> crate::snapshot::ObjectState {
        crate::snapshot::ObjectState::Irqfd(self.0 .0.state(false))
    }
}

/// A level irqfd with a resamplefd ("on ack, de-assert and notify"): a signal asserts the
/// line, which stays high until the guest acknowledges it; then the line drops once and every
/// resamplefd of the GSI is signalled. Dropping it unbinds it; the last one of a GSI leaves the
/// line de-asserted.
pub struct LevelIrqfd(Handle);
irqfd_handle!(LevelIrqfd);

impl crate::snapshot::Save for LevelIrqfd {
    fn save(&self) -> crate::snapshot::ObjectState {
        crate::snapshot::ObjectState::Irqfd(self.0 .0.state(true))
    }
}
