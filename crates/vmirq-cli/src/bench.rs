//! `vmirq bench`: each figure with its ratio to a baseline measured in the same run.
//! Samples of the paths are interleaved in a random order each round, so drift and the state
//! a previous sample left behind hit every path alike.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use vmirq::{IrqfdPath, Route, X86Msi};
use vmirq_guest::machine::{boot, BackendKind, Machine, Mode};
use vmm_sys_util::eventfd::EventFd;

use crate::demo::DemoError;
use crate::paths;
use crate::report::{human_ns, quantile};

#[derive(Serialize)]
struct Result_ {
    name: String,
    value: f64,
    unit: &'static str,
    baseline: Option<String>,
    baseline_value: Option<f64>,
    ratio: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    backend: &'static str,
    results: Vec<Result_>,
}

fn result(name: &str, value: f64, unit: &'static str, baseline: Option<(&str, f64)>) -> Result_ {
    Result_ {
        name: name.into(),
        value,
        unit,
        baseline: baseline.map(|(n, _)| n.into()),
        baseline_value: baseline.map(|(_, v)| v),
        ratio: baseline.map(|(_, v)| if v > 0.0 { value / v } else { f64::NAN }),
    }
}

const IRQFDS_FOR_MEMORY: usize = 1000;

/// Heap bytes the core spends per userspace irqfd (dispatcher entry, registry, handle).
fn bytes_per_user_irqfd(m: &dyn Machine) -> Result<f64, vmirq::Error> {
    let irq = m.interrupts();
    let gsi = irq.new_route(Route::msi(X86Msi::fixed(0, 0x7e).encode().expect("fits")))?;
    let fds: Vec<EventFd> = (0..IRQFDS_FOR_MEMORY)
        .map(|_| EventFd::new(0).map_err(|_| vmirq::Error::BadEventFd))
        .collect::<Result<_, _>>()?;
    // One irqfd first, so the dispatcher thread and its tables exist before measuring.
    let warm = gsi.assign_irqfd_on(&fds[0], Some(IrqfdPath::User))?;
    let before = crate::alloc::live_bytes();
    let irqfds: Vec<_> = fds[1..]
        .iter()
        .map(|fd| gsi.assign_irqfd_on(fd, Some(IrqfdPath::User)))
        .collect::<Result<_, _>>()?;
    let after = crate::alloc::live_bytes();
    let per = (after - before) as f64 / irqfds.len() as f64;
    drop((warm, irqfds));
    Ok(per)
}

/// CPU time the whole process uses per second while `n` userspace irqfds sit idle: it should
/// be ~0, since the dispatcher sleeps in epoll_wait and halted vCPUs sleep in the kernel.
fn idle_cpu_ms_per_s(m: &dyn Machine, n: usize) -> Result<f64, vmirq::Error> {
    let irq = m.interrupts();
    let gsi = irq.new_route(Route::msi(X86Msi::fixed(0, 0x7d).encode().expect("fits")))?;
    let fds: Vec<EventFd> = (0..n)
        .map(|_| EventFd::new(0).map_err(|_| vmirq::Error::BadEventFd))
        .collect::<Result<_, _>>()?;
    let _irqfds: Vec<_> = fds
        .iter()
        .map(|fd| gsi.assign_irqfd_on(fd, Some(IrqfdPath::User)))
        .collect::<Result<_, _>>()?;
    let cpu0 = process_cpu();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let cpu = process_cpu() - cpu0;
    Ok(cpu.as_secs_f64() * 1e3 / t0.elapsed().as_secs_f64())
}

fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which outlives the call.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// ns per assert/de-assert pair of one source among 10,000 on a line that another source holds
/// high: the O(1) path (two atomic RMWs, no lock, no irqchip call).
fn line_assert_deassert_ns(m: &dyn Machine) -> f64 {
    const SOURCES: usize = 10_000;
    const ROUNDS: usize = 100;
    // Pin 20: not programmed by the guest (masked), so nothing is delivered.
    let line = m.interrupts().pin(20).unwrap().line().unwrap();
    let holder = line.source();
    holder.assert();
    let sources: Vec<_> = (0..SOURCES - 1).map(|_| line.source()).collect();
    let t0 = Instant::now();
    for _ in 0..ROUNDS {
        for s in &sources {
            s.assert();
            s.deassert();
        }
    }
    let ns = t0.elapsed().as_nanos() as f64 / (ROUNDS * sources.len()) as f64;
    drop(holder);
    ns
}

/// Threads in this process now.
fn process_threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// Threads vmirq owns for a VM with `n` idle userspace irqfds: (thread mode on `m`'s VM,
/// event-loop mode on a fresh VM of the same backend, counted as the process's new threads).
fn dispatcher_threads(
    m: &dyn Machine,
    kind: BackendKind,
    n: usize,
) -> Result<(f64, f64), vmirq::Error> {
    let irq = m.interrupts();
    let msg = X86Msi::fixed(0, 0x7c).encode().expect("fits");
    let route = irq.new_route(Route::msi(msg))?;
    let fds = eventfds(n)?;
    let _irqfds: Vec<_> = fds
        .iter()
        .map(|fd| route.assign_irqfd_on(fd, Some(IrqfdPath::User)))
        .collect::<Result<_, _>>()?;
    let thread_mode = irq.threads() as f64;
    // Event-loop mode: a VM of its own (nothing of the machine's), its irqfds served by
    // `service()` from this thread.
    let backend: Arc<dyn vmirq::Backend> = match kind {
        BackendKind::Kvm => {
            let vm = vmirq_kvm::KvmVm::new(vmirq_kvm::KvmVmConfig {
                vcpus: 1,
                mem_size: 1 << 16,
                irqchip: vmirq::IrqchipMode::Kernel,
                halt_poll_ns: None,
            })
            .map_err(|_| vmirq::Error::Unsupported("create the event-loop bench VM"))?;
            vm.backend()
        }
        BackendKind::Sim | BackendKind::SimGuestEoi => {
            vmirq::SimBackend::new(1, vmirq::IrqchipMode::Kernel)
        }
    };
    let before = process_threads();
    let config = vmirq::Config {
        dispatch: vmirq::Dispatch::EventLoop,
        ..vmirq::Config::default()
    };
    let el = vmirq::Interrupts::new(backend, config)?;
    let route = el.new_route(Route::msi(msg))?;
    let fds = eventfds(n)?;
    let irqfds: Vec<_> = fds
        .iter()
        .map(|fd| route.assign_irqfd_on(fd, Some(IrqfdPath::User)))
        .collect::<Result<_, _>>()?;
    // Positive evidence the loop serves them: one event, one service.
    fds[n / 2].write(1).map_err(|_| vmirq::Error::BadEventFd)?;
    if el.service().map_err(vmirq::Error::Dispatcher)? != 1 {
        return Err(vmirq::Error::Unsupported(
            "serve an irqfd from the event loop",
        ));
    }
    let event_loop = (process_threads() - before) as f64;
    drop(irqfds);
    Ok((thread_mode, event_loop))
}

fn eventfds(n: usize) -> Result<Vec<EventFd>, vmirq::Error> {
    (0..n)
        .map(|_| EventFd::new(0).map_err(|_| vmirq::Error::BadEventFd))
        .collect()
}

/// A background load, switched on only around the samples measured under it.
struct Load {
    state: Arc<(Mutex<(bool, bool)>, Condvar)>,
    units: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    /// Runs `unit` in a loop on its own thread while switched on.
    fn start(unit: impl Fn() + Send + 'static) -> Self {
        // (on, running): `running` is true while the thread is inside a unit.
        let state = Arc::new((Mutex::new((false, false)), Condvar::new()));
        let units = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, u, st) = (state.clone(), units.clone(), stop.clone());
        let thread = std::thread::spawn(move || loop {
            {
                let (lock, cv) = &*s;
                let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
                g.1 = false;
                cv.notify_all();
                while !g.0 && !st.load(Ordering::SeqCst) {
                    g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                if st.load(Ordering::SeqCst) {
                    return;
                }
                g.1 = true;
            }
            unit();
            u.fetch_add(1, Ordering::SeqCst);
        });
        Self {
            state,
            units,
            stop,
            thread: Some(thread),
        }
    }

    /// On: returns once a unit has completed under it. Off: returns once the thread is idle.
    fn set(&self, on: bool) {
        let (lock, cv) = &*self.state;
        let start = self.units.load(Ordering::SeqCst);
        {
            let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
            g.0 = on;
            cv.notify_all();
            if !on {
                while g.1 {
                    g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                return;
            }
        }
        while self.units.load(Ordering::SeqCst) < start + 1 {
            std::thread::yield_now();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.state.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// p50 round trips of path `name` on `m` under `control` and under `load`: samples alternate
/// in a random order each round, one of the two loads running during each. The control keeps
/// the host as busy as the load without doing the thing under test, so the ratio isolates it:
/// on these 2-core hosts any busy thread moves a halted vCPU's wake-up time by ±40% (a busy
/// CPU never idles deeply), which would otherwise swamp the figure.
fn loaded_latency(
    m: &dyn Machine,
    name: &str,
    control: &Load,
    load: &Load,
    samples: usize,
) -> Result<(f64, f64), DemoError> {
    let rig = paths::rig(m, name).map_err(bench_err)?;
    let (mut controlled, mut loaded) = (Vec::new(), Vec::new());
    let mut rng = paths::XorShift(0x9E37_79B9_7F4A_7C15);
    let mut lost = 0;
    for round in 0..samples + WARM_UP {
        let mut order = [false, true];
        rng.shuffle(&mut order);
        for under in order {
            let running = if under { load } else { control };
            running.set(true);
            let trip = paths::round_trip(m, &rig).map_err(bench_err)?;
            running.set(false);
            match trip {
                Some(t) if round >= WARM_UP => {
                    if under { &mut loaded } else { &mut controlled }.push(t.round_trip)
                }
                Some(_) => {}
                None => lost += 1,
            }
        }
    }
    if let Some(e) = DemoError::lost([(name, lost)]) {
        return Err(e);
    }
    let p50 = |l: &mut Vec<Duration>| quantile(l, 0.5).as_nanos() as f64;
    Ok((p50(&mut controlled), p50(&mut loaded)))
}

/// Busy-waits `d`: a control load's unit.
fn spin(d: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < d {
        std::hint::spin_loop();
    }
}

const MSIX_N: u16 = 2048;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;

/// A 2048-vector MSI-X device whose first `unmasked` entries the guest has programmed and
/// unmasked, behind the function mask (nothing routed yet).
fn msix_device(m: &dyn Machine, unmasked: u16) -> Result<vmirq::msix::MsixVectors, vmirq::Error> {
    use vmirq::msix::{MsixTable, MsixVectors};
    let fail = |_| vmirq::Error::Unsupported("create 2048 MSI-X vectors");
    let vectors =
        MsixVectors::new(Arc::clone(m.interrupts()), MsixTable::new(MSIX_N)).map_err(fail)?;
    let msg = X86Msi::fixed(paths::TARGET_VCPU as u32, 0x90)
        .encode()
        .expect("fits");
    for v in 0..unmasked {
        let off = u64::from(v) * 16;
        vectors.bar_write(off, &msg.address_lo().to_le_bytes());
        vectors.bar_write(off + 8, &msg.data.to_le_bytes());
        vectors.bar_write(off + 12, &0u32.to_le_bytes());
    }
    vectors.write_message_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
    Ok(vectors)
}

/// ns for the guest lifting the function mask of `vectors`: every unmasked vector gets its
/// GSI, route (one commit) and kernel irqfd. Leaves the device enabled.
fn msix_enable(vectors: &vmirq::msix::MsixVectors, expect: u16) -> Result<f64, vmirq::Error> {
    let t0 = Instant::now();
    let events = vectors.write_message_control(MSIX_ENABLE);
    let ns = t0.elapsed().as_nanos() as f64;
    if !events.is_empty() || vectors.routed_vectors() != usize::from(expect) {
        return Err(vmirq::Error::Unsupported("route 2048 MSI-X vectors"));
    }
    Ok(ns)
}

/// The median of `reps` enables of `vectors` (disabled and function-masked between them).
fn msix_enable_median(
    vectors: &vmirq::msix::MsixVectors,
    expect: u16,
    reps: usize,
) -> Result<f64, vmirq::Error> {
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        vectors.write_message_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        times.push(msix_enable(vectors, expect)?);
        vectors.write_message_control(0);
        // Disabling deassigns 2048 kernel irqfds, whose teardown KVM finishes on a workqueue:
        // let it finish before the next timed enable, which would otherwise share a CPU with it.
        std::thread::sleep(Duration::from_millis(100));
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// MSI-X figures on `m`, in ns unless said: the guest enabling 2048 vectors as one batch;
/// unmasking them one commit per vector; heap bytes per enabled and routed vector; and
/// enabling 2048 vectors while another device's 2000 routes are in the table (2048 + 2000 +
/// the 40 default pin routes is as close to KVM's 4096-route table as two such devices fit).
fn msix_figures(m: &dyn Machine) -> Result<(f64, f64, f64, f64), vmirq::Error> {
    const REPS: usize = 7;
    const OTHER: u16 = 2000;
    let live0 = crate::alloc::live_bytes();
    let vectors = msix_device(m, MSIX_N)?;
    msix_enable(&vectors, MSIX_N)?;
    let per_vector_bytes = (crate::alloc::live_bytes() - live0) as f64 / f64::from(MSIX_N);
    vectors.write_message_control(0);
    let batched = msix_enable_median(&vectors, MSIX_N, REPS)?;
    // One at a time: the guest unmasks entry after entry, one commit each.
    let set_ctrl = |v: u16, masked: bool| {
        vectors.bar_write(u64::from(v) * 16 + 12, &u32::from(masked).to_le_bytes())
    };
    for v in 0..MSIX_N {
        set_ctrl(v, true);
    }
    vectors.write_message_control(MSIX_ENABLE);
    let t0 = Instant::now();
    for v in 0..MSIX_N {
        set_ctrl(v, false);
    }
    let one_by_one = t0.elapsed().as_nanos() as f64;
    vectors.write_message_control(0);
    // Next to another device whose routes stay in the table.
    let other = msix_device(m, OTHER)?;
    msix_enable(&other, OTHER)?;
    let next_to = msix_enable_median(&vectors, MSIX_N, REPS)?;
    drop(other);
    Ok((batched, one_by_one, per_vector_bytes, next_to))
}

/// Edge latency paths, all on one VM with the host's default halt polling: (name, baseline).
const EDGE_LATENCY: [(&str, Option<&str>); 4] = [
    ("msi-irqfd-kernel", None),
    ("msi-signal", Some("msi-irqfd-kernel")),
    ("msi-irqfd-user", Some("msi-irqfd-kernel")),
    ("xen2l-upcall", Some("msi-irqfd-kernel")),
];

/// Level latency paths: the kernel's resampler and vmirq's userspace IOAPIC necessarily run
/// on two VMs (in-kernel and split irqchip).
const LEVEL_LATENCY: [(&str, Mode, Option<&str>); 2] = [
    ("level-resample-kernel", Mode::Kernel, None),
    (
        "level-ioapic-split",
        Mode::Split,
        Some("level-resample-kernel"),
    ),
];

fn bench_err(source: vmirq::Error) -> DemoError {
    DemoError::Path {
        path: "bench",
        source,
    }
}

/// Samples taken of every path before measuring.
const WARM_UP: usize = 50;

/// Measures `lineup` (name, machine, baseline name) interleaved: after a warm-up, each round
/// samples every path once, in a new random order. What ran just before a sample (whose
/// threads are still settling, how deeply the CPUs idled) moves its latency by 2x on this
/// host, so a fixed order would bias each path by its predecessor. Level paths measure the
/// device's round trip (trigger → ISR → EOI → resamplefd) and also report its first leg.
fn latency_phase(
    lineup: &[(&str, &dyn Machine, Option<&str>)],
    samples: usize,
) -> Result<Vec<Result_>, DemoError> {
    let rigs: Vec<_> = lineup
        .iter()
        .map(|(name, m, _)| paths::rig(*m, name).map_err(bench_err))
        .collect::<Result<_, _>>()?;
    let mut lat: Vec<Vec<Duration>> = vec![Vec::with_capacity(samples); rigs.len()];
    let mut to_isr: Vec<Vec<Duration>> = vec![Vec::with_capacity(samples); rigs.len()];
    let mut lost = vec![0u64; rigs.len()];
    let mut order: Vec<usize> = (0..lineup.len()).collect();
    let mut rng = paths::XorShift(0x2545_F491_4F6C_DD1D);
    for round in 0..samples + WARM_UP {
        rng.shuffle(&mut order);
        for &i in &order {
            match paths::round_trip(lineup[i].1, &rigs[i]).map_err(bench_err)? {
                Some(trip) if round >= WARM_UP => {
                    lat[i].push(trip.round_trip);
                    to_isr[i].push(trip.isr);
                }
                Some(_) => {}
                None => lost[i] += 1,
            }
        }
    }
    if let Some(e) = DemoError::lost(lineup.iter().map(|(n, _, _)| *n).zip(lost)) {
        return Err(e);
    }
    let p50 = |l: &mut Vec<Duration>| quantile(l, 0.5).as_nanos() as f64;
    let round_trip: Vec<f64> = lat.iter_mut().map(p50).collect();
    let first_leg: Vec<f64> = to_isr.iter_mut().map(p50).collect();
    let index = |name: &str| lineup.iter().position(|(n, _, _)| *n == name);
    let mut results = Vec::new();
    for (suffix, values) in [("", &round_trip), (".to-isr", &first_leg)] {
        for (i, (name, _, base)) in lineup.iter().enumerate() {
            if !suffix.is_empty() && rigs[i].resample.is_none() {
                continue;
            }
            let base = base.and_then(|b| Some((format!("latency.{b}{suffix}"), values[index(b)?])));
            results.push(result(
                &format!("latency.{name}{suffix}"),
                values[i],
                "ns",
                base.as_ref().map(|(n, v)| (n.as_str(), *v)),
            ));
        }
    }
    Ok(results)
}

/// Run-time paths under configuration load, each against itself idle in the same phase (samples
/// alternate in a random order): a user-path trigger while another thread commits route
/// changes in a loop, and a split level round trip on one pin while the guest rewrites another
/// pin's redirection entry in a loop. Both VMs have halt polling off.
fn loaded_figures(
    kernel: &dyn Machine,
    split: &Arc<dyn Machine>,
    samples: usize,
) -> Result<Vec<Result_>, DemoError> {
    let mut results = Vec::new();
    // Route commits in a loop on the VM under test; the control spins as long as a commit
    // takes (calibrated on 32 commits).
    let interrupts = Arc::clone(kernel.interrupts());
    let (a, b) = (
        X86Msi::fixed(0, 0x7a).encode().expect("fits"),
        X86Msi::fixed(0, 0x7b).encode().expect("fits"),
    );
    let churn = interrupts.new_route(Route::msi(a)).map_err(bench_err)?;
    let t0 = Instant::now();
    for i in 0..32 {
        churn
            .set(Route::msi(if i % 2 == 0 { b } else { a }))
            .map_err(bench_err)?;
    }
    let per_commit = t0.elapsed() / 32;
    let flip = AtomicBool::new(false);
    let commits = Load::start(move || {
        let msg = if flip.fetch_xor(true, Ordering::Relaxed) {
            a
        } else {
            b
        };
        if let Err(e) = churn.set(Route::msi(msg)) {
            eprintln!("vmirq bench: route commit failed: {e}");
        }
    });
    let busy = Load::start(move || spin(per_commit));
    let (control, loaded) = loaded_latency(kernel, "msi-irqfd-user", &busy, &commits, samples)?;
    drop((commits, busy));
    results.push(result(
        "latency.msi-irqfd-user.under-spin",
        control,
        "ns",
        None,
    ));
    results.push(result(
        "latency.msi-irqfd-user.under-commits",
        loaded,
        "ns",
        Some(("latency.msi-irqfd-user.under-spin", control)),
    ));
    // The guest (vCPU 0) rewrites pin 7's entry while the path under test uses pin 18 on
    // vCPU 1. Under load the entry's vector alternates, so every write changes the pin's
    // kernel route and commits; the control makes the same writes with the mask bit
    // alternating instead (same exits, same IOAPIC work, no route change, no commit).
    let rte = |low: u32| {
        let base = vmirq::ioapic::IOAPIC_BASE as u32;
        [(base, 0x10 + 2 * 7), (base + 0x10, low)]
    };
    let masked = 1 << 16;
    let rewrite: Vec<(u32, u32)> = (0..8).flat_map(|i| rte((0x77 + i % 2) | masked)).collect();
    let remask: Vec<(u32, u32)> = (0..8).flat_map(|i| rte(0x77 | (i % 2) << 16)).collect();
    let guest_load = |script: Vec<(u32, u32)>| {
        let guest = Arc::clone(split);
        Load::start(move || {
            if let Err(e) = guest.guest_mmio(&script) {
                eprintln!("vmirq bench: guest RTE writes failed: {e}");
            }
        })
    };
    let (rewrites, remasks) = (guest_load(rewrite), guest_load(remask));
    let (control, loaded) =
        loaded_latency(&**split, "level-ioapic-split", &remasks, &rewrites, samples)?;
    drop((rewrites, remasks));
    results.push(result(
        "latency.level-ioapic-split.under-rte-masking",
        control,
        "ns",
        None,
    ));
    results.push(result(
        "latency.level-ioapic-split.under-rte-writes",
        loaded,
        "ns",
        Some(("latency.level-ioapic-split.under-rte-masking", control)),
    ));
    Ok(results)
}

pub fn run(kind: BackendKind, json: bool, samples: usize) -> Result<(), DemoError> {
    let kernel = boot(kind, &paths::machine_config(Mode::Kernel.irqchip()))?;
    // The FIFO upcall needs a guest of its own (its upcall runs the FIFO consumer), measured
    // in the same phase as the 2-level one, samples interleaved.
    let fifo_vm = boot(kind, &paths::machine_config(Mode::Kernel.irqchip()))?;
    let mut edge: Vec<_> = EDGE_LATENCY
        .iter()
        .map(|(name, base)| (*name, &*kernel, *base))
        .collect();
    edge.push(("xenfifo-upcall", &*fifo_vm, Some("xen2l-upcall")));
    let mut results = latency_phase(&edge, samples)?;
    // The level pair runs on two VMs that must wait alike. With the host's adaptive halt
    // polling, whichever VM's vCPU happens to poll wakes 2x faster and its path "wins" (the
    // ratio flips between runs); so both VMs here have halt polling off and every interrupt
    // pays the same wakeup.
    // (KVM_CAP_HALT_POLL is Linux 5.19+: without it, say so and measure as the host is.)
    let level_vm = |mode: Mode| {
        let mut config = paths::machine_config(mode.irqchip());
        config.halt_poll_ns = Some(0);
        boot(kind, &config).or_else(|e| {
            eprintln!("note: level paths measured with the host's halt polling ({e})");
            boot(kind, &paths::machine_config(mode.irqchip()))
        })
    };
    let level_kernel = level_vm(Mode::Kernel)?;
    let split: Arc<dyn Machine> = level_vm(Mode::Split)?.into();
    let level: Vec<_> = LEVEL_LATENCY
        .iter()
        .map(|(name, mode, base)| {
            let m: &dyn Machine = match mode {
                Mode::Kernel => &*level_kernel,
                Mode::Split => &*split,
            };
            (*name, m, *base)
        })
        .collect();
    results.extend(latency_phase(&level, samples)?);
    // Under load, on the two VMs with halt polling off: how fast an idle vCPU wakes must not
    // depend on what the host's adaptive polling learnt from the previous phase.
    results.extend(loaded_figures(&*level_kernel, &split, samples)?);
    drop(level_kernel);
    results.push(result(
        "line.assert-deassert",
        line_assert_deassert_ns(&*split),
        "ns",
        None,
    ));
    let m: &dyn Machine = &*kernel;
    let f = crate::xen_fifo::set_pending_figures().map_err(bench_err)?;
    results.push(result("atomic.floor-3-rmw", f.floor, "ns", None));
    let two_level = ("xen2l.set-pending", f.two_level);
    results.push(result(
        two_level.0,
        f.two_level,
        "ns",
        Some(("atomic.floor-3-rmw", f.floor)),
    ));
    results.push(result("xenfifo.set-pending", f.fifo, "ns", Some(two_level)));
    results.push(result(
        "xenfifo.set-pending.new-head",
        f.new_head,
        "ns",
        Some(two_level),
    ));
    // Xen timers: deadline → guest ISR on a VM of their own (its guest gets the timer's
    // event channels), against the event-channel upcall path measured above.
    let timer_vm = boot(kind, &paths::machine_config(Mode::Kernel.irqchip()))?;
    let timer = crate::bench_xen::timer_latency_ns(&*timer_vm, samples).map_err(bench_err)?;
    drop(timer_vm);
    // (The simulator's upcall takes no time: no ratio against it.)
    let upcall = results
        .iter()
        .find(|r| r.name == "latency.xen2l-upcall")
        .map(|r| r.value)
        .filter(|v| *v > 0.0);
    results.push(result(
        "latency.xen-timer",
        timer,
        "ns",
        upcall.map(|v| ("latency.xen2l-upcall", v)),
    ));
    let (armed, threads, cpu) = crate::bench_xen::idle_timers_cpu().map_err(bench_err)?;
    results.push(result("xen.timers-armed", armed as f64, "timers", None));
    results.push(result("xen.timer-threads", threads as f64, "threads", None));
    results.push(result("xen.timers-10000", cpu, "ns-cpu/s", None));
    let (batched, one_by_one, per_vector, next_to) = msix_figures(m).map_err(bench_err)?;
    results.push(result(
        "msix.unmask-2048.per-vector",
        one_by_one,
        "ns",
        None,
    ));
    results.push(result(
        "msix.unmask-2048",
        batched,
        "ns",
        Some(("msix.unmask-2048.per-vector", one_by_one)),
    ));
    results.push(result(
        "msix.enable-2048-next-to-2048",
        next_to,
        "ns",
        Some(("msix.unmask-2048", batched)),
    ));
    results.push(result("msix.bytes-per-vector", per_vector, "bytes", None));
    let per_irqfd = bytes_per_user_irqfd(m).map_err(bench_err)?;
    results.push(result(
        "dispatcher.bytes-per-irqfd",
        per_irqfd,
        "bytes",
        None,
    ));
    let idle = idle_cpu_ms_per_s(m, 1000).map_err(bench_err)?;
    results.push(result(
        "dispatcher.idle-cpu-1000-irqfds",
        idle,
        "cpu-ms/s",
        None,
    ));
    let (threads, event_loop) = dispatcher_threads(m, kind, 1000).map_err(bench_err)?;
    results.push(result("dispatcher.threads-idle", threads, "threads", None));
    results.push(result("eventloop.threads", event_loop, "threads", None));
    let (downtime_us, bytes) = crate::bench_snapshot::figures(kind).map_err(bench_err)?;
    results.push(result(
        "snapshot.pause-save-restore-resume",
        downtime_us,
        "us",
        None,
    ));
    results.push(result("snapshot.bytes", bytes, "bytes", None));
    if json {
        let report = Report {
            backend: m.kind(),
            results,
        };
        println!(
            "{}",
            serde_json::to_string(&report).expect("plain data serializes")
        );
    } else {
        println!(
            "backend: {} ({samples} interleaved samples per latency path; level paths: trigger -> ISR -> EOI -> resamplefd{})",
            m.kind(),
            if m.kind() == "kvm" { ", halt polling off" } else { "" }
        );
        for r in &results {
            let value = if r.unit == "ns" {
                human_ns(r.value as u64)
            } else {
                format!("{:.1} {}", r.value, r.unit)
            };
            match (&r.baseline, r.ratio) {
                (Some(b), Some(ratio)) => {
                    println!("{:<34} {:>12}   {ratio:.2}x {b}", r.name, value)
                }
                _ => println!("{:<34} {:>12}", r.name, value),
            }
        }
    }
    Ok(())
}
