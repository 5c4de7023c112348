//! The simulator's irqfd thread never outlives its backend (fuzzing found it detached, and
//! its memory reported leaked, when the thread itself briefly held the last reference while a
//! device fired). Its own test binary: it counts the process's threads.

use std::time::Duration;

use vmirq::{Config, Interrupts, IrqchipMode, Route, SimBackend, X86Msi};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Threads of this process named like the simulator's irqfd thread.
fn irqfd_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == "sim-irqfd")
        .count()
}

#[test]
fn dropping_the_backend_while_its_irqfds_fire_joins_the_irqfd_thread() {
    for round in 0..200 {
        let sim = SimBackend::new(1, IrqchipMode::Kernel);
        let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
        let route = irq
            .new_route(Route::msi(X86Msi::fixed(0, 0x40).encode().unwrap()))
            .unwrap();
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let irqfd = route.assign_irqfd(&fd).unwrap();
        // The new thread names itself once it runs.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while irqfd_threads() != 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: no irqfd thread"
            );
            std::thread::yield_now();
        }
        let writer = {
            let fd = fd.try_clone().unwrap();
            std::thread::spawn(move || {
                let deadline = std::time::Instant::now() + Duration::from_millis(2);
                while std::time::Instant::now() < deadline {
                    let _ = fd.write(1);
                }
            })
        };
        drop((irqfd, route, irq, sim));
        // The drop joined it; the kernel may list a joined thread for a moment longer.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while irqfd_threads() != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the irqfd thread outlived the backend"
            );
            std::thread::yield_now();
        }
        writer.join().unwrap();
    }
}
