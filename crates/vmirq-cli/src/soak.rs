//! `vmirq soak`: every demo path at full rate for N triggers each, with the guest and the host
//! churning the path underneath (masking, re-routing, level sources coming and going), then the
//! demo's table. Exits non-zero on any loss.
//!
//! Triggers go out in windows of 1-64 back to back (full rate: they may coalesce). The loss
//! rule is the demo's burst rule, per window: some interrupt must be taken after the window's
//! last trigger was issued (and, on level paths, the guest's EOI must reach the resamplefd).
//! A trigger on a masked vector or port is owed: it must come out when it is unmasked.

use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use vmirq::{IrqfdPath, Route, X86Msi};
use vmirq_guest::machine::{ioapic_pin_script, wait_fd, BackendKind, Machine};
use vmm_sys_util::eventfd::EventFd;

use crate::demo::{print_table, progress, DemoError, Machines, Row, PATHS};
use crate::paths::{self, XorShift, LEVEL_VECTOR, PIN_VECTOR, TARGET_VCPU};

const WAIT: Duration = Duration::from_secs(2);
/// Most triggers in one window.
const MAX_WINDOW: u64 = 64;
/// One window in this many is preceded by churn.
const CHURN_EVERY: u64 = 8;

/// Every path of the demo, `events` triggers each.
pub fn run(kind: BackendKind, json: bool, events: u64) -> Result<(), DemoError> {
    let machines = Machines::boot(kind)?;
    let kernel: &dyn Machine = &*machines.kernel;
    let bar = progress(
        (PATHS.len() as u64 + 2) * events,
        "{prefix:>22} [{bar:40}] {pos}/{len} triggers ({eta})",
    );
    let mut rows = Vec::new();
    for (path, mode) in PATHS {
        let m = machines.on(mode);
        bar.set_prefix(path);
        let err = |source| DemoError::Path { path, source };
        rows.push(soak_path(m, path, events, &bar).map_err(err)?);
    }
    bar.set_prefix("msix");
    rows.push(soak_msix(kernel, events, &bar)?);
    bar.set_prefix("xen-2l");
    rows.push(soak_xen(kernel, events, &bar)?);
    bar.finish_and_clear();
    print_table(kernel.kind(), rows, json, &format!(
        "soak: {events} triggers per path in windows of 1-{MAX_WINDOW}, with masking, \
         re-routing and level-source churn; a window is lost if no interrupt follows its last trigger"
    ))
}

/// The window's last trigger was issued at `since`: waits for an interrupt of `vector` taken
/// after it. Returns the latency from `since`.
fn taken_after(m: &dyn Machine, vector: u8, since: Instant) -> Option<Duration> {
    taken_within(m, vector, since, WAIT)
}

/// [`taken_after`], waiting at most `timeout`.
fn taken_within(
    m: &dyn Machine,
    vector: u8,
    since: Instant,
    timeout: Duration,
) -> Option<Duration> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = m.wait_isr(Some(TARGET_VCPU), vector, left)?;
        if ev.at >= since {
            return Some(ev.at - since);
        }
    }
}

/// Reads whatever `fd` holds, without waiting; whether it held anything.
fn drain(fd: &EventFd) -> bool {
    fd.read().is_ok()
}

/// A level device after a window whose last trigger went at `last`: it holds its work until
/// the guest serves it, so on every resample (the guest's EOI de-asserted the line) that came
/// with the work still unserved it asserts again, as a device re-checking its status does.
/// Served when an interrupt is taken after `last`.
fn serve_level(
    m: &dyn Machine,
    vector: u8,
    last: Instant,
    resample: &EventFd,
    fire: &dyn Fn() -> Result<(), vmirq::Error>,
) -> Result<Option<Duration>, vmirq::Error> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Some(latency) = taken_within(m, vector, last, Duration::from_millis(5)) {
            return Ok(Some(latency));
        }
        if drain(resample) {
            fire()?;
        }
    }
    Ok(None)
}

fn msi_route(vector: u8) -> Route {
    Route::msi(
        X86Msi::fixed(TARGET_VCPU as u32, vector)
            .encode()
            .expect("vCPU 1 fits an 8-bit destination"),
    )
}

/// Re-routes a path from one vector to the other of its pair; returns the new vector.
type Reroute = Box<dyn Fn(u8) -> Result<u8, vmirq::Error>>;

/// How a path's trigger is fired and how the path is churned.
struct Path {
    vector: u8,
    fire: Box<dyn Fn() -> Result<(), vmirq::Error>>,
    resample: Option<EventFd>,
    reroute: Option<Reroute>,
    /// The IOAPIC pin behind the path, and whether it is level.
    pin: Option<(u32, bool)>,
    _keep: Box<dyn std::any::Any>,
}

fn eventfd() -> Result<EventFd, vmirq::Error> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|_| vmirq::Error::BadEventFd)
}

fn trigger(fd: &EventFd) -> Result<Box<dyn Fn() -> Result<(), vmirq::Error>>, vmirq::Error> {
    let fd = fd.try_clone().map_err(|_| vmirq::Error::BadEventFd)?;
    Ok(Box::new(move || {
        fd.write(1).map_err(|_| vmirq::Error::BadEventFd)
    }))
}

/// The other vector of a re-routed pair (they differ in bit 3, so both stay in one class band).
fn other(vector: u8) -> u8 {
    vector ^ 0x08
}

fn rig(m: &dyn Machine, name: &str) -> Result<Path, vmirq::Error> {
    let irq = m.interrupts();
    Ok(match name {
        "msi-signal" => {
            let current = std::rc::Rc::new(std::cell::Cell::new(0x70u8));
            let (irq, c) = (std::sync::Arc::clone(irq), current.clone());
            Path {
                vector: 0x70,
                fire: Box::new(move || {
                    let Route::Msi { msg, .. } = msi_route(c.get()) else {
                        unreachable!("msi_route makes MSI routes")
                    };
                    irq.signal_msi(msg)
                }),
                resample: None,
                reroute: Some(Box::new(move |v| {
                    current.set(other(v));
                    Ok(other(v))
                })),
                pin: None,
                _keep: Box::new(()),
            }
        }
        "msi-irqfd-kernel" | "msi-irqfd-user" => {
            let (vector, path) = if name == "msi-irqfd-kernel" {
                (0x71, IrqfdPath::Kernel)
            } else {
                (0x72, IrqfdPath::User)
            };
            let route = std::rc::Rc::new(irq.new_route(msi_route(vector))?);
            let fd = eventfd()?;
            let irqfd = route.assign_irqfd_on(&fd, Some(path))?;
            let r = route.clone();
            Path {
                vector,
                fire: trigger(&fd)?,
                resample: None,
                reroute: Some(Box::new(move |v| {
                    r.set(msi_route(other(v)))?;
                    Ok(other(v))
                })),
                pin: None,
                // The irqfd first: it is unbound before its route goes.
                _keep: Box::new((irqfd, route, fd)),
            }
        }
        "pin-edge" => {
            let pin = irq.pin(paths::PIN)?;
            let fd = eventfd()?;
            let irqfd = pin.assign_irqfd(&fd)?;
            Path {
                vector: PIN_VECTOR,
                fire: trigger(&fd)?,
                resample: None,
                reroute: None,
                pin: Some((paths::PIN, false)),
                _keep: Box::new((irqfd, pin, fd)),
            }
        }
        "level-resample-kernel" | "level-ioapic-split" => {
            let pin = irq.pin(paths::LEVEL_PIN)?;
            let fd = eventfd()?;
            let resample = eventfd()?;
            let irqfd = pin.assign_level_irqfd(&fd, &resample)?;
            Path {
                vector: LEVEL_VECTOR,
                fire: trigger(&fd)?,
                resample: Some(resample),
                reroute: None,
                pin: Some((paths::LEVEL_PIN, true)),
                _keep: Box::new((irqfd, pin, fd)),
            }
        }
        _ => return Err(vmirq::Error::Unsupported("soak an unknown path")),
    })
}

/// The guest masks or unmasks IOAPIC pin `pin` (programmed to the target vCPU).
fn mask_pin(
    m: &dyn Machine,
    pin: u32,
    vector: u8,
    level: bool,
    masked: bool,
) -> Result<(), DemoError> {
    m.guest_mmio(&ioapic_pin_script(
        pin,
        vector,
        TARGET_VCPU as u8,
        level,
        masked,
    ))?;
    Ok(())
}

/// Soaks one of the demo's rigged paths.
fn soak_path(
    m: &dyn Machine,
    name: &'static str,
    events: u64,
    bar: &ProgressBar,
) -> Result<Row, vmirq::Error> {
    let p = rig(m, name)?;
    let mut vector = p.vector;
    let mut rng = XorShift(0x2545_F491_4F6C_DD1D ^ u64::from(vector));
    let before = m.count(TARGET_VCPU, vector) + m.count(TARGET_VCPU, other(vector));
    let (mut sent, mut lost, mut windows, mut churned) = (0u64, 0u64, 0u64, 0u64);
    let mut latencies = Vec::new();
    let io = |e: DemoError| match e {
        DemoError::Path { source, .. } => source,
        _ => vmirq::Error::Unsupported("drive the test guest"),
    };
    while sent < events {
        windows += 1;
        let mut masked_window = false;
        if windows % CHURN_EVERY == 0 {
            match (rng.next() % 3, &p.reroute, p.pin) {
                (0, Some(reroute), _) => vector = reroute(vector)?,
                (1, _, Some((pin, level))) => {
                    // The guest masks the pin. A level device's assertion waits in the IOAPIC
                    // for the unmask; an edge while masked is dropped by the hardware, so
                    // edge pins are unmasked again before anything fires.
                    mask_pin(m, pin, vector, level, true).map_err(io)?;
                    if level {
                        masked_window = true;
                    } else {
                        mask_pin(m, pin, vector, level, false).map_err(io)?;
                    }
                }
                (2, _, Some((pin, true))) => {
                    // Level-source churn: a crowd of sources raises the line once, the
                    // guest takes it, and they all go.
                    let line = m.interrupts().pin(pin)?.line()?;
                    let crowd: Vec<_> = (0..1 + rng.next() % 100).map(|_| line.source()).collect();
                    let had = m.count(TARGET_VCPU, vector);
                    let since = Instant::now();
                    crowd.iter().for_each(vmirq::IrqSource::assert);
                    if taken_after(m, vector, since).is_none() {
                        lost += 1;
                    }
                    drop(crowd);
                    if let Some(fd) = &p.resample {
                        wait_fd(m, fd, WAIT);
                    }
                    m.settle(Duration::from_millis(1));
                    // Not the device's: the crowd's interrupts are left out of the row.
                    churned += m.count(TARGET_VCPU, vector) - had;
                }
                _ => {}
            }
        }
        let n = (1 + rng.next() % MAX_WINDOW).min(events - sent);
        m.log().clear();
        if let Some(fd) = &p.resample {
            drain(fd);
        }
        let mut last = Instant::now();
        for _ in 0..n {
            last = Instant::now();
            (p.fire)()?;
        }
        if masked_window {
            let (pin, _) = p.pin.expect("masked windows are on pins");
            last = Instant::now();
            mask_pin(m, pin, vector, true, false).map_err(io)?;
        }
        let served = match &p.resample {
            Some(fd) => serve_level(m, vector, last, fd, &*p.fire)?,
            None => taken_after(m, vector, last),
        };
        match served {
            Some(latency) => latencies.push(latency),
            None => lost += 1,
        }
        sent += n;
        bar.inc(n);
    }
    m.settle(Duration::from_millis(20));
    let delivered =
        m.count(TARGET_VCPU, p.vector) + m.count(TARGET_VCPU, other(p.vector)) - before - churned;
    Ok(Row::new(name, sent, delivered, lost, &mut latencies))
}

const MSIX_VECTORS: u16 = 64;

/// The MSI-X device of the demo at full rate: windows on random vectors while the guest masks,
/// unmasks and re-targets entries (a live message change) at random.
fn soak_msix(m: &dyn Machine, events: u64, bar: &ProgressBar) -> Result<Row, DemoError> {
    let err = |source| DemoError::Path {
        path: "msix",
        source,
    };
    let device = paths::msix_bar(m, MSIX_VECTORS).map_err(err)?;
    device.vectors.write_message_control(1 << 15);
    let mut target: Vec<u8> = (0..MSIX_VECTORS).map(|v| 0x80 + v as u8).collect();
    let script: Vec<(u32, u32)> = (0..MSIX_VECTORS)
        .flat_map(|v| paths::msix_entry(v, target[usize::from(v)], false))
        .collect();
    for chunk in script.chunks(64) {
        m.guest_mmio(chunk)?;
    }
    let total = |m: &dyn Machine| {
        (0x80..=0xFFu8)
            .map(|v| m.count(TARGET_VCPU, v))
            .sum::<u64>()
    };
    let before = total(m);
    let mut masked = vec![false; usize::from(MSIX_VECTORS)];
    let mut owed = vec![false; usize::from(MSIX_VECTORS)];
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let (mut sent, mut lost, mut windows, mut latencies) = (0u64, 0u64, 0u64, Vec::new());
    while sent < events {
        windows += 1;
        if windows % CHURN_EVERY == 0 {
            let v = (rng.next() % u64::from(MSIX_VECTORS)) as usize;
            let ctrl = paths::MSIX_BAR + v as u32 * 16;
            if rng.next() % 2 == 0 {
                masked[v] ^= true;
                m.log().clear();
                let since = Instant::now();
                m.guest_mmio(&[(ctrl + 12, u32::from(masked[v]))])?;
                if !masked[v]
                    && std::mem::take(&mut owed[v])
                    && taken_after(m, target[v], since).is_none()
                {
                    lost += 1;
                }
            } else {
                // Re-target the live entry: its next interrupts use the new vector.
                target[v] ^= 0x40;
                let entry = paths::msix_entry(v as u16, target[v], masked[v]);
                m.guest_mmio(&entry[2..3])?;
            }
        }
        let v = (rng.next() % u64::from(MSIX_VECTORS)) as usize;
        let n = (1 + rng.next() % MAX_WINDOW).min(events - sent);
        m.log().clear();
        let mut last = Instant::now();
        for _ in 0..n {
            last = Instant::now();
            device
                .vectors
                .fire(v as u16)
                .map_err(|_| DemoError::MsixHost(v as u16))?;
        }
        if masked[v] {
            owed[v] = true;
        } else {
            match taken_after(m, target[v], last) {
                Some(latency) => latencies.push(latency),
                None => lost += 1,
            }
        }
        sent += n;
        bar.inc(n);
    }
    // Unmask everything: every vector still owed an interrupt gets one.
    m.log().clear();
    let since = Instant::now();
    let unmask: Vec<(u32, u32)> = (0..MSIX_VECTORS)
        .map(|v| (paths::MSIX_BAR + u32::from(v) * 16 + 12, 0))
        .collect();
    m.guest_mmio(&unmask)?;
    for v in 0..usize::from(MSIX_VECTORS) {
        if owed[v] && taken_after(m, target[v], since).is_none() {
            lost += 1;
        }
    }
    if let Some(e) = device
        .events
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .first()
    {
        let vector = match e {
            vmirq::msix::MsixEvent::AllocationFailed { vector, .. }
            | vmirq::msix::MsixEvent::InvalidMessage { vector, .. } => *vector,
            _ => u16::MAX,
        };
        return Err(DemoError::MsixHost(vector));
    }
    m.settle(Duration::from_millis(20));
    Ok(Row::new(
        "msix",
        sent,
        total(m) - before,
        lost,
        &mut latencies,
    ))
}

const XEN_PORTS: u32 = 32;

/// Xen 2-level event channels at full rate: windows on random ports (half on each vCPU) while
/// the guest masks and unmasks ports at random. A window on an unmasked port must be consumed
/// after its last event; one on a masked port when it is unmasked.
fn soak_xen(m: &dyn Machine, events: u64, bar: &ProgressBar) -> Result<Row, DemoError> {
    let err = |source| DemoError::Path {
        path: "xen-2l",
        source,
    };
    let xen = paths::Xen::on(m).map_err(err)?;
    let mut ports = Vec::new();
    for i in 0..XEN_PORTS {
        let vcpu = i % 2;
        let port = xen.bind_ipi(m, vcpu).map_err(err)?;
        let route = xen.route(m, port, vcpu).map_err(err)?;
        ports.push((port, route));
    }
    let before: Vec<u32> = ports.iter().map(|(p, _)| m.port_counter(*p)).collect();
    let mut masked = vec![false; ports.len()];
    let mut owed = vec![false; ports.len()];
    let mut rng = XorShift(0xD1B5_4A32_D192_ED03);
    // The guest's consumer counts each event it takes off a port.
    let consumed_beyond = |port: u32, had: u32| {
        let deadline = Instant::now() + WAIT;
        while m.port_counter(port) <= had {
            if Instant::now() > deadline {
                return None;
            }
            m.pump();
            std::thread::yield_now();
        }
        Some(Instant::now())
    };
    let (mut sent, mut lost, mut windows, mut latencies) = (0u64, 0u64, 0u64, Vec::new());
    while sent < events {
        windows += 1;
        if windows % CHURN_EVERY == 0 {
            let k = (rng.next() % u64::from(XEN_PORTS)) as usize;
            let port = ports[k].0;
            if masked[k] {
                let had = m.port_counter(port);
                xen.unmask(m, port).map_err(err)?;
                if std::mem::take(&mut owed[k]) && consumed_beyond(port, had).is_none() {
                    lost += 1;
                }
            } else {
                xen.mask(m, port).map_err(err)?;
            }
            masked[k] ^= true;
        }
        let k = (rng.next() % u64::from(XEN_PORTS)) as usize;
        let (port, (_, _, fd)) = &ports[k];
        let n = (1 + rng.next() % MAX_WINDOW).min(events - sent);
        let mut had = 0;
        let mut last = Instant::now();
        for _ in 0..n {
            had = m.port_counter(*port);
            last = Instant::now();
            fd.write(1).map_err(|_| err(vmirq::Error::BadEventFd))?;
        }
        if masked[k] {
            owed[k] = true;
        } else {
            match consumed_beyond(*port, had) {
                Some(at) => latencies.push(at.saturating_duration_since(last)),
                None => lost += 1,
            }
        }
        sent += n;
        bar.inc(n);
    }
    for (k, (port, _)) in ports.iter().enumerate() {
        if masked[k] {
            let had = m.port_counter(*port);
            xen.unmask(m, *port).map_err(err)?;
            if owed[k] && consumed_beyond(*port, had).is_none() {
                lost += 1;
            }
        }
    }
    m.settle(Duration::from_millis(20));
    let delivered: u64 = ports
        .iter()
        .zip(&before)
        .map(|((p, _), b)| u64::from(m.port_counter(*p).wrapping_sub(*b)))
        .sum();
    Ok(Row::new("xen-2l", sent, delivered, lost, &mut latencies))
}
