//! Ownership on real KVM: after the last handle of every kind drops, the backend and the VM
//! (its `VmFd`) are freed. The same check on the simulated backend is in
//! `crates/vmirq/tests/router.rs`; the GSI-reuse regression runs on every machine in edge.rs.

use std::sync::Arc;

use vmirq::{Config, Interrupts, IrqfdPath, Route, X86Msi};
use vmirq_guest::machine::{kvm_test_gate, Mode};
use vmirq_kvm::{KvmVm, KvmVmConfig};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fn dropping_every_handle_frees_the_vm(mode: Mode) {
    if !kvm_test_gate(&format!("dropping_every_handle_frees_the_vm::{mode:?}")) {
        return;
    }
    let vm = KvmVm::new(KvmVmConfig {
        vcpus: 1,
        mem_size: 1 << 20,
        irqchip: mode.irqchip(),
        halt_poll_ns: None,
    })
    .unwrap();
    let backend = vm.backend();
    let (weak_backend, weak_vm) = (Arc::downgrade(&backend), Arc::downgrade(backend.vm()));
    let irq = Interrupts::new(backend, Config::default()).unwrap();
    // Every kind of handle, each used once.
    let pin = irq.pin(5).unwrap();
    let source = pin.source().unwrap();
    source.assert();
    source.deassert();
    pin.inject().unwrap();
    let line = pin.line().unwrap();
    let msg = X86Msi::fixed(0, 0x40).encode().unwrap();
    let route = irq.new_route(Route::msi(msg)).unwrap();
    let (kfd, ufd, pfd) = (
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    );
    let kernel = route.assign_irqfd(&kfd).unwrap();
    let user = route.assign_irqfd_on(&ufd, Some(IrqfdPath::User)).unwrap();
    let on_pin = pin.assign_irqfd(&pfd).unwrap();
    for fd in [&kfd, &ufd, &pfd] {
        fd.write(1).unwrap();
    }
    drop((source, line, kernel, user, on_pin, route, pin, irq, vm));
    assert!(
        weak_backend.upgrade().is_none(),
        "{mode:?}: the backend outlived every handle"
    );
    assert!(
        weak_vm.upgrade().is_none(),
        "{mode:?}: the VM fd outlived every handle"
    );
}

#[test]
fn dropping_every_handle_frees_the_vm_kernel_irqchip() {
    dropping_every_handle_frees_the_vm(Mode::Kernel);
}

#[test]
fn dropping_every_handle_frees_the_vm_split_irqchip() {
    dropping_every_handle_frees_the_vm(Mode::Split);
}
