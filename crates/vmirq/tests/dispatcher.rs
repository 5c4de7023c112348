//! The userspace dispatcher's teardown rules, including teardown from inside its own thread,
//! and event-loop mode (no vmirq thread; the VMM's loop serves the irqfds).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmirq::{
    Config, Dispatch, Interrupts, IrqchipMode, IrqfdPath, Route, SimBackend, Watch, X86Msi,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

#[test]
fn a_callback_may_drop_its_own_watch_and_the_last_reference_to_the_vm() {
    let sim = SimBackend::new(1, IrqchipMode::Split { ioapic_pins: 24 });
    let irq = Interrupts::new(sim, Config::default()).unwrap();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let slot: Arc<Mutex<Option<Arc<Interrupts>>>> = Arc::new(Mutex::new(Some(irq.clone())));
    let watch_slot: Arc<Mutex<Option<Watch>>> = Arc::default();
    let done = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let (s, w, d) = (slot.clone(), watch_slot.clone(), done.clone());
    let watch = irq
        .watch(
            &fd,
            Arc::new(move || {
                // Runs on the dispatcher thread: drop its own watch, then the VM.
                if let Some(vm) = s.lock().unwrap().take() {
                    drop(w.lock().unwrap().take());
                    drop(vm);
                }
                d.write(1).unwrap();
            }),
        )
        .unwrap();
    *watch_slot.lock().unwrap() = Some(watch);
    drop(irq);
    fd.write(1).unwrap();
    wait_until("the callback to finish tearing down", || {
        done.read().is_ok()
    });
    assert!(slot.lock().unwrap().is_none());
    assert!(watch_slot.lock().unwrap().is_none());
}

#[test]
fn after_a_watch_drops_its_callback_never_runs() {
    let sim = SimBackend::new(1, IrqchipMode::Split { ioapic_pins: 24 });
    let irq = Interrupts::new(sim, Config::default()).unwrap();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let r = runs.clone();
    assert_eq!(irq.threads(), 0, "no userspace irqfd yet, no thread");
    let watch = irq
        .watch(
            &fd,
            Arc::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();
    assert_eq!(
        irq.threads(),
        1,
        "thread mode serves watches on vmirq's thread"
    );
    let writer = {
        let fd = fd.try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..10_000 {
                let _ = fd.write(1);
            }
        })
    };
    // The path is live: the callback ran at least once before the watch goes.
    wait_until("the first callback", || runs.load(Ordering::SeqCst) > 0);
    drop(watch);
    let after = runs.load(Ordering::SeqCst);
    writer.join().unwrap();
    // The writer is done and the eventfd holds its count: a live watch would run now. A
    // second watch on a fresh eventfd proves the dispatcher is still serving.
    let probe = EventFd::new(EFD_NONBLOCK).unwrap();
    let probed = Arc::new(AtomicU64::new(0));
    let p = probed.clone();
    let _probe_watch = irq
        .watch(
            &probe,
            Arc::new(move || {
                p.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();
    probe.write(1).unwrap();
    wait_until("the probe callback", || probed.load(Ordering::SeqCst) > 0);
    assert_eq!(runs.load(Ordering::SeqCst), after);
}

#[test]
fn event_loop_mode_serves_irqfds_with_no_vmirq_thread() {
    let sim = SimBackend::new(1, IrqchipMode::Split { ioapic_pins: 24 });
    let config = Config {
        dispatch: Dispatch::EventLoop,
        ..Config::default()
    };
    let irq = Interrupts::new(sim.clone(), config).unwrap();
    // Route i delivers vector 0x40 + i, so no two events merge in the vCPU's IRR.
    let vector = |i: u8| 0x40 + i;
    let routes: Vec<_> = (0..100)
        .map(|i| {
            let msg = X86Msi::fixed(0, vector(i)).encode().unwrap();
            irq.new_route(Route::msi(msg)).unwrap()
        })
        .collect();
    let total = |sim: &SimBackend| (0..100).map(|i| sim.count(0, vector(i))).sum::<u64>();
    let fds: Vec<_> = (0..100)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let irqfds: Vec<_> = routes
        .iter()
        .zip(&fds)
        .map(|(r, fd)| r.assign_irqfd_on(fd, Some(IrqfdPath::User)).unwrap())
        .collect();
    assert_eq!(irq.threads(), 0, "event-loop mode started a thread");
    // Nothing is served until the VMM's loop asks.
    fds[3].write(1).unwrap();
    fds[7].write(1).unwrap();
    sim.run_until_idle();
    assert_eq!(total(&sim), 0);
    // The one descriptor to poll is readable now.
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&irq.event_fd()),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1);
    assert_eq!(irq.service().unwrap(), 2);
    sim.run_until_idle();
    assert_eq!((sim.count(0, vector(3)), sim.count(0, vector(7))), (1, 1));
    // Per-descriptor service (crosvm's shape).
    let events = irq.irq_events();
    assert_eq!(events.len(), 100);
    fds[9].write(1).unwrap();
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fds[9]);
    let served: usize = events
        .iter()
        .map(|(token, _)| usize::from(irq.service_irq_event(*token)))
        .sum();
    assert_eq!(served, 1);
    assert!(
        events.iter().all(|(_, fd)| *fd != raw),
        "vmirq serves its own duplicates"
    );
    assert_eq!(irq.threads(), 0);
    sim.run_until_idle();
    assert_eq!(sim.count(0, vector(9)), 1);
    assert_eq!(total(&sim), 3);
    drop(irqfds);
}

/// Whether `fd` is readable now (no wait).
fn readable(fd: std::os::fd::RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call; no wait.
    unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
}

/// Paused, nothing wakes anyone: the one descriptor an event loop polls (and the dispatcher
/// thread sleeps on) stays quiet though signals wait, and serving does nothing; resumed, it is
/// readable at once and serves each waiting eventfd once.
#[test]
fn paused_the_dispatcher_descriptor_stays_quiet_and_serves_nothing() {
    for dispatch in [Dispatch::EventLoop, Dispatch::Thread] {
        let sim = SimBackend::new(1, IrqchipMode::Split { ioapic_pins: 24 });
        let config = Config {
            dispatch,
            ..Config::default()
        };
        let irq = Interrupts::new(sim.clone(), config).unwrap();
        let msg = X86Msi::fixed(0, 0x40).encode().unwrap();
        let route = irq.new_route(Route::msi(msg)).unwrap();
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let _irqfd = route.assign_irqfd_on(&fd, Some(IrqfdPath::User)).unwrap();
        let epoll = std::os::fd::AsRawFd::as_raw_fd(&irq.event_fd());
        irq.pause();
        fd.write(1).unwrap();
        // Control: the eventfd itself is readable, the dispatcher's descriptor is not.
        assert!(readable(std::os::fd::AsRawFd::as_raw_fd(&fd)));
        assert!(
            !readable(epoll),
            "{dispatch:?}: a paused dispatcher is woken"
        );
        assert_eq!(irq.service().unwrap(), 0);
        let served: usize = irq
            .irq_events()
            .iter()
            .map(|(token, _)| usize::from(irq.service_irq_event(*token)))
            .sum();
        assert_eq!(served, 0, "{dispatch:?}: served while paused");
        sim.run_until_idle();
        assert_eq!(sim.count(0, 0x40), 0);
        irq.resume().unwrap();
        if dispatch == Dispatch::EventLoop {
            assert!(readable(epoll), "resumed, the waiting signal is not seen");
            assert_eq!(irq.service().unwrap(), 1);
        }
        wait_until("the waiting signal to be delivered", || {
            sim.run_until_idle();
            sim.count(0, 0x40) == 1
        });
        assert!(!readable(std::os::fd::AsRawFd::as_raw_fd(&fd)));
    }
}
