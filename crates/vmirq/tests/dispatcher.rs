//! The userspace dispatcher's teardown rules, including teardown from inside its own thread.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmirq::{Config, Interrupts, IrqchipMode, SimBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[test]
fn a_callback_may_unwatch_itself_and_drop_the_last_reference_to_the_vm() {
    let sim = SimBackend::new(1, IrqchipMode::Split { ioapic_pins: 24 });
    let irq = Interrupts::new(sim, Config::default()).unwrap();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let slot: Arc<Mutex<Option<Arc<Interrupts>>>> = Arc::new(Mutex::new(Some(irq.clone())));
    let token: Arc<Mutex<Option<u64>>> = Arc::default();
    let done = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let (s, t, d) = (slot.clone(), token.clone(), done.clone());
    let id = irq
        .watch(
            &fd,
            Arc::new(move || {
                // Runs on the dispatcher thread: unwatch itself, then drop the VM.
                if let Some(vm) = s.lock().unwrap().take() {
                    if let Some(token) = *t.lock().unwrap() {
                        vm.unwatch(token);
                    }
                    drop(vm);
                }
                d.write(1).unwrap();
            }),
        )
        .unwrap();
    *token.lock().unwrap() = Some(id);
    drop(irq);
    fd.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while done.read().is_err() {
        assert!(
            Instant::now() < deadline,
            "the dispatcher deadlocked tearing itself down"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(slot.lock().unwrap().is_none());
}

#[test]
fn after_unwatch_returns_the_callback_never_runs() {
    let sim = SimBackend::new(1, IrqchipMode::Split { ioapic_pins: 24 });
    let irq = Interrupts::new(sim, Config::default()).unwrap();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let r = runs.clone();
    let id = irq
        .watch(
            &fd,
            Arc::new(move || {
                r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }),
        )
        .unwrap();
    let writer = {
        let fd = fd.try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..10_000 {
                let _ = fd.write(1);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(2));
    irq.unwatch(id);
    let after = runs.load(std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), after);
}
