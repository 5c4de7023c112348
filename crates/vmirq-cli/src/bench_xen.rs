//! Xen timer figures: `latency.xen-timer` (a single-shot timer's deadline → the guest's ISR,
//! through the shared timer thread, VIRQ_TIMER and the upcall vector) and `xen.timers-10000`
//! (CPU the process uses while 10,240 vCPU timers are armed an hour ahead: one thread asleep).

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmirq::xen::{attach, EventChannels, UpcallSink, XenConfig};
use vmirq_guest::layout::{XEN_SHARED_INFO, XEN_UPCALL_VECTOR};
use vmirq_guest::machine::Machine;

use crate::paths::TARGET_VCPU;
use crate::report::quantile;

/// How far ahead each sample's timer is armed.
const AHEAD: Duration = Duration::from_micros(200);
const WAIT: Duration = Duration::from_secs(5);
/// `EVTCHNOP_bind_virq` and `VIRQ_TIMER`.
const BIND_VIRQ: u32 = 1;
const VIRQ_TIMER: u32 = 0;
/// Where the host writes hypercall arguments in the test guest.
const ARGS: u64 = vmirq_guest::layout::SCRATCH;

fn fail(what: &'static str) -> vmirq::Error {
    vmirq::Error::Unsupported(what)
}

/// Binds VIRQ_TIMER on `vcpu` through `ch`'s hypercall, arguments in guest memory.
fn bind_timer(ch: &EventChannels, mem: &GuestMemoryMmap, vcpu: u32) -> Result<u32, vmirq::Error> {
    let args = [VIRQ_TIMER, vcpu, 0];
    mem.write_obj(args, GuestAddress(ARGS))
        .map_err(|_| fail("write the bind_virq arguments"))?;
    if ch.hypercall(0, BIND_VIRQ, ARGS) != 0 {
        return Err(fail("bind VIRQ_TIMER"));
    }
    mem.read_obj::<u32>(GuestAddress(ARGS + 8))
        .map_err(|_| fail("read the VIRQ_TIMER port"))
}

/// `n` single-shot timers on `m`'s guest (to which nothing else attached Xen), one at a time,
/// each armed 200 µs ahead: the latency of each from its deadline to the guest's ISR of its
/// upcall, how many never arrived, and how many VIRQ_TIMER events the guest consumed.
pub fn timer_samples(
    m: &dyn Machine,
    n: usize,
    mut step: impl FnMut(),
) -> Result<(Vec<Duration>, u64, u64), vmirq::Error> {
    let mem = m
        .guest_memory()
        .ok_or(fail("emulate Xen without guest memory"))?
        .clone();
    let config = XenConfig {
        vcpus: 2,
        long_mode: false,
        shared_info_gpa: XEN_SHARED_INFO,
        domid: 1,
    };
    let (ch, upcalls) = attach(m.interrupts(), mem.clone(), config);
    let vcpu = TARGET_VCPU as u32;
    upcalls
        .set_upcall_vector(vcpu, Some(XEN_UPCALL_VECTOR))
        .map_err(|_| fail("set the Xen upcall vector"))?;
    m.wait_isr(Some(TARGET_VCPU), XEN_UPCALL_VECTOR, WAIT)
        .ok_or(fail("take the upcall vector's first injection"))?;
    let port = bind_timer(&ch, &mem, vcpu)?;
    let before = m.port_counter(port);
    let (mut lat, mut lost) = (Vec::with_capacity(n), 0);
    for _ in 0..n {
        let deadline = Instant::now() + AHEAD;
        let at = ch.guest_time() + AHEAD.as_nanos() as u64;
        let expect = m.port_counter(port) + 1;
        ch.set_singleshot_timer(vcpu, vcpu, at)?;
        let isr = m.wait_isr(Some(TARGET_VCPU), XEN_UPCALL_VECTOR, WAIT);
        // The guest counts the port inside the upcall's handler, before its ISR report.
        let counted = m.wait_port_count(port, expect, WAIT) >= expect;
        match isr {
            Some(ev) if counted => lat.push(ev.at.saturating_duration_since(deadline)),
            _ => lost += 1,
        }
        step();
    }
    m.control(TARGET_VCPU);
    let consumed = u64::from(m.port_counter(port) - before);
    Ok((lat, lost, consumed))
}

/// Median ns from a single-shot timer's deadline to the guest ISR of its upcall, on `m`.
pub fn timer_latency_ns(m: &dyn Machine, samples: usize) -> Result<f64, vmirq::Error> {
    let warm_up = samples / 10;
    let (lat, lost, _) = timer_samples(m, samples + warm_up, || {})?;
    if lost != 0 {
        return Err(fail("deliver every Xen timer"));
    }
    let mut measured = lat[warm_up..].to_vec();
    Ok(quantile(&mut measured, 0.5).as_nanos() as f64)
}

struct NoUpcall;
impl UpcallSink for NoUpcall {
    fn upcall(&self, _vcpu: u32) {}
}

/// How many of this process's threads are named `name`, and their nanoseconds on a CPU (the
/// kernel's per-thread `schedstat`).
fn threads_cpu(name: &str) -> (usize, Duration) {
    let (mut n, mut ns) = (0, 0u64);
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let path = task.path();
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            if comm.trim_end() != name {
                continue;
            }
            n += 1;
            let stat = std::fs::read_to_string(path.join("schedstat")).unwrap_or_default();
            ns += stat
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (n, Duration::from_nanos(ns))
}

/// Timers armed (each guest's 128 vCPUs × single-shot and periodic), the threads serving them,
/// and the CPU ns those threads use per second of wall time while the timers wait an hour
/// ahead.
pub fn idle_timers_cpu() -> Result<(usize, usize, f64), vmirq::Error> {
    const GUESTS: usize = 40;
    const VCPUS: u32 = 128;
    let hour = 3_600_000_000_000u64;
    let mut guests = Vec::new();
    for _ in 0..GUESTS {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2_1000)])
            .map_err(|_| fail("map the timer bench's memory"))?;
        let config = XenConfig {
            vcpus: VCPUS,
            long_mode: true,
            shared_info_gpa: 0x2_0000,
            domid: 1,
        };
        let ch = Arc::new(EventChannels::new(mem, config, Arc::new(NoUpcall)));
        for vcpu in 0..VCPUS {
            ch.set_singleshot_timer(vcpu, vcpu, ch.guest_time() + hour)?;
            ch.set_periodic_timer(vcpu, hour)?;
        }
        guests.push(ch);
    }
    let armed = vmirq::xen::timer_service().armed();
    let name = "vmirq-xen-timer";
    let (wall, (threads, cpu)) = (Instant::now(), threads_cpu(name));
    if threads == 0 {
        return Err(fail("find the Xen timer thread"));
    }
    std::thread::sleep(Duration::from_secs(1));
    let used = threads_cpu(name).1.saturating_sub(cpu);
    let per_second = used.as_nanos() as f64 / wall.elapsed().as_secs_f64();
    drop(guests);
    Ok((armed, threads, per_second))
}
