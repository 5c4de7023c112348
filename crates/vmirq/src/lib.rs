//! vmirq: the interrupt path of a virtual machine, from a device's eventfd to a vector taken
//! by a guest vCPU.
//!
//! The core is hypervisor-agnostic: it reaches a hypervisor only through [`Backend`].
//! [`Interrupts`] is the entry point; every interrupt it hands out is an owned object
//! ([`GsiRoute`], [`IoapicPin`], [`EdgeIrqfd`], [`LevelIrqfd`], [`IrqSource`]) whose drop
//! undoes it. See ARCHITECTURE.md at the repository root for the path of an interrupt through
//! the crates.

#![deny(missing_docs)]

pub mod backend;
pub mod bypass;
mod delivery;
mod dispatch;
pub mod group;
mod gsi;
pub mod interrupts;
pub mod ioapic;
pub mod irqfd;
pub mod line;
pub mod msi;
pub mod msix;
pub mod resample;
pub mod route;
mod router;
pub mod sim;
pub mod snapshot;
pub mod xen;

pub use backend::{Backend, BackendError, EoiSink, IrqchipMode, KernelIrqchip, KernelRoute};
pub use delivery::EventChannelSink;
pub use dispatch::Dispatch;
pub use group::{InterruptGroup, InterruptSourceConfig};
pub use gsi::{GsiRoute, IoapicPin};
pub use interrupts::{Config, Error, Interrupts, Restored, Stats, Watch};
pub use irqfd::{EdgeIrqfd, IrqfdPath, LevelIrqfd};
pub use line::{IrqSource, Line};
pub use msi::{DeliveryMode, MsiError, MsiMessage, X86Msi};
pub use route::{Gsi, IrqChip, Route, RouteError, RoutingTable};
pub use router::{RouteBatch, RouterError};
pub use sim::{EoiTiming, SimBackend};
pub use snapshot::{Save, Snapshot, SnapshotError};
