//! Smoke test of vmirq-kvm and the real-mode guest together, on both irqchip modes:
//! KVM_SIGNAL_MSI to each vCPU, an MSI irqfd, and an IOAPIC pin: in-kernel (programmed by the
//! guest's boot MMIO script) or, on a split irqchip, a reserved-pin level MSI whose EOI KVM
//! hands back to userspace.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmirq::{Backend, BackendError, EoiSink, Gsi, KernelRoute, MsiMessage, Route, X86Msi};
use vmirq_guest::layout::{ioapic_redtbl_lo, IOAPIC_IOREGSEL, IOAPIC_IOWIN, ISR_PORT, READY_PORT};
use vmirq_guest::program::{self, GuestImage};
use vmirq_kvm::{IrqchipMode, KvmVm, KvmVmConfig, VcpuExitHandler};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const WAIT: Duration = Duration::from_secs(5);
const VCPUS: usize = 2;
const MEM_SIZE: usize = 1 << 20;
const MSI_GSI: Gsi = Gsi::from_raw(40);
const IOAPIC_PIN: u32 = 5;

/// Serialises the two tests: they share 2 host cores and print latencies.
static SERIAL: Mutex<()> = Mutex::new(());

#[derive(Default)]
struct Exits {
    ready: Vec<(usize, u8)>,
    isr: Vec<(usize, u8, Instant)>,
    eois: Vec<u8>,
    failed: Vec<(usize, String)>,
}

/// Records READY and ISR port writes and EOI exits; tests wait on it.
#[derive(Default)]
struct Recorder {
    exits: Mutex<Exits>,
    changed: Condvar,
}

impl Recorder {
    fn lock(&self) -> MutexGuard<'_, Exits> {
        self.exits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `done` holds, failing the test after [`WAIT`] or on a vCPU failure.
    fn wait_for<T>(&self, what: &str, mut done: impl FnMut(&Exits) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        let mut exits = self.lock();
        loop {
            if let Some(v) = done(&exits) {
                return v;
            }
            assert!(exits.failed.is_empty(), "vCPU failed: {:?}", exits.failed);
            let now = Instant::now();
            assert!(
                now < deadline,
                "timed out after {WAIT:?} waiting for {what}"
            );
            exits = self
                .changed
                .wait_timeout(exits, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits for the `n`th ISR exit of (vcpu, vector) and returns its time.
    fn wait_isr(&self, vcpu: usize, vector: u8, n: usize) -> Instant {
        self.wait_for(
            &format!("ISR #{n} of vector {vector:#x} on vCPU {vcpu}"),
            |e| {
                e.isr
                    .iter()
                    .filter(|(c, v, _)| *c == vcpu && *v == vector)
                    .nth(n - 1)
                    .map(|(_, _, t)| *t)
            },
        )
    }

    fn isr_count(&self, vcpu: usize, vector: u8) -> usize {
        let exits = self.lock();
        exits
            .isr
            .iter()
            .filter(|(c, v, _)| *c == vcpu && *v == vector)
            .count()
    }
}

impl VcpuExitHandler for Recorder {
    fn pio_out(&self, vcpu: usize, port: u16, data: &[u8]) {
        let now = Instant::now();
        let Some(&byte) = data.first() else { return };
        match port {
            ISR_PORT => self.lock().isr.push((vcpu, byte, now)),
            READY_PORT => self.lock().ready.push((vcpu, byte)),
            _ => return, // PIC mask writes on a split irqchip, ...
        }
        self.changed.notify_all();
    }

    fn mmio_read(&self, _vcpu: usize, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn mmio_write(&self, _vcpu: usize, _addr: u64, _data: &[u8]) {}

    fn vcpu_failed(&self, vcpu: usize, reason: String) {
        self.lock().failed.push((vcpu, reason));
        self.changed.notify_all();
    }
}

impl EoiSink for Recorder {
    fn eoi(&self, vector: u8) {
        self.lock().eois.push(vector);
        self.changed.notify_all();
    }
}

fn msi(dest: u32, vector: u8) -> MsiMessage {
    X86Msi::fixed(dest, vector).encode().unwrap()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

fn counter(vm: &KvmVm, vcpu: usize, vector: u8) -> u32 {
    program::try_read_counter(vm.memory(), vcpu, vector).unwrap()
}

/// Boots a 2-vCPU VM in `mode` and waits until both vCPUs are ready.
fn boot(mode: IrqchipMode, script: &[(u32, u32)]) -> (KvmVm, Arc<Recorder>) {
    let mut vm = KvmVm::new(KvmVmConfig {
        vcpus: VCPUS,
        mem_size: MEM_SIZE,
        irqchip: mode,
        halt_poll_ns: None,
    })
    .unwrap();
    let image: GuestImage = program::build();
    program::load(vm.memory(), &image, script).unwrap();
    let recorder = Arc::new(Recorder::default());
    vm.start(&image.boot(VCPUS).unwrap(), recorder.clone())
        .unwrap();
    let mut ready = recorder.wait_for("both vCPUs to report ready", |e| {
        (e.ready.len() >= VCPUS).then(|| e.ready.clone())
    });
    ready.sort_unstable();
    assert_eq!(
        ready,
        vec![(0, 0), (1, 1)],
        "(vCPU, APIC ID) of READY writes"
    );
    (vm, recorder)
}

fn smoke(mode: IrqchipMode) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !vmirq_kvm::kvm_test_gate(&format!("kvm_smoke({mode:?})")) {
        return;
    }
    let kernel = mode == IrqchipMode::Kernel;
    // In-kernel IOAPIC pin 5: vector 0x45, fixed, physical, edge, active high, unmasked,
    // destination APIC 0.
    let script = if kernel {
        vec![
            (IOAPIC_IOREGSEL, ioapic_redtbl_lo(IOAPIC_PIN)),
            (IOAPIC_IOWIN, 0x45),
            (IOAPIC_IOREGSEL, ioapic_redtbl_lo(IOAPIC_PIN) + 1),
            (IOAPIC_IOWIN, 0),
        ]
    } else {
        Vec::new()
    };
    let (mut vm, rec) = boot(mode, &script);
    let backend = vm.backend();

    // One MSI to vCPU 1.
    backend.signal_msi(msi(1, 0x40), None).unwrap();
    rec.wait_isr(1, 0x40, 1);
    assert_eq!(counter(&vm, 1, 0x40), 1);
    // Control on vCPU 0 before checking it took nothing.
    backend.signal_msi(msi(0, 0x31), None).unwrap();
    rec.wait_isr(0, 0x31, 1);
    assert_eq!(
        counter(&vm, 0, 0x40),
        0,
        "vCPU 0 must not take vCPU 1's MSI"
    );

    // 100 paced MSIs to vCPU 0.
    let mut msi_latency = Vec::new();
    for n in 1..=100 {
        let t0 = Instant::now();
        backend.signal_msi(msi(0, 0x41), None).unwrap();
        msi_latency.push(rec.wait_isr(0, 0x41, n) - t0);
    }
    assert_eq!(counter(&vm, 0, 0x41), 100);

    // A kernel irqfd on an MSI route to vCPU 1.
    let msi_route = KernelRoute {
        gsi: MSI_GSI,
        route: Route::msi(msi(1, 0x42)),
    };
    backend.commit_routes(&[msi_route]).unwrap();
    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    backend.assign_irqfd(&irqfd, MSI_GSI, None).unwrap();
    assert!(matches!(
        backend.assign_irqfd(&irqfd, MSI_GSI, None),
        Err(BackendError::IrqfdBusy)
    ));
    let mut irqfd_latency = Vec::new();
    for n in 1..=20 {
        let t0 = Instant::now();
        irqfd.write(1).unwrap();
        irqfd_latency.push(rec.wait_isr(1, 0x42, n) - t0);
    }
    assert_eq!(counter(&vm, 1, 0x42), 20);
    backend.deassign_irqfd(&irqfd, MSI_GSI).unwrap();
    assert!(matches!(
        backend.deassign_irqfd(&irqfd, MSI_GSI),
        Err(BackendError::IrqfdNotFound(MSI_GSI))
    ));

    if kernel {
        // IOAPIC pin 5, programmed by the guest's boot script, raised by KVM_IRQ_LINE.
        let pin_route = KernelRoute {
            gsi: Gsi::from_raw(IOAPIC_PIN),
            route: Route::ioapic(IOAPIC_PIN),
        };
        backend.commit_routes(&[msi_route, pin_route]).unwrap();
        backend.set_line(Gsi::from_raw(IOAPIC_PIN), true).unwrap();
        backend.set_line(Gsi::from_raw(IOAPIC_PIN), false).unwrap();
        rec.wait_isr(0, 0x45, 1);
        // Control: a lower vector after the edge; a second 0x45 would be taken before it.
        backend.signal_msi(msi(0, 0x30), None).unwrap();
        rec.wait_isr(0, 0x30, 1);
        assert_eq!(rec.isr_count(0, 0x45), 1, "an edge pin fires once");
        assert_eq!(counter(&vm, 0, 0x45), 1);
    } else {
        assert!(matches!(
            backend.set_line(Gsi::from_raw(IOAPIC_PIN), true),
            Err(BackendError::Unsupported(_))
        ));
        assert!(!backend.supports_resample());

        // A level MSI on a reserved pin GSI: KVM exits with KVM_EXIT_IOAPIC_EOI when the
        // guest EOIs the vector, and the backend hands it to the EOI sink.
        let sink: Arc<dyn EoiSink> = rec.clone();
        backend.set_eoi_sink(Arc::downgrade(&sink));
        let mut level = X86Msi::fixed(0, 0x43);
        level.trigger_level = true;
        level.level_assert = true;
        let pin_route = KernelRoute {
            gsi: Gsi::from_raw(IOAPIC_PIN),
            route: Route::msi(level.encode().unwrap()),
        };
        backend.commit_routes(&[msi_route, pin_route]).unwrap();
        let pin_fd = EventFd::new(EFD_NONBLOCK).unwrap();
        backend
            .assign_irqfd(&pin_fd, Gsi::from_raw(IOAPIC_PIN), None)
            .unwrap();
        pin_fd.write(1).unwrap();
        rec.wait_isr(0, 0x43, 1);
        rec.wait_for("the EOI exit of vector 0x43", |e| {
            e.eois.contains(&0x43).then_some(())
        });
        assert_eq!(counter(&vm, 0, 0x43), 1);
        assert!(
            !rec.lock().eois.contains(&0x41),
            "edge vectors must not cause EOI exits"
        );
    }

    println!(
        "{mode:?}: median trigger→ISR exit: KVM_SIGNAL_MSI {:?} (n=100), MSI irqfd {:?} (n=20)",
        median(msi_latency),
        median(irqfd_latency)
    );

    let t0 = Instant::now();
    vm.stop();
    let stopped = t0.elapsed();
    assert!(!vm.is_running());
    assert!(stopped < WAIT, "stop took {stopped:?}");
    println!("{mode:?}: stop() with halted vCPUs took {stopped:?}");
    assert!(rec.lock().failed.is_empty(), "{:?}", rec.lock().failed);
}

#[test]
fn kernel_irqchip_delivers_msi_irqfd_and_ioapic_pin() {
    smoke(IrqchipMode::Kernel);
}

#[test]
fn split_irqchip_delivers_msi_irqfd_and_level_eoi_exits() {
    smoke(IrqchipMode::Split { ioapic_pins: 24 });
}
