//! Running out of file descriptors is reported as such (`Error::FdExhausted`), not as a bad
//! eventfd. Alone in its test binary: it lowers the process's descriptor limit.

use vmirq::{Config, Error, Interrupts, IrqchipMode, IrqfdPath, Route, SimBackend, X86Msi};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fn set_fd_limit(soft: libc::rlim_t) -> libc::rlim_t {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a valid rlimit struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        let old = lim.rlim_cur;
        lim.rlim_cur = soft;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        old
    }
}

#[test]
fn fd_exhaustion_is_reported_as_such_on_both_paths() {
    let sim = SimBackend::new(1, IrqchipMode::Kernel);
    let irq = Interrupts::new(sim, Config::default()).unwrap();
    let msg = X86Msi::fixed(0, 0x40).encode().unwrap();
    let route = irq.new_route(Route::msi(msg)).unwrap();
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    // The path works with descriptors to spare.
    drop(route.assign_irqfd(&fd).unwrap());
    // No descriptor number below the limit is free: the next open fails with EMFILE.
    let next = EventFd::new(0).unwrap();
    let lowest_free = std::os::fd::AsRawFd::as_raw_fd(&next) as libc::rlim_t;
    drop(next);
    let old = set_fd_limit(lowest_free);
    let results: Vec<_> = [Some(IrqfdPath::Kernel), Some(IrqfdPath::User)]
        .into_iter()
        .map(|path| route.assign_irqfd_on(&fd, path).map(drop))
        .collect();
    set_fd_limit(old);
    for r in results {
        assert!(matches!(r, Err(Error::FdExhausted(_))), "{r:?}");
    }
    // With descriptors back, the same request succeeds: nothing was left half-bound.
    drop(route.assign_irqfd(&fd).unwrap());
}
