//! MSI-X and MSI capability state machines, as the guest programs them.
//!
//! The module owns what a PCI function's interrupt capabilities hold: the MSI-X message control
//! word, vector table and pending bit array ([`MsixTable`]), and the MSI capability's config
//! registers ([`MsiCapability`]). It does no I/O, takes no locks and routes nothing: every guest
//! access reports in a [`VectorEffects`] which vectors became deliverable, stopped being
//! deliverable or changed their message, and the vector manager acts on that (routes, irqfds,
//! pending-bit latching).
//!
//! Semantics follow the PCI Local Bus Specification 3.0 §6.8 and QEMU `hw/pci/msix.c` and
//! `hw/pci/msi.c`; where they leave a choice it is documented at the rule.

pub mod spec;

mod msi;
mod table;

#[cfg(test)]
mod tests;

pub use msi::{MsiCapability, MsiCapabilityState};
pub use table::{MsixTable, MsixTableState, VectorEffects, ENTRY_SIZE, MAX_VECTORS};

mod vectors;
pub use vectors::{
    MsiState, MsiVectors, MsixError, MsixEvent, MsixLayout, MsixState, MsixVectors, VectorState,
    VectorTable, Vectors,
};
