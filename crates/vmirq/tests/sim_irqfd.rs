//! The simulator serves kernel irqfds on its own thread, as KVM does: injection races commits
//! and deassigns, and must never use routes or irqfds that are gone once those calls returned.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmirq::{Config, Interrupts, IrqchipMode, IrqfdPath, Route, SimBackend, X86Msi};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const TIMEOUT: Duration = Duration::from_secs(10);

fn msi(vector: u8) -> Route {
    Route::msi(X86Msi::fixed(0, vector).encode().unwrap())
}

fn vm() -> (Arc<SimBackend>, Arc<Interrupts>) {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
    (sim, irq)
}

/// Waits until `vector` is pending on vCPU 0 without pumping the vCPUs: only the
/// simulator's irqfd thread can have put it there.
fn wait_pending(sim: &SimBackend, vector: u8) {
    let deadline = Instant::now() + TIMEOUT;
    while !sim.is_pending(0, vector) {
        assert!(
            Instant::now() < deadline,
            "{vector:#x} never became pending"
        );
        std::thread::yield_now();
    }
}

/// A thread writing `fd` as fast as it can until dropped; counts its writes.
struct Hammer {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hammer {
    fn new(fd: &EventFd) -> Self {
        let fd = fd.try_clone().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let (s, w) = (Arc::clone(&stop), Arc::clone(&writes));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                fd.write(1).unwrap();
                w.fetch_add(1, Ordering::Relaxed);
            }
        });
        Self {
            stop,
            writes,
            thread: Some(thread),
        }
    }

    /// Waits until `n` more writes happened.
    fn wait_writes(&self, n: u64) {
        let target = self.writes.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + TIMEOUT;
        while self.writes.load(Ordering::Relaxed) < target {
            assert!(Instant::now() < deadline, "the writer stalled");
            std::thread::yield_now();
        }
    }
}

impl Drop for Hammer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.take().map(|t| t.join());
    }
}

#[test]
fn a_kernel_irqfd_is_injected_by_the_hypervisor_thread_without_a_pump() {
    let (sim, irq) = vm();
    let route = irq.new_route(msi(0x40)).unwrap();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let irqfd = route.assign_irqfd(&fd).unwrap();
    assert_eq!(irqfd.path(), IrqfdPath::Kernel);
    assert!(!sim.is_pending(0, 0x40));
    fd.write(1).unwrap();
    wait_pending(&sim, 0x40);
    assert_eq!(sim.run_until_idle(), 1);
    assert_eq!(sim.count(0, 0x40), 1);
}

#[test]
fn no_fire_is_injected_once_the_deassign_returned() {
    let (sim, irq) = vm();
    let control_route = irq.new_route(msi(0x42)).unwrap();
    let control = EventFd::new(EFD_NONBLOCK).unwrap();
    let _control_irqfd = control_route.assign_irqfd(&control).unwrap();
    let route = irq.new_route(msi(0x41)).unwrap();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let hammer = Hammer::new(&fd);
    for round in 0..50 {
        let irqfd = route.assign_irqfd(&fd).unwrap();
        assert_eq!(irqfd.path(), IrqfdPath::Kernel);
        hammer.wait_writes(50);
        wait_pending(&sim, 0x41);
        irqfd.deassign().unwrap();
        // Whatever was injected before the deassign returned is taken now...
        sim.run_until_idle();
        let before = sim.count(0, 0x41);
        assert!(before > round, "round {round}: the irqfd never delivered");
        // ...and nothing after: the writer goes on, the thread is live (the control event
        // arrives), and 0x41 is never injected again.
        hammer.wait_writes(200);
        control.write(1).unwrap();
        wait_pending(&sim, 0x42);
        assert!(
            !sim.is_pending(0, 0x41),
            "round {round}: injected after deassign"
        );
        sim.run_until_idle();
        assert_eq!(sim.count(0, 0x41), before, "round {round}");
        // The fd still holds the writes since the deassign, as KVM leaves them.
        fd.read().unwrap();
    }
}

#[test]
fn no_fire_uses_a_route_once_the_commit_replacing_it_returned() {
    let (sim, irq) = vm();
    let route = irq.new_route(msi(0x50)).unwrap();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let irqfd = route.assign_irqfd(&fd).unwrap();
    assert_eq!(irqfd.path(), IrqfdPath::Kernel);
    let hammer = Hammer::new(&fd);
    let (mut old, mut new) = (0x50u8, 0x51u8);
    for round in 0..50 {
        wait_pending(&sim, old);
        route.set(msi(new)).unwrap();
        // Taken now: whatever the old route delivered before the commit returned.
        sim.run_until_idle();
        let before = sim.count(0, old);
        hammer.wait_writes(50);
        wait_pending(&sim, new);
        assert!(
            !sim.is_pending(0, old),
            "round {round}: the old route after its commit"
        );
        sim.run_until_idle();
        assert_eq!(sim.count(0, old), before, "round {round}");
        std::mem::swap(&mut old, &mut new);
    }
    drop(hammer);
}
