//! KVM backend for vmirq, and a minimal KVM VM to run interrupt test guests on.
//!
//! [`KvmBackend`] implements [`vmirq::Backend`] with KVM's routing table, `KVM_SIGNAL_MSI`,
//! `KVM_IRQ_LINE` and `KVM_IRQFD`, for an in-kernel or a split irqchip. [`KvmVm`] creates the
//! VM, guest RAM at GPA 0 and vCPUs that start in real mode, and runs one thread per vCPU,
//! handing port I/O and MMIO exits to a [`VcpuExitHandler`] and IOAPIC EOI exits to the
//! backend's [`vmirq::EoiSink`].
//!
//! A VMM that owns its VM uses [`KvmBackend::new`] directly (see `examples/minimal-vmm`);
//! [`KvmVm`] is the test guests' runner, one such user.

#![deny(missing_docs)]

mod backend;
mod error;
mod vcpu;
mod vm;

pub use backend::KvmBackend;
pub use error::KvmError;
pub use vcpu::VcpuExitHandler;
pub use vm::{set_real_mode, KvmVm, KvmVmConfig, RealModeBoot, VcpuState};
pub use vmirq::IrqchipMode;

/// For KVM tests: says on stderr (past the test harness's output capture, so CI can count it)
/// whether test `name` runs here, and returns false when it must skip for lack of /dev/kvm.
pub fn kvm_test_gate(name: &str) -> bool {
    use std::io::Write;
    let available = KvmVm::is_available();
    let verdict = if available {
        "ran"
    } else {
        "SKIPPED (no /dev/kvm)"
    };
    // One write of the whole line, so it never interleaves with the harness's output.
    let line = format!("kvm test {name}: {verdict}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    available
}
