//! `vmirq demo`: boot the test guest, drive every path, print what was sent and what arrived.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use vmirq_guest::machine::{boot, drain_burst, wait_fd, BackendKind, Machine, MachineError, Mode};

use crate::paths::{self, TARGET_VCPU};
use crate::report::{human_ns, quantile};

/// Paths in the order the table shows them, with the irqchip of the machine each runs on.
pub const PATHS: [(&str, Mode); 6] = [
    ("msi-signal", Mode::Kernel),
    ("msi-irqfd-kernel", Mode::Kernel),
    ("msi-irqfd-user", Mode::Kernel),
    ("pin-edge", Mode::Kernel),
    ("level-resample-kernel", Mode::Kernel),
    ("level-ioapic-split", Mode::Split),
];
/// Triggers fired back to back after the paced ones, to show coalescing.
const BURST: u64 = 100;
const WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("test guest: {0}")]
    Machine(#[from] MachineError),
    #[error("msix: the host could not serve vector {0}")]
    MsixHost(u16),
    #[error("{path}: {source}")]
    Path {
        path: &'static str,
        #[source]
        source: vmirq::Error,
    },
    #[error("{lost} interrupts were lost ({on})")]
    Lost { lost: u64, on: String },
    #[error("{path}: {extra} interrupts more than its triggers can cause (delivered twice)")]
    Duplicated { path: &'static str, extra: u64 },
}

impl DemoError {
    /// `Lost`, naming each path that lost interrupts, if any did.
    pub fn lost<'a>(per_path: impl IntoIterator<Item = (&'a str, u64)>) -> Option<Self> {
        let losers: Vec<(&str, u64)> = per_path.into_iter().filter(|(_, n)| *n > 0).collect();
        let lost = losers.iter().map(|(_, n)| n).sum();
        let on = losers
            .iter()
            .map(|(path, n)| format!("{path}: {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        (lost > 0).then_some(DemoError::Lost { lost, on })
    }
}

#[derive(Serialize)]
pub struct Row {
    pub path: &'static str,
    pub sent: u64,
    pub delivered: u64,
    pub coalesced: u64,
    pub lost: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
}

impl Row {
    /// Coalesced is what was neither delivered nor lost: triggers merged into one interrupt.
    pub fn new(
        path: &'static str,
        sent: u64,
        delivered: u64,
        lost: u64,
        latencies: &mut [Duration],
    ) -> Self {
        Self {
            path,
            sent,
            delivered,
            coalesced: sent.saturating_sub(delivered + lost),
            lost,
            p50_ns: quantile(latencies, 0.50).as_nanos() as u64,
            p99_ns: quantile(latencies, 0.99).as_nanos() as u64,
        }
    }
}

#[derive(Serialize)]
struct Report {
    backend: &'static str,
    paths: Vec<Row>,
}

/// Paced triggers (each waits for its interrupt: latency), then a burst (coalescing allowed,
/// but some interrupt must follow the last trigger). Lost = paced triggers never taken, plus a
/// burst with no delivery after its last trigger.
fn drive(
    m: &dyn Machine,
    rig: &paths::Rig,
    paced: u64,
    bar: &ProgressBar,
) -> Result<Row, DemoError> {
    let err = |source| DemoError::Path {
        path: rig.name,
        source,
    };
    m.log().clear();
    let before = m.count(TARGET_VCPU, rig.vector);
    let mut latencies = Vec::with_capacity(paced as usize);
    let mut lost = 0;
    for _ in 0..paced {
        match paths::round_trip(m, rig).map_err(err)? {
            Some(trip) => latencies.push(trip.isr),
            None => lost += 1,
        }
        bar.inc(1);
    }
    // Each paced trigger waited for its interrupt: exactly one each (the control is taken
    // after anything still pending above it).
    m.control(TARGET_VCPU);
    let paced_delivered = m.count(TARGET_VCPU, rig.vector) - before;
    if paced_delivered > paced {
        return Err(DemoError::Duplicated {
            path: rig.name,
            extra: paced_delivered - paced,
        });
    }
    // An interrupt taken after the last trigger was *issued* proves it was not lost.
    let mut last_trigger = Instant::now();
    for _ in 0..BURST {
        last_trigger = Instant::now();
        rig.fire().map_err(err)?;
    }
    let last_isr = drain_burst(
        m,
        Some(TARGET_VCPU),
        rig.vector,
        last_trigger,
        WAIT,
        Duration::from_millis(200),
    );
    let mut after_last = last_isr.is_some_and(|at| at >= last_trigger);
    if let Some(fd) = &rig.resample {
        // The burst's interrupt was acknowledged: the device hears of it.
        after_last &= wait_fd(m, fd, WAIT).is_some();
    }
    if !after_last {
        lost += 1;
    }
    bar.inc(BURST);
    m.control(TARGET_VCPU);
    let sent = paced + BURST;
    let delivered = m.count(TARGET_VCPU, rig.vector) - before;
    // A burst may coalesce, into 1 to BURST interrupts; never more.
    if delivered - paced_delivered > BURST {
        return Err(DemoError::Duplicated {
            path: rig.name,
            extra: delivered - paced_delivered - BURST,
        });
    }
    Ok(Row::new(rig.name, sent, delivered, lost, &mut latencies))
}

/// The two test guests every path runs on: one with the in-kernel irqchip, one split.
pub struct Machines {
    pub kernel: Box<dyn Machine>,
    pub split: Box<dyn Machine>,
}

impl Machines {
    pub fn boot(kind: BackendKind) -> Result<Self, MachineError> {
        Ok(Self {
            kernel: boot(kind, &paths::machine_config(Mode::Kernel.irqchip()))?,
            split: boot(kind, &paths::machine_config(Mode::Split.irqchip()))?,
        })
    }

    /// The guest a path of [`PATHS`] runs on.
    pub fn on(&self, mode: Mode) -> &dyn Machine {
        match mode {
            Mode::Kernel => &*self.kernel,
            Mode::Split => &*self.split,
        }
    }
}

/// A progress bar of `len` steps drawn with `template`.
pub fn progress(len: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

pub fn run(
    kind: BackendKind,
    json: bool,
    count: usize,
    migrations: usize,
) -> Result<(), DemoError> {
    let machines = Machines::boot(kind)?;
    let paced = count as u64;
    let per_migration = vmirq_guest::migration::PACED_PATHS as u64;
    let bar = progress(
        PATHS.len() as u64 * (paced + BURST)
            + MSIX_FIRES
            + XEN_EVENTS
            + XEN_TIMERS
            + crate::xen_fifo::row_events(kind)
            + migrations as u64 * per_migration,
        "{prefix:>16} [{bar:40}] {pos}/{len} interrupts",
    );
    let kernel: &dyn Machine = &*machines.kernel;
    let mut rows = Vec::new();
    for (path, mode) in PATHS {
        let m = machines.on(mode);
        bar.set_prefix(path);
        let err = |source| DemoError::Path { path, source };
        let rig = paths::rig(m, path).map_err(err)?;
        rows.push(drive(m, &rig, paced, &bar)?);
    }
    bar.set_prefix("msix");
    rows.push(drive_msix(kernel, paced, &bar)?);
    bar.set_prefix("xen-2l");
    rows.push(drive_xen(kernel, &bar)?);
    bar.set_prefix("xen-timer");
    rows.push(drive_xen_timers(machines.on(Mode::Split), &bar)?);
    drop(machines);
    bar.set_prefix("xen-fifo");
    rows.push(crate::xen_fifo::drive(kind, &bar)?);
    bar.set_prefix("migrate");
    rows.push(drive_migrate(kind, migrations, &bar)?);
    bar.finish_and_clear();
    print_table(
        backend_name(kind),
        rows,
        json,
        &format!("latency: host trigger -> guest ISR's report (port write exit); bursts of {BURST} may coalesce, never lose; \
                  xen-fifo: a FIFO port per (vCPU, priority) on {} vCPUs, 12 rounds, p50/p99 a round's first signal to its last event handled; \
                  migrate: {migrations} live migrations to a fresh VM (kernel irqchip) with every path fired inside one, its p50/p99 the downtime", crate::xen_fifo::row_events(kind) / 12 / 16),
    )
}

/// The name of the backend `kind` runs on.
fn backend_name(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Kvm => "kvm",
        BackendKind::Sim | BackendKind::SimGuestEoi => "sim",
    }
}

/// The `migrate` row: a guest with every path attached (MSI irqfds kernel and user, an edge
/// pin, a level pin with resample, MSI-X with random masking, Xen 2-level ports) migrated
/// `migrations` times to a fresh VM through the snapshot's byte encoding, each path fired
/// inside one phase of each migration. Lost = triggers that never arrived on the target; a
/// duplicate is an error. Latencies are the migrations' downtimes.
fn drive_migrate(
    kind: BackendKind,
    migrations: usize,
    bar: &ProgressBar,
) -> Result<Row, DemoError> {
    use vmirq_guest::migration::{migrate_round, Migrating, Round};
    let (mut rig, devices) = Migrating::boot(kind, Mode::Kernel.irqchip())?;
    let mut rng = 0xD1B5_4A32_D192_ED03;
    let (mut sent, mut delivered, mut lost) = (0, 0, 0);
    let mut downtimes = Vec::new();
    for n in 0..migrations {
        let round = Round::pick(n, &mut rng);
        let (next, outcome) = migrate_round(rig, &devices, &round, WAIT)?;
        rig = next;
        if let Some(what) = outcome.duplicated.first() {
            eprintln!("vmirq: migrate: delivered twice: {what}");
            return Err(DemoError::Duplicated {
                path: "migrate",
                extra: outcome.delivered.saturating_sub(outcome.sent),
            });
        }
        for what in &outcome.lost {
            eprintln!("vmirq: migrate: lost {what}");
        }
        sent += outcome.sent;
        delivered += outcome.delivered;
        lost += outcome.lost.len() as u64;
        downtimes.push(outcome.migration.downtime);
        bar.inc(outcome.sent);
    }
    Ok(Row::new("migrate", sent, delivered, lost, &mut downtimes))
}

/// Prints the demo's table (or its JSON shape) for `rows` and a footer line; an error if any
/// row lost interrupts.
pub fn print_table(
    backend: &'static str,
    rows: Vec<Row>,
    json: bool,
    footer: &str,
) -> Result<(), DemoError> {
    let lost = DemoError::lost(rows.iter().map(|r| (r.path, r.lost)));
    if json {
        let report = Report {
            backend,
            paths: rows,
        };
        println!(
            "{}",
            serde_json::to_string(&report).expect("plain data serializes")
        );
    } else {
        println!(
            "backend: {backend} (2 vCPUs, real-mode guest; interrupts to vCPU {TARGET_VCPU}; \
             level-ioapic-split on a split-irqchip VM, the rest on an in-kernel irqchip)"
        );
        println!(
            "{:<22} {:>8} {:>10} {:>10} {:>5} {:>10} {:>10}",
            "path", "sent", "delivered", "coalesced", "lost", "p50", "p99"
        );
        for r in &rows {
            println!(
                "{:<22} {:>8} {:>10} {:>10} {:>5} {:>10} {:>10}",
                r.path,
                r.sent,
                r.delivered,
                r.coalesced,
                r.lost,
                human_ns(r.p50_ns),
                human_ns(r.p99_ns)
            );
        }
        println!("{footer}");
    }
    lost.map_or(Ok(()), Err)
}

/// Vectors of the demo's MSI-X device, and how many times it fires them.
const MSIX_VECTORS: u16 = 64;
const MSIX_FIRES: u64 = 1_000;

/// The `msix` row: a 64-vector device the guest programs through its BAR, fired round-robin
/// while the guest masks and unmasks random vectors. A fire on an unmasked vector waits for
/// its interrupt (latency); a fire on a masked one must come out when it is unmasked. Lost =
/// unmasked fires never taken, plus vectors still owed an interrupt after the final unmask.
fn drive_msix(m: &dyn Machine, _paced: u64, bar: &ProgressBar) -> Result<Row, DemoError> {
    let err = |source| DemoError::Path {
        path: "msix",
        source,
    };
    let device = paths::msix_bar(m, MSIX_VECTORS).map_err(err)?;
    let vector_of = |v: u16| 0x80 + v as u8;
    device.vectors.write_message_control(1 << 15);
    let script: Vec<(u32, u32)> = (0..MSIX_VECTORS)
        .flat_map(|v| paths::msix_entry(v, vector_of(v), false))
        .collect();
    for chunk in script.chunks(64) {
        m.guest_mmio(chunk)?;
    }
    let count = |v: u16| m.count(TARGET_VCPU, vector_of(v));
    let before: Vec<u64> = (0..MSIX_VECTORS).map(count).collect();
    let mut masked = vec![false; usize::from(MSIX_VECTORS)];
    let mut owed = vec![false; usize::from(MSIX_VECTORS)];
    let mut rng = paths::XorShift(0x9E37_79B9_7F4A_7C15);
    let (mut latencies, mut lost) = (Vec::new(), 0u64);
    // Interrupts the guest must take: one per fire on an unmasked vector, one per vector
    // owed at its unmask. More would be duplicates.
    let mut expected = 0u64;
    m.log().clear();
    for i in 0..MSIX_FIRES {
        if rng.next() % 8 == 0 {
            let v = (rng.next() % u64::from(MSIX_VECTORS)) as u16;
            masked[usize::from(v)] ^= true;
            let ctrl = paths::MSIX_BAR + u32::from(v) * 16 + 12;
            m.guest_mmio(&[(ctrl, u32::from(masked[usize::from(v)]))])?;
            if !masked[usize::from(v)] && owed[usize::from(v)] {
                expected += 1;
                // Unmasked with a pending bit: delivered once, now.
                if m.wait_isr(Some(TARGET_VCPU), vector_of(v), WAIT).is_none() {
                    lost += 1;
                }
                owed[usize::from(v)] = false;
            }
        }
        let v = (i % u64::from(MSIX_VECTORS)) as u16;
        let t0 = Instant::now();
        device.vectors.fire(v).map_err(|_| DemoError::MsixHost(v))?;
        if masked[usize::from(v)] {
            owed[usize::from(v)] = true;
        } else {
            expected += 1;
            match m.wait_isr(Some(TARGET_VCPU), vector_of(v), WAIT) {
                Some(ev) => latencies.push(ev.at.saturating_duration_since(t0)),
                None => lost += 1,
            }
        }
        bar.inc(1);
    }
    // Unmask everything: every vector still owed an interrupt gets one.
    let at_unmask: Vec<u64> = (0..MSIX_VECTORS).map(count).collect();
    let unmask: Vec<(u32, u32)> = (0..MSIX_VECTORS)
        .map(|v| (paths::MSIX_BAR + u32::from(v) * 16 + 12, 0))
        .collect();
    m.guest_mmio(&unmask)?;
    for v in 0..MSIX_VECTORS {
        let had = at_unmask[usize::from(v)];
        expected += u64::from(owed[usize::from(v)]);
        if owed[usize::from(v)] && m.wait_count(TARGET_VCPU, vector_of(v), had + 1, WAIT) == had {
            lost += 1;
        }
    }
    m.control(TARGET_VCPU);
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
    let delivered: u64 = (0..MSIX_VECTORS)
        .map(|v| count(v) - before[usize::from(v)])
        .sum();
    if delivered > expected {
        return Err(DemoError::Duplicated {
            path: "msix",
            extra: delivered - expected,
        });
    }
    Ok(Row::new(
        "msix",
        MSIX_FIRES,
        delivered,
        lost,
        &mut latencies,
    ))
}

/// Single-shot timers of the `xen-timer` row.
const XEN_TIMERS: u64 = 200;

/// The `xen-timer` row: single-shot Xen timers, one at a time, each 200 µs ahead, on vmirq's
/// one timer thread; each must reach the guest as VIRQ_TIMER through its upcall. Latency: the
/// deadline to the guest's ISR.
fn drive_xen_timers(m: &dyn Machine, bar: &ProgressBar) -> Result<Row, DemoError> {
    let (mut latencies, lost, consumed) =
        crate::bench_xen::timer_samples(m, XEN_TIMERS as usize, || bar.inc(1)).map_err(
            |source| DemoError::Path {
                path: "xen-timer",
                source,
            },
        )?;
    if consumed > XEN_TIMERS {
        return Err(DemoError::Duplicated {
            path: "xen-timer",
            extra: consumed - XEN_TIMERS,
        });
    }
    Ok(Row::new(
        "xen-timer",
        XEN_TIMERS,
        consumed,
        lost,
        &mut latencies,
    ))
}

/// Ports of the `xen-2l` row (half bound to each vCPU) and events sent over them.
const XEN_PORTS: u32 = 32;
const XEN_EVENTS: u64 = 1_000;

/// The `xen-2l` row: the guest binds 32 IPI ports across both vCPUs; the host sends events
/// through eventfd routes round-robin while the guest masks ports (a plain write of its mask
/// bit) and unmasks them (EVTCHNOP_unmask) at random. An event on an unmasked port must be
/// consumed by the guest's 2-level upcall handler; one on a masked port when it is unmasked.
fn drive_xen(m: &dyn Machine, bar: &ProgressBar) -> Result<Row, DemoError> {
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
        ports.push((port, vcpu, route));
    }
    let before: Vec<u32> = ports.iter().map(|(p, _, _)| m.port_counter(*p)).collect();
    let mut masked = vec![false; ports.len()];
    let mut owed = vec![false; ports.len()];
    let mut rng = paths::XorShift(0xD1B5_4A32_D192_ED03);
    let (mut latencies, mut lost) = (Vec::new(), 0u64);
    // Events the guest must consume: one per event on an unmasked port, one per port owed at
    // its unmask. More would be duplicates.
    let mut expected = 0u64;
    // Events the dispatcher has handed to the event channels (or failed to).
    let served = || {
        let stats = m.interrupts().stats();
        stats.user_injections.load(Ordering::Relaxed)
            + stats.user_inject_errors.load(Ordering::Relaxed)
    };
    let wait_port = |port: u32, n: u32| {
        let deadline = Instant::now() + WAIT;
        while m.port_counter(port) < n && Instant::now() < deadline {
            m.pump();
            std::thread::sleep(Duration::from_micros(20));
        }
        m.port_counter(port) >= n
    };
    m.log().clear();
    for i in 0..XEN_EVENTS {
        if rng.next() % 8 == 0 {
            let k = (rng.next() % u64::from(XEN_PORTS)) as usize;
            let port = ports[k].0;
            if masked[k] {
                let had = m.port_counter(port);
                xen.unmask(m, port).map_err(err)?;
                expected += u64::from(owed[k]);
                if owed[k] && !wait_port(port, had + 1) {
                    lost += 1;
                }
            } else {
                xen.mask(m, port).map_err(err)?;
            }
            masked[k] ^= true;
            owed[k] = false;
        }
        let k = (i % u64::from(XEN_PORTS)) as usize;
        let (port, vcpu, (_, _, fd)) = &ports[k];
        let expect = m.port_counter(*port) + 1;
        let was_served = served();
        m.log().clear();
        let t0 = Instant::now();
        fd.write(1).map_err(|_| err(vmirq::Error::BadEventFd))?;
        if masked[k] {
            // The eventfd is read asynchronously: wait until the event reached the channel
            // (latched in its pending bit), so that an unmask later cannot overtake it and
            // make it a second, legitimate delivery this accounting would call a duplicate.
            let deadline = Instant::now() + WAIT;
            while served() == was_served && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(20));
            }
            if served() == was_served {
                lost += 1;
            }
            owed[k] = true;
        } else {
            expected += 1;
            match m.wait_isr(
                Some(*vcpu as usize),
                vmirq_guest::layout::XEN_UPCALL_VECTOR,
                WAIT,
            ) {
                Some(ev) => latencies.push(ev.at.saturating_duration_since(t0)),
                None => lost += 1,
            }
            if !wait_port(*port, expect) {
                lost += 1;
            }
        }
        bar.inc(1);
    }
    // Unmask every port: each one still owed an event gets it.
    for (k, (port, _, _)) in ports.iter().enumerate() {
        if masked[k] {
            let had = m.port_counter(*port);
            xen.unmask(m, *port).map_err(err)?;
            expected += u64::from(owed[k]);
            if owed[k] && !wait_port(*port, had + 1) {
                lost += 1;
            }
        }
    }
    m.control(0);
    m.control(1);
    let delivered: u64 = ports
        .iter()
        .zip(&before)
        .map(|((p, _, _), b)| u64::from(m.port_counter(*p) - b))
        .sum();
    if delivered > expected {
        return Err(DemoError::Duplicated {
            path: "xen-2l",
            extra: delivered - expected,
        });
    }
    Ok(Row::new(
        "xen-2l",
        XEN_EVENTS,
        delivered,
        lost,
        &mut latencies,
    ))
}
