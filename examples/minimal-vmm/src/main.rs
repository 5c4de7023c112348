//! A minimal VMM written straight on `kvm-ioctls` that adopts vmirq.
//!
//! The VMM owns everything a real one owns: the VM, its guest RAM, the vCPU threads and their
//! run loop, and its own event loop. vmirq gets an `Arc<VmFd>` (through
//! `vmirq_kvm::KvmBackend::new`) and is called from the VMM's loops:
//!
//! - vCPU exits: IOAPIC MMIO → `Interrupts::mmio_read/mmio_write`, `KVM_EXIT_IOAPIC_EOI` →
//!   `KvmBackend::ioapic_eoi`, the MSI-X BAR → `MsixVectors::bar_read/bar_write`;
//! - the event loop polls `Interrupts::event_fd()` and calls `Interrupts::service()`
//!   (event-loop mode: vmirq starts no thread).
//!
//! It boots vmirq's real-mode test guest on a split irqchip with 2 vCPUs; the guest programs
//! the IOAPIC (a level pin and an edge pin) and an 8-vector MSI-X device (table placed after
//! the PBA in its BAR). The VMM then fires every path and checks the guest's counters.
//! Exits 0 when every interrupt arrived exactly once, 1 otherwise; without /dev/kvm it says
//! `SKIPPED (no /dev/kvm)` and exits 0.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmirq::msix::{MsixLayout, MsixTable, MsixVectors};
use vmirq::{Config, Dispatch, Interrupts, IrqchipMode, X86Msi};
use vmirq_guest::{layout, program};
use vmirq_kvm::KvmBackend;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const VCPUS: usize = 2;
const RAM: usize = 1 << 20;
const PINS: u32 = 24;
const LEVEL_PIN: u32 = 18;
const LEVEL_VECTOR: u8 = 0x5A;
const EDGE_PIN: u32 = 5;
const EDGE_VECTOR: u8 = 0x45;
const MSIX_BAR: u64 = 0xE000_0000;
const MSIX_VECTORS: u16 = 8;
const MSIX_FIRST_VECTOR: u8 = 0x60;
/// The device declares its PBA at the start of the BAR and its table after it.
const MSIX_LAYOUT: MsixLayout = MsixLayout {
    table: 0x1000,
    pba: 0,
};
const ROUNDS: u64 = 20;
const WAIT: Duration = Duration::from_secs(5);

type Error = Box<dyn std::error::Error>;

/// What the VMM's vCPU loop needs: its devices and vmirq.
struct Devices {
    interrupts: Arc<Interrupts>,
    backend: Arc<KvmBackend>,
    msix: MsixVectors,
    ready: AtomicU64,
    isrs: AtomicU64,
    failed: AtomicBool,
}

fn main() {
    if !vmirq_kvm::kvm_test_gate("examples/minimal-vmm") {
        println!("minimal-vmm: SKIPPED (no /dev/kvm)");
        return;
    }
    match run() {
        Ok(()) => println!("minimal-vmm: every interrupt arrived exactly once"),
        Err(e) => {
            eprintln!("minimal-vmm: {e}");
            std::process::exit(1);
        }
    }
    // The vCPU threads halt forever in the guest's idle loop; the process ends them.
    std::process::exit(0);
}

fn run() -> Result<(), Error> {
    // The VMM's own VM: a split irqchip (LAPICs in KVM, the IOAPIC is vmirq's), RAM at 0.
    let kvm = Kvm::new()?;
    let vm = Arc::new(kvm.create_vm()?);
    let mut cap = kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_SPLIT_IRQCHIP,
        ..Default::default()
    };
    cap.args[0] = u64::from(PINS);
    vm.enable_cap(&cap)?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)])?;
    for (slot, region) in mem.iter().enumerate() {
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the mapping outlives the VM: this process exits with both still alive.
        unsafe { vm.set_user_memory_region(desc)? };
    }
    let vcpus: Vec<VcpuFd> = (0..VCPUS)
        .map(|id| vm.create_vcpu(id as u64))
        .collect::<Result<_, _>>()?;

    // vmirq adopted: a backend on the VMM's VM, userspace irqfds served by the VMM's loop.
    let backend = Arc::new(KvmBackend::new(
        Arc::clone(&vm),
        IrqchipMode::Split { ioapic_pins: PINS },
    ));
    let config = Config {
        dispatch: Dispatch::EventLoop,
        ..Config::default()
    };
    let interrupts = Interrupts::new(backend.clone(), config)?;
    let msix = MsixVectors::with_layout(
        Arc::clone(&interrupts),
        MsixTable::new(MSIX_VECTORS),
        MSIX_LAYOUT,
    )?;
    msix.write_message_control(1 << 15); // config space: MSI-X enable
    let devices = Arc::new(Devices {
        interrupts: Arc::clone(&interrupts),
        backend,
        msix,
        ready: AtomicU64::new(0),
        isrs: AtomicU64::new(0),
        failed: AtomicBool::new(false),
    });

    // A level device on the level pin, and an edge device on the edge pin.
    let (level_trigger, resample) = (EventFd::new(EFD_NONBLOCK)?, EventFd::new(EFD_NONBLOCK)?);
    let _level = interrupts
        .pin(LEVEL_PIN)?
        .assign_level_irqfd(&level_trigger, &resample)?;
    let edge_trigger = EventFd::new(EFD_NONBLOCK)?;
    let _edge = interrupts.pin(EDGE_PIN)?.assign_irqfd(&edge_trigger)?;

    // The guest: it programs the IOAPIC and the MSI-X table at boot.
    let image = program::build();
    program::load(&mem, &image, &boot_script())?;
    event_loop(Arc::clone(&interrupts));
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        // The test guest's starting CPU state: real mode, unreal data segments.
        vmirq_kvm::set_real_mode(&vcpu, image.entry_ip, layout::stack_top(id))?;
        let devices = Arc::clone(&devices);
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu_loop(id, vcpu, &devices))?;
    }
    wait("both vCPUs to boot", || {
        devices.ready.load(Ordering::SeqCst) == (1 << VCPUS) - 1
    })?;
    wait("the guest to program the MSI-X table", || {
        devices.msix.routed_vectors() == usize::from(MSIX_VECTORS)
    })?;

    let count = |vector: u8| u64::from(program::read_counter(&mem, 0, vector));
    let mut expected = 0;
    // MSI-X: every vector, paced (kernel irqfds: KVM injects).
    for round in 1..=ROUNDS {
        for v in 0..MSIX_VECTORS {
            devices.msix.fire(v)?;
            let vector = MSIX_FIRST_VECTOR + v as u8;
            wait("an MSI-X interrupt", || count(vector) == round)?;
            expected += 1;
        }
    }
    // The edge pin: vmirq's IOAPIC, served from the VMM's event loop.
    for round in 1..=ROUNDS {
        edge_trigger.write(1)?;
        wait("an edge pin interrupt", || count(EDGE_VECTOR) == round)?;
        expected += 1;
    }
    // The level pin: assert, the guest's EOI exits to vmirq, the line drops, resample fires.
    for round in 1..=ROUNDS {
        level_trigger.write(1)?;
        wait("a level pin interrupt", || count(LEVEL_VECTOR) == round)?;
        wait("the level pin's resample", || resample.read().is_ok())?;
        expected += 1;
    }
    // Nothing arrived twice: one more paced MSI-X interrupt proves the guest has run past
    // everything before it.
    devices.msix.fire(0)?;
    wait("the last MSI-X interrupt", || {
        count(MSIX_FIRST_VECTOR) == ROUNDS + 1
    })?;
    expected += 1;
    let taken = devices.isrs.load(Ordering::SeqCst);
    println!(
        "minimal-vmm: msix {} + edge pin {} + level pin {} interrupts; guest took {taken}, \
         vmirq threads {}",
        ROUNDS * u64::from(MSIX_VECTORS) + 1,
        ROUNDS,
        ROUNDS,
        interrupts.threads()
    );
    if taken != expected {
        return Err(format!("expected {expected} interrupts, the guest took {taken}").into());
    }
    if interrupts.threads() != 0 {
        return Err("vmirq started a thread in event-loop mode".into());
    }
    if devices.failed.load(Ordering::SeqCst) {
        return Err("a vCPU failed".into());
    }
    Ok(())
}

/// The guest's boot MMIO writes: IOAPIC pins, then every MSI-X table entry, unmasked.
fn boot_script() -> Vec<(u32, u32)> {
    let ioapic = |pin: u32, vector: u8, level: bool| {
        let lo = u32::from(vector) | u32::from(level) << 15;
        [
            (layout::IOAPIC_IOREGSEL, 0x11 + 2 * pin),
            (layout::IOAPIC_IOWIN, 0),
            (layout::IOAPIC_IOREGSEL, 0x10 + 2 * pin),
            (layout::IOAPIC_IOWIN, lo),
        ]
    };
    let mut script: Vec<(u32, u32)> = ioapic(LEVEL_PIN, LEVEL_VECTOR, true).into();
    script.extend(ioapic(EDGE_PIN, EDGE_VECTOR, false));
    for v in 0..MSIX_VECTORS {
        let msg = X86Msi::fixed(0, MSIX_FIRST_VECTOR + v as u8)
            .encode()
            .expect("APIC 0 fits");
        let entry = (MSIX_BAR + MSIX_LAYOUT.table) as u32 + u32::from(v) * 16;
        script.extend([
            (entry, msg.address_lo()),
            (entry + 4, msg.address_hi()),
            (entry + 8, msg.data),
            (entry + 12, 0),
        ]);
    }
    script
}

/// The VMM's event loop: waits on vmirq's one descriptor and lets vmirq serve it.
fn event_loop(interrupts: Arc<Interrupts>) {
    std::thread::spawn(move || loop {
        let mut pfd = libc::pollfd {
            fd: interrupts.event_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, -1) } == 1 {
            if let Err(e) = interrupts.service() {
                eprintln!("minimal-vmm: event loop: {e}");
                return;
            }
        }
    });
}

/// The VMM's vCPU run loop; vmirq handles the interrupt controller's exits.
fn vcpu_loop(id: usize, mut vcpu: VcpuFd, d: &Devices) {
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, _)) => match port {
                layout::ISR_PORT => drop(d.isrs.fetch_add(1, Ordering::SeqCst)),
                layout::READY_PORT => drop(d.ready.fetch_or(1 << id, Ordering::SeqCst)),
                _ => {}
            },
            Ok(VcpuExit::IoIn(_, data)) => data.fill(0xff),
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if let Some(off) = bar_offset(addr) {
                    d.msix.bar_read(off, data);
                } else if !d.interrupts.mmio_read(addr, data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if let Some(off) = bar_offset(addr) {
                    for event in d.msix.bar_write(off, data) {
                        eprintln!("minimal-vmm: MSI-X: the host could not serve {event:?}");
                        d.failed.store(true, Ordering::SeqCst);
                    }
                } else {
                    d.interrupts.mmio_write(addr, data);
                }
            }
            Ok(VcpuExit::IoapicEoi(vector)) => d.backend.ioapic_eoi(vector),
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) => {}
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            other => {
                eprintln!("minimal-vmm: vCPU {id} stopped: {other:?}");
                d.failed.store(true, Ordering::SeqCst);
                return;
            }
        }
    }
}

fn bar_offset(addr: u64) -> Option<u64> {
    addr.checked_sub(MSIX_BAR).filter(|off| *off < 0x2000)
}

fn wait(what: &str, mut done: impl FnMut() -> bool) -> Result<(), Error> {
    let deadline = Instant::now() + WAIT;
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    Ok(())
}
