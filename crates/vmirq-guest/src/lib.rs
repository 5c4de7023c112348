//! Real-mode test guests for vmirq, assembled in Rust, and the machines that run them: real
//! KVM ([`machine::KvmMachine`]) or the simulated backend ([`machine::SimMachine`]) behind one
//! [`machine::Machine`] trait, so every behaviour test is written once and runs on both.

pub mod layout;
pub mod machine;
pub mod migration;
pub mod program;
pub mod xen;
