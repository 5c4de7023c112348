//! vmirq: the interrupt path of a virtual machine, from a device's eventfd to a vector taken
//! by a guest vCPU.
//!
//! The core is hypervisor-agnostic: it reaches a hypervisor only through [`Backend`].
//! See ARCHITECTURE.md at the repository root for the path of an interrupt through the crates.

pub mod backend;
mod delivery;
pub mod interrupts;
pub mod ioapic;
pub mod irqfd;
pub mod line;
pub mod msi;
pub mod msix;
pub mod resample;
pub mod route;
pub mod router;
pub mod sim;
pub mod xen;

pub use backend::{Backend, BackendError, EoiSink, IrqchipMode, KernelRoute};
pub use delivery::EventChannelSink;
pub use interrupts::{Config, Error, Interrupts, Irqfd, Stats};
pub use irqfd::IrqfdPath;
pub use line::{IrqSource, Line};
pub use msi::{DeliveryMode, MsiError, MsiMessage, X86Msi};
pub use route::{Gsi, IrqChip, Route, RouteError, RoutingTable};
pub use router::{GsiHandle, RouteBatch, Router, RouterError};
pub use sim::SimBackend;
