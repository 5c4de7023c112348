//! `vmirq bench`'s snapshot figures: the interrupt layer's share of a migration's downtime
//! (pause, save, encode, decode, restore into a fresh VM, take every object back, resume)
//! for a VM with 64 MSI-X vectors, 8 level lines and 256 Xen ports, and the size of its state.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmirq::msix::{MsixTable, MsixVectors};
use vmirq::snapshot::ObjectState;
use vmirq::xen::{attach, XenConfig};
use vmirq::{Backend, Interrupts, IrqSource, IrqchipMode, SimBackend, Snapshot, X86Msi};
use vmirq_guest::machine::BackendKind;
use vmirq_kvm::{KvmVm, KvmVmConfig};

use crate::report::quantile;

const MSIX_VECTORS: u16 = 64;
const LEVEL_LINES: u32 = 8;
const FIRST_LINE_PIN: u32 = 8;
const XEN_PORTS: u32 = 256;
const ROUNDS: usize = 15;
const SHARED_INFO: u64 = 0x2_0000;

fn fail<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> vmirq::Error {
    move |_| vmirq::Error::Unsupported(what)
}

/// A VM's interrupt backend, and what keeps it alive (the KVM VM, dropped after it).
struct Vm {
    backend: Arc<dyn Backend>,
    _kvm: Option<KvmVm>,
}

fn vm(kind: BackendKind) -> Result<Vm, vmirq::Error> {
    Ok(match kind {
        BackendKind::Kvm => {
            let kvm = KvmVm::new(KvmVmConfig {
                vcpus: 2,
                mem_size: 0x1_0000,
                irqchip: IrqchipMode::Kernel,
                halt_poll_ns: None,
            })
            .map_err(fail("create a KVM VM for the snapshot bench"))?;
            Vm {
                backend: kvm.backend(),
                _kvm: Some(kvm),
            }
        }
        BackendKind::Sim | BackendKind::SimGuestEoi => Vm {
            backend: SimBackend::new(2, IrqchipMode::Kernel),
            _kvm: None,
        },
    })
}

fn xen_config() -> XenConfig {
    XenConfig {
        vcpus: 2,
        long_mode: true,
        shared_info_gpa: SHARED_INFO,
        domid: 1,
    }
}

/// One pause-save-restore-resume of the bench VM: its duration and the state's bytes.
fn one_round(kind: BackendKind) -> Result<(Duration, usize), vmirq::Error> {
    let source = vm(kind)?;
    let target = vm(kind)?;
    let irq = Interrupts::new(Arc::clone(&source.backend), Default::default())?;
    let msix = MsixVectors::new(Arc::clone(&irq), MsixTable::new(MSIX_VECTORS))
        .map_err(fail("create the MSI-X device"))?;
    msix.write_message_control(1 << 15);
    let mut writes = Vec::new();
    for v in 0..MSIX_VECTORS {
        let msg = X86Msi::fixed(u32::from(v % 2), 0x40 + v as u8)
            .encode()
            .map_err(fail("encode an MSI"))?;
        let at = u64::from(v) * 16;
        writes.push((at, msg.address_lo().to_le_bytes().to_vec()));
        writes.push((at + 8, msg.data.to_le_bytes().to_vec()));
        writes.push((at + 12, 0u32.to_le_bytes().to_vec()));
    }
    let batch: Vec<(u64, &[u8])> = writes.iter().map(|(o, d)| (*o, d.as_slice())).collect();
    if !msix.bar_write_batch(&batch).is_empty() {
        return Err(vmirq::Error::Unsupported("route the bench's MSI-X vectors"));
    }
    let sources: Vec<IrqSource> = (0..LEVEL_LINES)
        .map(|i| {
            let source = irq.pin(FIRST_LINE_PIN + i)?.line()?.source();
            source.set(i % 2 == 0);
            Ok(source)
        })
        .collect::<Result<_, vmirq::Error>>()?;
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)])
        .map_err(fail("map the bench's Xen memory"))?;
    let (channels, upcalls) = attach(&irq, memory.clone(), xen_config());
    let args = GuestAddress(0x1000);
    for i in 0..XEN_PORTS {
        memory
            .write_obj(u64::from(i % 2), args)
            .map_err(fail("write a hypercall argument"))?;
        if channels.hypercall(0, 7, args.0) != 0 {
            return Err(vmirq::Error::Unsupported("bind the bench's Xen ports"));
        }
    }

    let t0 = Instant::now();
    irq.pause();
    let mut snapshot = irq.save()?;
    snapshot.insert("msix", &msix)?;
    for (i, s) in sources.iter().enumerate() {
        snapshot.insert(format!("line/{i}"), s)?;
    }
    snapshot.insert_state("xen", ObjectState::Xen(channels.save(&upcalls)))?;
    let bytes = snapshot.to_bytes();
    let restored = Interrupts::restore(
        Arc::clone(&target.backend),
        Default::default(),
        Snapshot::from_bytes(&bytes)?,
    )?;
    let (msix_b, events) = restored.msix("msix")?;
    if !events.is_empty() {
        return Err(vmirq::Error::Unsupported(
            "restore the bench's MSI-X vectors",
        ));
    }
    let mut sources_b = Vec::new();
    for i in 0..LEVEL_LINES {
        let state = restored.source(&format!("line/{i}"))?;
        let line = restored.interrupts().pin(FIRST_LINE_PIN + i)?.line()?;
        sources_b.push(line.restore_source(&state)?);
    }
    let xen_b = restored.xen("xen", memory, 2)?;
    let irq_b = restored.finish()?;
    irq_b.resume()?;
    let took = t0.elapsed();
    drop((msix_b, sources_b, xen_b, irq_b));
    drop((msix, sources, channels, upcalls, irq));
    Ok((took, bytes.len()))
}

/// (median µs of pause-save-restore-resume, bytes of the state).
pub fn figures(kind: BackendKind) -> Result<(f64, f64), vmirq::Error> {
    let mut took = Vec::new();
    let mut bytes = 0;
    for _ in 0..ROUNDS {
        let (t, b) = one_round(kind)?;
        took.push(t);
        bytes = b;
    }
    Ok((quantile(&mut took, 0.5).as_secs_f64() * 1e6, bytes as f64))
}
