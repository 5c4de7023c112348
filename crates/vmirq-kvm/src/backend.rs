//! [`KvmBackend`]: `vmirq::Backend` on a KVM VM file descriptor the VMM owns.
//!
//! A VMM keeps its own `VmFd`, guest memory and vCPU threads: it builds the backend from an
//! `Arc<VmFd>` and the irqchip mode it created, and hands the exits vmirq serves to it from its
//! own run loop ([`KvmBackend::ioapic_eoi`] for `KVM_EXIT_IOAPIC_EOI`; IOAPIC MMIO and MSI-X BAR
//! accesses go to `vmirq::Interrupts` and `vmirq::msix::MsixVectors`).

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, RwLock, Weak};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, kvm_irq_routing_msi__bindgen_ty_1, kvm_irqchip, kvm_msi, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI, KVM_MAX_IRQ_ROUTES, KVM_MSI_VALID_DEVID,
};
use kvm_ioctls::{Cap, VmFd};
use vmirq::{
    Backend, BackendError, EoiSink, Gsi, IrqChip, IrqchipMode, KernelIrqchip, KernelRoute,
    MsiMessage, Route,
};
use vmm_sys_util::eventfd::EventFd;

/// The KVM side of vmirq: routing table, MSI injection, irqchip lines and irqfds of one VM.
///
/// Locks: `eoi_sink` is read on every `KVM_EXIT_IOAPIC_EOI` and written by `set_eoi_sink`.
/// `irqfds` is bookkeeping only, held for a set operation and never across an ioctl: vmirq's
/// core owns each irqfd through one handle, so no two calls race on the same (eventfd, GSI).
/// Every ioctl runs with no lock held; KVM serialises them itself.
///
/// ```no_run
/// use std::sync::Arc;
/// use kvm_ioctls::Kvm;
/// use vmirq_kvm::{IrqchipMode, KvmBackend};
///
/// let kvm = Kvm::new()?;
/// let vm = Arc::new(kvm.create_vm()?);
/// vm.create_irq_chip()?;                 // the VMM's own VM and irqchip
/// let backend = Arc::new(KvmBackend::new(Arc::clone(&vm), IrqchipMode::Kernel));
/// let interrupts = vmirq::Interrupts::new(backend, Default::default())?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct KvmBackend {
    vm: Arc<VmFd>,
    mode: IrqchipMode,
    resample: bool,
    eoi_sink: RwLock<Option<Weak<dyn EoiSink>>>,
    /// (eventfd, GSI) pairs assigned through this backend. KVM answers 0 to a deassign it
    /// cannot match (virt/kvm/eventfd.c `kvm_irqfd_deassign`), so the contract's
    /// `IrqfdNotFound` is decided here.
    irqfds: Mutex<HashSet<(RawFd, u32)>>,
}

impl KvmBackend {
    /// A backend on the VMM's VM `vm`, whose irqchip the VMM created in `mode`
    /// (`KVM_CREATE_IRQCHIP`, or `KVM_CAP_SPLIT_IRQCHIP` with that many IOAPIC pins).
    pub fn new(vm: Arc<VmFd>, mode: IrqchipMode) -> Self {
        // KVM needs the full in-kernel irqchip for resample irqfds (EINVAL on split).
        let resample = mode == IrqchipMode::Kernel && vm.check_extension(Cap::IrqfdResample);
        Self {
            vm,
            mode,
            resample,
            eoi_sink: RwLock::new(None),
            irqfds: Mutex::new(HashSet::new()),
        }
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// For the VMM's run loop: `KVM_EXIT_IOAPIC_EOI(vector)` on a split irqchip. Reports the
    /// guest's EOI of a level vector to vmirq's IOAPIC, if it is still alive.
    pub fn ioapic_eoi(&self, vector: u8) {
        let sink = match self.eoi_sink.read() {
            Ok(slot) => slot.as_ref().and_then(Weak::upgrade),
            Err(poisoned) => poisoned.into_inner().as_ref().and_then(Weak::upgrade),
        };
        match sink {
            Some(sink) => sink.eoi(vector),
            None => tracing::debug!(vector, "IOAPIC EOI exit with no EOI sink"),
        }
    }

    fn routing_entry(&self, route: &KernelRoute) -> Result<kvm_irq_routing_entry, BackendError> {
        let mut entry = kvm_irq_routing_entry {
            gsi: route.gsi.raw(),
            ..Default::default()
        };
        match route.route {
            Route::Irqchip { chip, pin } => {
                // arch/x86/kvm/irq_comm.c: IRQCHIP entries are refused on a split irqchip.
                if self.mode != IrqchipMode::Kernel {
                    return Err(BackendError::Unsupported(
                        "route a GSI to an in-kernel irqchip pin on a split irqchip",
                    ));
                }
                let irqchip = match chip {
                    IrqChip::PicMaster => KVM_IRQCHIP_PIC_MASTER,
                    IrqChip::PicSlave => KVM_IRQCHIP_PIC_SLAVE,
                    IrqChip::Ioapic => KVM_IRQCHIP_IOAPIC,
                };
                entry.type_ = KVM_IRQ_ROUTING_IRQCHIP;
                entry.u = kvm_irq_routing_entry__bindgen_ty_1 {
                    irqchip: kvm_irq_routing_irqchip { irqchip, pin },
                };
            }
            Route::Msi { msg, devid } => {
                entry.type_ = KVM_IRQ_ROUTING_MSI;
                if devid.is_some() {
                    entry.flags = KVM_MSI_VALID_DEVID;
                }
                entry.u = kvm_irq_routing_entry__bindgen_ty_1 {
                    msi: kvm_irq_routing_msi {
                        address_lo: msg.address_lo(),
                        address_hi: msg.address_hi(),
                        data: msg.data,
                        __bindgen_anon_1: kvm_irq_routing_msi__bindgen_ty_1 {
                            devid: devid.unwrap_or(0),
                        },
                    },
                };
            }
            Route::XenEvtchn { .. } => {
                return Err(BackendError::Unsupported(
                    "route to a Xen event channel (no KVM_CAP_XEN_HVM)",
                ))
            }
        }
        Ok(entry)
    }

    fn lock_irqfds(&self) -> std::sync::MutexGuard<'_, HashSet<(RawFd, u32)>> {
        // The set holds plain data; a panic elsewhere cannot leave it half-updated.
        self.irqfds.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn hypervisor(op: &'static str, err: kvm_ioctls::Error) -> BackendError {
    BackendError::Hypervisor {
        op,
        source: io::Error::from_raw_os_error(err.errno()),
    }
}

/// KVM's `KVM_IRQFD` assign polls the eventfd and, if a count is already there, injects once
/// (virt/kvm/eventfd.c `kvm_irqfd_assign`: `schedule_work(&irqfd->inject)`) but leaves the
/// count in the eventfd; only later signals are consumed, by `irqfd_wakeup` under the eventfd's
/// lock. Left there, that served count would read as owed in a snapshot and be injected a second
/// time by the next assign of the same eventfd (a migration target). Every later signal is read
/// by the wakeup atomically with its write, so what a read finds now is exactly the count the
/// assign served. `RWF_NOWAIT`: the device's eventfd may be blocking, and the count may be gone.
fn consume_count_served_at_assign(fd: &EventFd) {
    let mut count = 0u64;
    let iov = libc::iovec {
        iov_base: (&mut count as *mut u64).cast(),
        iov_len: std::mem::size_of::<u64>(),
    };
    // SAFETY: `iov` describes `count`, 8 writable bytes that outlive the call; offset -1 reads
    // at the file's position, which an eventfd ignores. EAGAIN (no count) is the common answer.
    let _ = unsafe { libc::preadv2(fd.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
}

impl Backend for KvmBackend {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn irqchip_mode(&self) -> IrqchipMode {
        self.mode
    }

    fn delivers(&self, route: &Route) -> bool {
        match route {
            Route::Msi { .. } => true,
            Route::Irqchip { .. } => self.mode == IrqchipMode::Kernel,
            Route::XenEvtchn { .. } => false,
        }
    }

    fn commit_routes(&self, routes: &[KernelRoute]) -> Result<(), BackendError> {
        if routes.len() > KVM_MAX_IRQ_ROUTES {
            return Err(BackendError::Hypervisor {
                op: "KVM_SET_GSI_ROUTING",
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} routes exceed KVM's {KVM_MAX_IRQ_ROUTES}", routes.len()),
                ),
            });
        }
        let entries = routes
            .iter()
            .map(|r| self.routing_entry(r))
            .collect::<Result<Vec<_>, _>>()?;
        let table =
            KvmIrqRouting::from_entries(&entries).map_err(|e| BackendError::Hypervisor {
                op: "KVM_SET_GSI_ROUTING",
                source: io::Error::new(io::ErrorKind::InvalidInput, format!("{e:?}")),
            })?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| hypervisor("KVM_SET_GSI_ROUTING", e))
    }

    fn signal_msi(&self, msg: MsiMessage, devid: Option<u32>) -> Result<(), BackendError> {
        let msi = kvm_msi {
            address_lo: msg.address_lo(),
            address_hi: msg.address_hi(),
            data: msg.data,
            flags: if devid.is_some() {
                KVM_MSI_VALID_DEVID
            } else {
                0
            },
            devid: devid.unwrap_or(0),
            ..Default::default()
        };
        // > 0: delivered; 0: the guest blocked it (e.g. APIC software-disabled), like hardware.
        match self.vm.signal_msi(msi) {
            Ok(0) => {
                tracing::debug!(?msg, "KVM_SIGNAL_MSI: guest blocked the message");
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => Err(hypervisor("KVM_SIGNAL_MSI", e)),
        }
    }

    fn set_line(&self, gsi: Gsi, level: bool) -> Result<(), BackendError> {
        if self.mode != IrqchipMode::Kernel {
            return Err(BackendError::Unsupported(
                "drive an irqchip line on a split irqchip",
            ));
        }
        self.vm
            .set_irq_line(gsi.raw(), level)
            .map_err(|e| hypervisor("KVM_IRQ_LINE", e))
    }

    fn supports_resample(&self) -> bool {
        self.resample
    }

    fn assign_irqfd(
        &self,
        fd: &EventFd,
        gsi: Gsi,
        resample: Option<&EventFd>,
    ) -> Result<(), BackendError> {
        let result = match resample {
            Some(resamplefd) => self
                .vm
                .register_irqfd_with_resample(fd, resamplefd, gsi.raw()),
            None => self.vm.register_irqfd(fd, gsi.raw()),
        };
        match result {
            Ok(()) => {
                self.lock_irqfds().insert((fd.as_raw_fd(), gsi.raw()));
                consume_count_served_at_assign(fd);
                Ok(())
            }
            Err(e) => Err(match e.errno() {
                libc::EBUSY => BackendError::IrqfdBusy,
                libc::EBADF => BackendError::BadEventFd,
                _ => hypervisor("KVM_IRQFD", e),
            }),
        }
    }

    fn deassign_irqfd(&self, fd: &EventFd, gsi: Gsi) -> Result<(), BackendError> {
        let key = (fd.as_raw_fd(), gsi.raw());
        if !self.lock_irqfds().remove(&key) {
            return Err(BackendError::IrqfdNotFound(gsi));
        }
        match self.vm.unregister_irqfd(fd, gsi.raw()) {
            Ok(()) => Ok(()),
            Err(e) => Err(match e.errno() {
                libc::ENOENT => BackendError::IrqfdNotFound(gsi),
                libc::EBADF => BackendError::BadEventFd,
                _ => {
                    // Still assigned in KVM: keep the bookkeeping for a later retry.
                    self.lock_irqfds().insert(key);
                    hypervisor("KVM_IRQFD deassign", e)
                }
            }),
        }
    }

    fn set_eoi_sink(&self, sink: Weak<dyn EoiSink>) {
        match self.eoi_sink.write() {
            Ok(mut slot) => *slot = Some(sink),
            Err(poisoned) => *poisoned.into_inner() = Some(sink),
        }
    }

    /// `KVM_GET_IRQCHIP` for the two PICs and the IOAPIC (kernel irqchip): each chip's
    /// 512-byte state as KVM lays it out.
    fn save_irqchip(&self) -> Result<Option<KernelIrqchip>, BackendError> {
        if self.mode != IrqchipMode::Kernel {
            return Ok(None);
        }
        let mut chips = Vec::with_capacity(CHIPS.len());
        for id in CHIPS {
            let mut chip = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.vm
                .get_irqchip(&mut chip)
                .map_err(|e| hypervisor("KVM_GET_IRQCHIP", e))?;
            // SAFETY: every variant of the union is plain bytes (PIC and IOAPIC register
            // structs of integers); `dummy` spans the whole union.
            let bytes = unsafe { chip.chip.dummy };
            chips.push((id, bytes.iter().map(|b| *b as u8).collect()));
        }
        Ok(Some(KernelIrqchip {
            backend: self.name().to_owned(),
            chips,
        }))
    }

    /// `KVM_SET_IRQCHIP` for each saved chip (routes are committed already: they are not part
    /// of the chip state). Each blob must be one of this backend's three chips, 512 bytes.
    fn restore_irqchip(&self, state: &KernelIrqchip) -> Result<(), BackendError> {
        if self.mode != IrqchipMode::Kernel {
            return Err(BackendError::Unsupported(
                "restore an in-kernel irqchip on a split irqchip",
            ));
        }
        let bad = |why: String| BackendError::BadIrqchipState(why);
        let mut chips = Vec::with_capacity(state.chips.len());
        for (id, bytes) in &state.chips {
            if !CHIPS.contains(id) {
                return Err(bad(format!("no chip {id}")));
            }
            let mut chip = kvm_irqchip {
                chip_id: *id,
                ..Default::default()
            };
            // SAFETY: writing plain bytes into the union's byte view.
            let dummy = unsafe { &mut chip.chip.dummy };
            if bytes.len() != dummy.len() {
                return Err(bad(format!(
                    "chip {id}: {} bytes, not {}",
                    bytes.len(),
                    dummy.len()
                )));
            }
            for (d, b) in dummy.iter_mut().zip(bytes) {
                *d = *b as std::os::raw::c_char;
            }
            chips.push(chip);
        }
        for chip in &chips {
            self.vm
                .set_irqchip(chip)
                .map_err(|e| hypervisor("KVM_SET_IRQCHIP", e))?;
        }
        Ok(())
    }
}

/// The in-kernel chips a snapshot carries (KVM_CREATE_IRQCHIP makes all three).
const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KvmVm, KvmVmConfig};
    use vmirq::X86Msi;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn vm(irqchip: IrqchipMode) -> Option<KvmVm> {
        if !crate::kvm_test_gate(&format!("backend::vm({irqchip:?})")) {
            return None;
        }
        let config = KvmVmConfig {
            vcpus: 1,
            mem_size: 0x10000,
            irqchip,
            halt_poll_ns: None,
        };
        Some(KvmVm::new(config).unwrap())
    }

    fn msi_route(gsi: u32) -> KernelRoute {
        KernelRoute {
            gsi: Gsi::from_raw(gsi),
            route: Route::msi(X86Msi::fixed(0, 0x40).encode().unwrap()),
        }
    }

    #[test]
    fn routing_table_takes_4096_entries_and_refuses_more() {
        let Some(vm) = vm(IrqchipMode::Kernel) else {
            return;
        };
        let full: Vec<_> = (0..4096).map(msi_route).collect();
        vm.backend().commit_routes(&full).unwrap();
        let over: Vec<_> = (0..4097).map(|g| msi_route(g % 4096)).collect();
        assert!(matches!(
            vm.backend().commit_routes(&over),
            Err(BackendError::Hypervisor { .. })
        ));
    }

    #[test]
    fn deassign_of_an_unassigned_irqfd_is_not_found() {
        // KVM itself answers 0 here; the backend's bookkeeping gives the contract's error.
        let Some(vm) = vm(IrqchipMode::Kernel) else {
            return;
        };
        let b = vm.backend();
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        b.commit_routes(&[msi_route(40)]).unwrap();
        assert!(matches!(
            b.deassign_irqfd(&fd, Gsi::from_raw(40)),
            Err(BackendError::IrqfdNotFound(g)) if g.raw() == 40
        ));
        b.assign_irqfd(&fd, Gsi::from_raw(40), None).unwrap();
        assert!(matches!(
            b.deassign_irqfd(&fd, Gsi::from_raw(41)),
            Err(BackendError::IrqfdNotFound(g)) if g.raw() == 41
        ));
        b.deassign_irqfd(&fd, Gsi::from_raw(40)).unwrap();
    }

    #[test]
    fn one_eventfd_backs_at_most_one_irqfd() {
        let Some(vm) = vm(IrqchipMode::Kernel) else {
            return;
        };
        let b = vm.backend();
        b.commit_routes(&[msi_route(40), msi_route(41)]).unwrap();
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        b.assign_irqfd(&fd, Gsi::from_raw(40), None).unwrap();
        assert!(matches!(
            b.assign_irqfd(&fd, Gsi::from_raw(41), None),
            Err(BackendError::IrqfdBusy)
        ));
    }

    #[test]
    fn kernel_irqchip_takes_pin_routes_lines_and_resample() {
        let Some(vm) = vm(IrqchipMode::Kernel) else {
            return;
        };
        let b = vm.backend();
        assert_eq!(b.name(), "kvm");
        assert_eq!(b.irqchip_mode(), IrqchipMode::Kernel);
        assert!(b.delivers(&Route::ioapic(5)));
        let pin = KernelRoute {
            gsi: Gsi::from_raw(5),
            route: Route::ioapic(5),
        };
        let pic = KernelRoute {
            gsi: Gsi::from_raw(5),
            route: Route::Irqchip {
                chip: IrqChip::PicMaster,
                pin: 5,
            },
        };
        b.commit_routes(&[pin, pic]).unwrap();
        b.set_line(Gsi::from_raw(5), true).unwrap();
        b.set_line(Gsi::from_raw(5), false).unwrap();
        assert!(b.supports_resample());
        let (fd, resample) = (
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(0).unwrap(),
        );
        b.assign_irqfd(&fd, Gsi::from_raw(5), Some(&resample))
            .unwrap();
        b.deassign_irqfd(&fd, Gsi::from_raw(5)).unwrap();
    }

    #[test]
    fn split_irqchip_refuses_pin_routes_lines_and_resample() {
        let Some(vm) = vm(IrqchipMode::Split { ioapic_pins: 24 }) else {
            return;
        };
        let b = vm.backend();
        assert!(!b.delivers(&Route::ioapic(5)));
        assert!(b.delivers(&msi_route(0).route));
        let pin = KernelRoute {
            gsi: Gsi::from_raw(5),
            route: Route::ioapic(5),
        };
        assert!(matches!(
            b.commit_routes(&[pin]),
            Err(BackendError::Unsupported(_))
        ));
        assert!(matches!(
            b.set_line(Gsi::from_raw(5), true),
            Err(BackendError::Unsupported(_))
        ));
        assert!(!b.supports_resample());
        // REFERENCE §1: KVM refuses resample irqfds without the full in-kernel irqchip.
        b.commit_routes(&[msi_route(5)]).unwrap();
        let (fd, resample) = (
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(0).unwrap(),
        );
        assert!(matches!(
            b.assign_irqfd(&fd, Gsi::from_raw(5), Some(&resample)),
            Err(BackendError::Hypervisor {
                op: "KVM_IRQFD",
                ..
            })
        ));
    }

    #[test]
    fn xen_routes_are_unsupported() {
        let Some(vm) = vm(IrqchipMode::Kernel) else {
            return;
        };
        let xen = Route::XenEvtchn {
            port: 3,
            vcpu: 0,
            priority: 0,
        };
        let b = vm.backend();
        assert!(!b.delivers(&xen));
        let route = KernelRoute {
            gsi: Gsi::from_raw(40),
            route: xen,
        };
        assert!(matches!(
            b.commit_routes(&[route]),
            Err(BackendError::Unsupported(_))
        ));
    }
}
