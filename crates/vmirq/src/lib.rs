//! vmirq: the interrupt path of a virtual machine, from a device's eventfd to a vector taken
//! by a guest vCPU.
//!
//! The core is hypervisor-agnostic: it reaches a hypervisor only through [`Backend`].
//! See ARCHITECTURE.md at the repository root for the path of an interrupt through the crates.

pub mod backend;
pub mod msi;
pub mod route;

pub use backend::{Backend, BackendError, EoiSink, IrqchipMode, KernelRoute};
pub use msi::{DeliveryMode, MsiError, MsiMessage, X86Msi};
pub use route::{Gsi, IrqChip, Route, RouteError, RoutingTable};
