//! Pausing the userspace path (`Interrupts::pause` / `resume`), written once and run on the
//! simulated backend and real KVM, each with the in-kernel and the split irqchip.

use std::time::Duration;

use vmirq::{IrqfdPath, MsiMessage, Route, X86Msi};
use vmirq_guest::machine::{Machine, MachineConfig, Mode};
use vmirq_guest::on_every_machine;
use vmm_sys_util::eventfd::EventFd;

const WAIT: Duration = Duration::from_secs(5);
const VECTOR: u8 = 0x50;
const KERNEL_VECTOR: u8 = 0x51;

fn one_vcpu(mode: Mode) -> MachineConfig {
    MachineConfig::new(1, mode.irqchip())
}

fn msi(vector: u8) -> MsiMessage {
    X86Msi::fixed(0, vector).encode().unwrap()
}

/// Whether `fd` still holds a count nobody read.
fn has_count(fd: &EventFd) -> bool {
    let mut p = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(fd),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one descriptor we own, described by a local pollfd, without waiting.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLIN != 0
}

on_every_machine!(
    signals_while_paused_wait_in_the_eventfd_and_are_delivered_once_at_resume,
    one_vcpu,
    |m: &dyn Machine, _| {
        let irq = m.interrupts();
        let user_route = irq.new_route(Route::msi(msi(VECTOR))).unwrap();
        let user_fd = EventFd::new(0).unwrap();
        let _user = user_route
            .assign_irqfd_on(&user_fd, Some(IrqfdPath::User))
            .unwrap();
        let kernel_route = irq.new_route(Route::msi(msi(KERNEL_VECTOR))).unwrap();
        let kernel_fd = EventFd::new(0).unwrap();
        let _kernel = kernel_route
            .assign_irqfd_on(&kernel_fd, Some(IrqfdPath::Kernel))
            .unwrap();
        // Live before the pause: one trigger, one interrupt.
        user_fd.write(1).unwrap();
        m.wait_isr(Some(0), VECTOR, WAIT)
            .expect("the userspace irqfd never delivered");
        m.control(0);
        let before = m.count(0, VECTOR);
        // The dispatcher counts an injection after the hypervisor call returns, which may be
        // after the guest took it: wait for the count (seen in CI: 0 read, then 1).
        let stat = || {
            irq.stats()
                .user_injections
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        assert!(
            m.wait_until(WAIT, &mut || stat() >= 1),
            "the injection was not counted"
        );
        let injected = stat();

        irq.pause();
        assert!(irq.is_paused());
        user_fd.write(1).unwrap();
        user_fd.write(1).unwrap();
        // Kernel irqfds stay assigned: the kernel path delivers while the user path waits.
        m.log().clear();
        kernel_fd.write(1).unwrap();
        m.wait_isr(Some(0), KERNEL_VECTOR, WAIT)
            .expect("a kernel irqfd stopped delivering while paused");
        m.control(0);
        assert_eq!(m.count(0, VECTOR), before, "delivered while paused");
        assert!(has_count(&user_fd), "the paused dispatcher read a signal");
        assert_eq!(
            irq.stats()
                .user_injections
                .load(std::sync::atomic::Ordering::Relaxed),
            injected
        );

        m.log().clear();
        irq.resume().unwrap();
        assert!(!irq.is_paused());
        m.wait_isr(Some(0), VECTOR, WAIT)
            .expect("the signals sent while paused were lost");
        m.control(0);
        // Two signals on one eventfd while nobody read it: one count, one edge.
        assert_eq!(m.count(0, VECTOR), before + 1);
        assert!(!has_count(&user_fd));
    }
);

on_every_machine!(
    an_irqfd_assigned_while_paused_is_served_from_resume,
    one_vcpu,
    |m: &dyn Machine, _| {
        let irq = m.interrupts();
        irq.pause();
        irq.pause(); // idempotent
        let route = irq.new_route(Route::msi(msi(VECTOR))).unwrap();
        let fd = EventFd::new(0).unwrap();
        let _irqfd = route.assign_irqfd_on(&fd, Some(IrqfdPath::User)).unwrap();
        fd.write(1).unwrap();
        m.control(0);
        assert_eq!(m.count(0, VECTOR), 0, "delivered while paused");
        assert!(has_count(&fd));
        m.log().clear();
        irq.resume().unwrap();
        irq.resume().unwrap(); // idempotent
        m.wait_isr(Some(0), VECTOR, WAIT)
            .expect("the signal sent while paused was lost");
        m.control(0);
        assert_eq!(m.count(0, VECTOR), 1);
    }
);
