//! The backend trait: the only way the core reaches a hypervisor.
//!
//! A backend owns the "kernel" side of the interrupt path: the routing table the hypervisor
//! sees, direct MSI injection, interrupt lines of an in-kernel irqchip, and kernel irqfds.
//! It reports guest EOIs of level vectors back to the core through an [`EoiSink`].

use std::io;
use std::sync::Weak;

use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::msi::MsiMessage;
use crate::route::{Gsi, Route};

/// Where the interrupt controllers live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum IrqchipMode {
    /// LAPICs, IOAPIC and PICs in the hypervisor (KVM_CREATE_IRQCHIP).
    Kernel,
    /// LAPICs in the hypervisor, IOAPIC in userspace (KVM_CAP_SPLIT_IRQCHIP). GSIs
    /// `0..ioapic_pins` are reserved for the pins: their kernel routes are the MSIs the
    /// userspace IOAPIC's redirection entries produce.
    Split {
        /// Pins of the userspace IOAPIC (and GSIs reserved for them).
        ioapic_pins: u32,
    },
}

impl IrqchipMode {
    /// Pins of the IOAPIC in this mode (the kernel's has 24).
    pub fn ioapic_pins(&self) -> u32 {
        match *self {
            IrqchipMode::Kernel => crate::route::DEFAULT_IOAPIC_PINS,
            IrqchipMode::Split { ioapic_pins } => ioapic_pins,
        }
    }
}

/// A route in the form the hypervisor is given: the core has already resolved everything the
/// hypervisor cannot do itself (userspace IOAPIC pins, emulated Xen ports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelRoute {
    /// The GSI.
    pub gsi: Gsi,
    /// Where the hypervisor sends it.
    pub route: Route,
}

/// Errors a backend reports.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The eventfd is not a valid open file descriptor.
    #[error("the eventfd is not a valid open file descriptor")]
    BadEventFd,
    /// The hypervisor refused an operation.
    #[error("the hypervisor refused {op}: {source}")]
    Hypervisor {
        /// The operation (the ioctl's name).
        op: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The eventfd already backs an irqfd (KVM: EBUSY).
    #[error("the eventfd is already bound to an irqfd")]
    IrqfdBusy,
    /// No irqfd matches the (eventfd, GSI) pair.
    #[error("no irqfd is assigned for that eventfd and {0}")]
    IrqfdNotFound(Gsi),
    /// The backend cannot do this in its configuration.
    #[error("this backend cannot {0}")]
    Unsupported(&'static str),
    /// Saved in-kernel irqchip state this backend cannot load (named in the message).
    #[error("bad in-kernel irqchip state: {0}")]
    BadIrqchipState(String),
}

impl BackendError {
    /// The same error, for a second party to hear of it (`io::Error` is not `Clone`).
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            BackendError::BadEventFd => BackendError::BadEventFd,
            BackendError::Hypervisor { op, source } => BackendError::Hypervisor {
                op,
                source: match source.raw_os_error() {
                    Some(errno) => io::Error::from_raw_os_error(errno),
                    None => io::Error::new(source.kind(), source.to_string()),
                },
            },
            BackendError::IrqfdBusy => BackendError::IrqfdBusy,
            BackendError::IrqfdNotFound(g) => BackendError::IrqfdNotFound(*g),
            BackendError::Unsupported(what) => BackendError::Unsupported(what),
            BackendError::BadIrqchipState(why) => BackendError::BadIrqchipState(why.clone()),
        }
    }
}

/// Receives guest EOIs of level-triggered vectors (the IOAPIC's EOI broadcast).
pub trait EoiSink: Send + Sync {
    /// The guest EOI'd `vector`, a level vector.
    fn eoi(&self, vector: u8);
}

/// What the core needs from a hypervisor. Implementations: `vmirq-kvm` and
/// [`crate::sim::SimBackend`].
pub trait Backend: Send + Sync {
    /// Short name for reports ("kvm", "sim").
    fn name(&self) -> &'static str;

    /// Where the irqchip lives; fixed for the backend's lifetime.
    fn irqchip_mode(&self) -> IrqchipMode;

    /// Whether the hypervisor can deliver `route` by itself (and so a kernel irqfd may serve a
    /// GSI whose routes are all such).
    fn delivers(&self, route: &Route) -> bool;

    /// Replaces the hypervisor's whole routing table in one operation.
    fn commit_routes(&self, routes: &[KernelRoute]) -> Result<(), BackendError>;

    /// Injects one MSI now.
    fn signal_msi(&self, msg: MsiMessage, devid: Option<u32>) -> Result<(), BackendError>;

    /// Drives an in-kernel irqchip line (KVM_IRQ_LINE). Only in [`IrqchipMode::Kernel`].
    fn set_line(&self, gsi: Gsi, level: bool) -> Result<(), BackendError>;

    /// Whether kernel irqfds can carry a resamplefd on this backend.
    fn supports_resample(&self) -> bool;

    /// Binds `fd` to `gsi` in the hypervisor: each signal injects the GSI's kernel routes.
    /// With `resample`, the line is level: asserted by a signal, de-asserted on EOI and then
    /// `resample` is signalled. An event counted before assign is injected at assign.
    fn assign_irqfd(
        &self,
        fd: &EventFd,
        gsi: Gsi,
        resample: Option<&EventFd>,
    ) -> Result<(), BackendError>;

    /// Unbinds `fd` from `gsi`; after return nothing more is injected from it.
    fn deassign_irqfd(&self, fd: &EventFd, gsi: Gsi) -> Result<(), BackendError>;

    /// Where to report EOIs of level vectors that the hypervisor hands to userspace.
    fn set_eoi_sink(&self, sink: Weak<dyn EoiSink>);

    /// The hypervisor's own irqchip state (the in-kernel IOAPIC and PICs:
    /// `KVM_GET_IRQCHIP`), for a snapshot; `None` when it keeps none (a split irqchip). The
    /// LAPICs are the vCPUs' state, saved by the VMM.
    fn save_irqchip(&self) -> Result<Option<KernelIrqchip>, BackendError> {
        Ok(None)
    }

    /// Loads what [`Backend::save_irqchip`] gave (`KVM_SET_IRQCHIP`), after the routes are
    /// committed (they are not part of it).
    fn restore_irqchip(&self, _state: &KernelIrqchip) -> Result<(), BackendError> {
        Err(BackendError::Unsupported("restore an in-kernel irqchip"))
    }
}

/// A hypervisor's in-kernel irqchip state, opaque to the core: which backend wrote it, and
/// one blob per chip (KVM: `KVM_IRQCHIP_PIC_MASTER`, `_PIC_SLAVE`, `_IOAPIC`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelIrqchip {
    /// [`Backend::name`] of the backend that saved it; only that kind restores it.
    pub backend: String,
    /// (chip id, its state as the backend encodes it).
    pub chips: Vec<(u32, Vec<u8>)>,
}
