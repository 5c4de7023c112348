//! `vmirq bench`: each figure with its ratio to a baseline measured in the same run.
//! Samples of the paths are interleaved round-robin, so drift hits every path alike.

use std::time::{Duration, Instant};

use serde::Serialize;
use vmirq::{IrqfdPath, Route, X86Msi};
use vmirq_guest::machine::{boot, BackendKind, Machine};
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

const LATENCY_PATHS: [&str; 3] = ["msi-irqfd-kernel", "msi-signal", "msi-irqfd-user"];
const IRQFDS_FOR_MEMORY: usize = 1000;

/// Heap bytes the core spends per userspace irqfd (dispatcher entry, registry, handle).
fn bytes_per_user_irqfd(m: &dyn Machine) -> Result<f64, vmirq::Error> {
    let irq = m.interrupts();
    let gsi = irq.allocate_gsi()?;
    let mut batch = irq.routes();
    batch.set(
        gsi.gsi(),
        Route::msi(X86Msi::fixed(0, 0x7e).encode().expect("fits")),
    )?;
    batch.commit()?;
    let fds: Vec<EventFd> = (0..IRQFDS_FOR_MEMORY)
        .map(|_| EventFd::new(0).map_err(|_| vmirq::Error::BadEventFd))
        .collect::<Result<_, _>>()?;
    // One irqfd first, so the dispatcher thread and its tables exist before measuring.
    let warm = irq.assign_irqfd_on(&fds[0], gsi.gsi(), Some(IrqfdPath::User))?;
    let before = crate::alloc::live_bytes();
    let irqfds: Vec<_> = fds[1..]
        .iter()
        .map(|fd| irq.assign_irqfd_on(fd, gsi.gsi(), Some(IrqfdPath::User)))
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
    let gsi = irq.allocate_gsi()?;
    let mut batch = irq.routes();
    batch.set(
        gsi.gsi(),
        Route::msi(X86Msi::fixed(0, 0x7d).encode().expect("fits")),
    )?;
    batch.commit()?;
    let fds: Vec<EventFd> = (0..n)
        .map(|_| EventFd::new(0).map_err(|_| vmirq::Error::BadEventFd))
        .collect::<Result<_, _>>()?;
    let _irqfds: Vec<_> = fds
        .iter()
        .map(|fd| irq.assign_irqfd_on(fd, gsi.gsi(), Some(IrqfdPath::User)))
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

pub fn run(kind: BackendKind, json: bool, samples: usize) -> Result<(), DemoError> {
    let machine = boot(kind, &paths::machine_config(vmirq::IrqchipMode::Kernel))?;
    let m: &dyn Machine = &*machine;
    let rigs: Vec<_> = LATENCY_PATHS
        .iter()
        .map(|p| {
            paths::rig(m, p).map_err(|source| DemoError::Path {
                path: "bench",
                source,
            })
        })
        .collect::<Result<_, _>>()?;
    let bench_err = |source| DemoError::Path {
        path: "bench",
        source,
    };
    let mut lat: Vec<Vec<Duration>> = vec![Vec::with_capacity(samples); rigs.len()];
    // Warm up every path, then interleave.
    for _ in 0..50 {
        for rig in &rigs {
            paths::round_trip(m, rig, Duration::from_secs(2)).map_err(bench_err)?;
        }
    }
    let mut lost = 0u64;
    for _ in 0..samples {
        for (i, rig) in rigs.iter().enumerate() {
            match paths::round_trip(m, rig, Duration::from_secs(2)).map_err(bench_err)? {
                Some(d) => lat[i].push(d),
                None => lost += 1,
            }
        }
    }
    if lost > 0 {
        return Err(DemoError::Lost(lost));
    }
    let p50: Vec<f64> = lat
        .iter_mut()
        .map(|l| quantile(l, 0.5).as_nanos() as f64)
        .collect();
    let base = ("latency.msi-irqfd-kernel", p50[0]);
    let mut results = vec![
        result(base.0, p50[0], "ns", None),
        result("latency.msi-signal", p50[1], "ns", Some(base)),
        result("latency.msi-irqfd-user", p50[2], "ns", Some(base)),
    ];
    drop(rigs);
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
            "backend: {} ({samples} interleaved samples per latency path)",
            m.kind()
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
