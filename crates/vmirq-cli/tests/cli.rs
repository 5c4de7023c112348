//! The `vmirq` binary end to end: the demo's JSON report and the bench's figures.

use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

/// The KVM runs take turns: the demo and the bench each keep vCPUs busy, and on a 2-CPU host
/// one starving the other would measure the host, not vmirq.
static KVM: Mutex<()> = Mutex::new(());

fn vmirq(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_vmirq"))
        .args(args)
        .output()
        .expect("vmirq runs");
    assert!(
        out.status.success(),
        "vmirq {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

/// Live migrations the demo runs in these tests.
const MIGRATIONS: u64 = 5;

fn check_demo(report: &Value, backend: &str, paced: u64) {
    assert_eq!(report["backend"], backend);
    let paths = report["paths"].as_array().unwrap();
    let names: Vec<&str> = paths.iter().map(|p| p["path"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "msi-signal",
            "msi-irqfd-kernel",
            "msi-irqfd-user",
            "pin-edge",
            "level-resample-kernel",
            "level-ioapic-split",
            "msix",
            "xen-2l",
            "xen-timer",
            "xen-fifo",
            "migrate",
        ]
    );
    for p in paths {
        let n = |k: &str| {
            p[k].as_u64()
                .unwrap_or_else(|| panic!("{k} missing in {p}"))
        };
        assert_eq!(n("lost"), 0, "{p}");
        if p["path"] == "migrate" {
            // Six paced paths fired inside each migration, each delivered exactly once.
            assert_eq!(n("sent"), 6 * MIGRATIONS, "{p}");
            assert_eq!(n("delivered"), n("sent"), "{p}");
        } else if p["path"] == "xen-timer" {
            // 200 single-shot timers, each delivered once.
            assert_eq!(n("sent"), 200, "{p}");
            assert_eq!(n("delivered"), 200, "{p}");
        } else if p["path"] == "xen-fifo" {
            // 12 rounds over a port per (vCPU, priority): 128 simulated vCPUs, 48 on KVM;
            // each round waits for every event, so none coalesce.
            let vcpus = if backend == "kvm" { 48 } else { 128 };
            assert_eq!(n("sent"), 12 * 16 * vcpus, "{p}");
            assert_eq!(n("delivered"), n("sent"), "{p}");
        } else if p["path"] == "msix" || p["path"] == "xen-2l" {
            // 1,000 events over 64 vectors / 32 ports; events on masked ones coalesce.
            assert_eq!(n("sent"), 1000, "{p}");
            assert!(n("delivered") >= 32, "{p}");
        } else {
            assert_eq!(n("sent"), paced + 100, "{p}");
            assert!(
                n("delivered") > paced,
                "paced triggers each deliver, and the burst too: {p}"
            );
        }
        assert_eq!(
            n("delivered") + n("coalesced") + n("lost"),
            n("sent"),
            "{p}"
        );
        assert!(n("p50_ns") > 0 && n("p50_ns") <= n("p99_ns"), "{p}");
    }
}

#[test]
fn demo_on_the_simulated_backend_loses_nothing() {
    check_demo(
        &vmirq(&["demo", "--sim", "--json", "--count", "20", "--migrate", "5"]),
        "sim",
        20,
    );
}

#[test]
fn demo_on_kvm_loses_nothing() {
    if !vmirq_kvm_gate("cli::demo_on_kvm_loses_nothing") {
        return;
    }
    let _turn = KVM.lock().unwrap_or_else(|e| e.into_inner());
    check_demo(
        &vmirq(&["demo", "--json", "--count", "20", "--migrate", "5"]),
        "kvm",
        20,
    );
}

#[test]
fn bench_reports_each_figure_against_its_baseline() {
    check_bench(
        &vmirq(&["bench", "--sim", "--json", "--samples", "20"]),
        "sim",
    );
}

#[test]
fn bench_on_kvm_reports_each_figure_against_its_baseline() {
    if !vmirq_kvm_gate("cli::bench_on_kvm_reports_each_figure_against_its_baseline") {
        return;
    }
    let _turn = KVM.lock().unwrap_or_else(|e| e.into_inner());
    check_bench(&vmirq(&["bench", "--json", "--samples", "20"]), "kvm");
}

fn check_bench(report: &Value, backend: &str) {
    assert_eq!(report["backend"], backend);
    let results = report["results"].as_array().unwrap();
    let get = |name: &str| {
        results
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    let pairs = [
        ("latency.msi-signal", "latency.msi-irqfd-kernel"),
        ("latency.msi-irqfd-user", "latency.msi-irqfd-kernel"),
        ("latency.xen2l-upcall", "latency.msi-irqfd-kernel"),
        (
            "latency.level-ioapic-split",
            "latency.level-resample-kernel",
        ),
        (
            "latency.level-ioapic-split.to-isr",
            "latency.level-resample-kernel.to-isr",
        ),
        ("xen2l.set-pending", "atomic.floor-3-rmw"),
        ("xenfifo.set-pending", "xen2l.set-pending"),
        ("xenfifo.set-pending.new-head", "xen2l.set-pending"),
        ("msix.unmask-2048", "msix.unmask-2048.per-vector"),
    ];
    for (name, baseline) in pairs {
        let r = get(name);
        assert_eq!(r["baseline"], baseline);
        let ratio = r["ratio"].as_f64().unwrap();
        let expect = r["value"].as_f64().unwrap() / r["baseline_value"].as_f64().unwrap();
        assert!((ratio - expect).abs() < 1e-9);
    }
    assert!(get("dispatcher.bytes-per-irqfd")["value"].as_f64().unwrap() > 0.0);
    assert!(get("line.assert-deassert")["value"].as_f64().unwrap() > 0.0);
    assert!(get("msix.bytes-per-vector")["value"].as_f64().unwrap() > 0.0);
    assert!(
        get("snapshot.pause-save-restore-resume")["value"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(get("snapshot.bytes")["value"].as_f64().unwrap() > 0.0);
    // Against the upcall path where that has a latency (the simulator's is 0).
    assert!(get("latency.xen-timer")["value"].as_f64().unwrap() > 0.0);
    if backend == "kvm" {
        assert_eq!(get("latency.xen-timer")["baseline"], "latency.xen2l-upcall");
    }
    // The FIFO upcall, on a guest of its own, against the 2-level one (a ratio where the
    // simulator's upcall takes time at all).
    let fifo = get("latency.xenfifo-upcall");
    assert_eq!(fifo["baseline"], "latency.xen2l-upcall");
    if backend == "kvm" {
        assert!(fifo["ratio"].as_f64().unwrap() > 0.0);
    }
    // 40 guests × 128 vCPUs × 2 timers, served by one thread.
    assert_eq!(get("xen.timers-armed")["value"].as_f64(), Some(10240.0));
    assert_eq!(get("xen.timer-threads")["value"].as_f64(), Some(1.0));
    assert!(get("xen.timers-10000")["value"].as_f64().unwrap() >= 0.0);
}

fn vmirq_kvm_gate(name: &str) -> bool {
    vmirq_guest::machine::kvm_test_gate(name)
}

#[test]
fn a_zero_count_is_refused_in_one_line() {
    for args in [["bench", "--samples", "0"], ["demo", "--count", "0"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_vmirq"))
            .args(args)
            .output()
            .expect("vmirq runs");
        assert!(!out.status.success(), "{args:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or_default();
        assert!(first.contains("must be at least 1"), "{args:?}: {err}");
    }
}
