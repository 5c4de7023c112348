//! The interrupt paths the demo and the bench drive, each rigged on a booted machine.

use std::time::{Duration, Instant};

use vmirq::{EdgeIrqfd, GsiRoute, IrqfdPath, MsiMessage, Route, X86Msi};
use vmirq_guest::machine::{wait_fd, Machine, MachineConfig};
use vmm_sys_util::eventfd::EventFd;

/// Where every path sends its interrupts: vCPU 1, an AP, so vCPU 0's boot work is never in
/// the way.
pub const TARGET_VCPU: usize = 1;
pub const PIN: u32 = 5;
pub const PIN_VECTOR: u8 = 0x45;
/// A PCI INTx-style level pin (GSIs 16-23 reach only the IOAPIC, never the 8259).
pub const LEVEL_PIN: u32 = 18;
pub const LEVEL_VECTOR: u8 = 0x5A;
const WAIT: Duration = Duration::from_secs(2);

/// The machine the paths need: 2 vCPUs, IOAPIC pin 5 programmed edge and pin 18 level, both
/// to vCPU 1.
pub fn machine_config(irqchip: vmirq::IrqchipMode) -> MachineConfig {
    MachineConfig::new(2, irqchip)
        .ioapic_pin(PIN, PIN_VECTOR, TARGET_VCPU as u8, false)
        .ioapic_pin(LEVEL_PIN, LEVEL_VECTOR, TARGET_VCPU as u8, true)
}

/// One path ready to fire.
pub struct Rig {
    pub name: &'static str,
    pub vector: u8,
    fire: Box<dyn Fn() -> Result<(), vmirq::Error> + Send + Sync>,
    /// Level paths: the resamplefd the guest's EOI signals.
    pub resample: Option<EventFd>,
    /// What must live as long as the path does (GSI, eventfd, irqfd, ...).
    _keep: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl Rig {
    pub fn fire(&self) -> Result<(), vmirq::Error> {
        (self.fire)()
    }
}

fn msi(vector: u8) -> MsiMessage {
    X86Msi::fixed(TARGET_VCPU as u32, vector)
        .encode()
        .expect("vCPU 1 fits an 8-bit destination")
}

fn eventfd() -> Result<EventFd, vmirq::Error> {
    EventFd::new(0).map_err(|_| vmirq::Error::BadEventFd)
}

fn trigger_of(
    fd: &EventFd,
) -> Result<Box<dyn Fn() -> Result<(), vmirq::Error> + Send + Sync>, vmirq::Error> {
    let trigger = fd.try_clone().map_err(|_| vmirq::Error::BadEventFd)?;
    Ok(Box::new(move || {
        trigger.write(1).map_err(|_| vmirq::Error::BadEventFd)
    }))
}

/// An edge irqfd rig: `bind` binds a fresh eventfd; `owner` (the route, if any) lives on.
fn irqfd_rig<O: Send + Sync + 'static>(
    name: &'static str,
    vector: u8,
    owner: O,
    bind: impl FnOnce(&O, &EventFd) -> Result<EdgeIrqfd, vmirq::Error>,
) -> Result<Rig, vmirq::Error> {
    let fd = eventfd()?;
    let irqfd = bind(&owner, &fd)?;
    Ok(Rig {
        name,
        vector,
        fire: trigger_of(&fd)?,
        resample: None,
        // The irqfd first: it is unbound before its route goes.
        _keep: Some(Box::new((irqfd, owner, fd))),
    })
}

fn msi_irqfd_rig(
    m: &dyn Machine,
    name: &'static str,
    vector: u8,
    path: IrqfdPath,
) -> Result<Rig, vmirq::Error> {
    let route = m.interrupts().new_route(Route::msi(msi(vector)))?;
    irqfd_rig(name, vector, route, |r, fd| {
        r.assign_irqfd_on(fd, Some(path))
    })
}

/// A level device on the level pin: a trigger eventfd plus a resamplefd.
fn level_rig(m: &dyn Machine, name: &'static str) -> Result<Rig, vmirq::Error> {
    let fd = eventfd()?;
    let resample = eventfd()?;
    let irqfd = m
        .interrupts()
        .pin(LEVEL_PIN)?
        .assign_level_irqfd(&fd, &resample)?;
    Ok(Rig {
        name,
        vector: LEVEL_VECTOR,
        fire: trigger_of(&fd)?,
        resample: Some(resample),
        _keep: Some(Box::new((fd, irqfd))),
    })
}

/// Rigs path `name` on `m`.
pub fn rig(m: &dyn Machine, name: &str) -> Result<Rig, vmirq::Error> {
    match name {
        "msi-signal" => {
            let irq = std::sync::Arc::clone(m.interrupts());
            let message = msi(0x70);
            Ok(Rig {
                name: "msi-signal",
                vector: 0x70,
                fire: Box::new(move || irq.signal_msi(message)),
                resample: None,
                _keep: None,
            })
        }
        "msi-irqfd-kernel" => msi_irqfd_rig(m, "msi-irqfd-kernel", 0x71, IrqfdPath::Kernel),
        "msi-irqfd-user" => msi_irqfd_rig(m, "msi-irqfd-user", 0x72, IrqfdPath::User),
        "pin-edge" => {
            let pin = m.interrupts().pin(PIN)?;
            irqfd_rig("pin-edge", PIN_VECTOR, pin, |p, fd| p.assign_irqfd(fd))
        }
        "level-resample-kernel" => level_rig(m, "level-resample-kernel"),
        "level-ioapic-split" => level_rig(m, "level-ioapic-split"),
        "xen2l-upcall" => {
            let xen = Xen::on(m)?;
            let port = xen.bind_ipi(m, TARGET_VCPU as u32)?;
            let (irqfd, gsi, fd) = xen.route(m, port, TARGET_VCPU as u32)?;
            Ok(Rig {
                name: "xen2l-upcall",
                vector: vmirq_guest::layout::XEN_UPCALL_VECTOR,
                fire: trigger_of(&fd)?,
                resample: None,
                _keep: Some(Box::new((irqfd, gsi, fd, xen))),
            })
        }
        "xenfifo-upcall" => {
            let vcpu = TARGET_VCPU as u32;
            let (channels, upcalls, port) = crate::xen_fifo::upcall_guest(m, vcpu)?;
            let (irqfd, gsi, fd) = Xen::route_to(m, port, vcpu)?;
            Ok(Rig {
                name: "xenfifo-upcall",
                vector: vmirq_guest::layout::XEN_UPCALL_VECTOR,
                fire: trigger_of(&fd)?,
                resample: None,
                _keep: Some(Box::new((irqfd, gsi, fd, channels, upcalls))),
            })
        }
        _ => Err(vmirq::Error::Unsupported("rig an unknown path")),
    }
}

/// One trigger's timings.
#[derive(Clone, Copy, Debug)]
pub struct Trip {
    /// Trigger → the guest ISR's report.
    pub isr: Duration,
    /// Level paths: trigger → the resamplefd signalled by the guest's EOI (the device's whole
    /// round trip); edge paths: same as `isr`.
    pub round_trip: Duration,
}

/// Fires once and waits for the interrupt (and, on level paths, the resample). None if either
/// did not come in time.
pub fn round_trip(m: &dyn Machine, rig: &Rig) -> Result<Option<Trip>, vmirq::Error> {
    let t0 = Instant::now();
    rig.fire()?;
    let Some(ev) = m.wait_isr(Some(TARGET_VCPU), rig.vector, WAIT) else {
        return Ok(None);
    };
    let isr = ev.at.saturating_duration_since(t0);
    let round_trip = match &rig.resample {
        None => isr,
        Some(fd) => match wait_fd(m, fd, WAIT) {
            Some(_) => t0.elapsed(),
            None => return Ok(None),
        },
    };
    Ok(Some(Trip { isr, round_trip }))
}

/// Where the demo's MSI-X device BAR sits in guest physical memory.
pub const MSIX_BAR: u32 = 0xD000_0000;

/// An MSI-X device on a machine's MMIO bus: the guest reaches its table and PBA by MMIO.
pub struct MsixBar {
    pub vectors: vmirq::msix::MsixVectors,
    pub events: std::sync::Mutex<Vec<vmirq::msix::MsixEvent>>,
}

impl vmirq_guest::machine::MmioDevice for MsixBar {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.vectors.bar_read(offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let events = self.vectors.bar_write(offset, data);
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(events);
    }
}

/// Maps an MSI-X device with `n` vectors at [`MSIX_BAR`].
pub fn msix_bar(m: &dyn Machine, n: u16) -> Result<std::sync::Arc<MsixBar>, vmirq::Error> {
    let vectors = vmirq::msix::MsixVectors::new(
        std::sync::Arc::clone(m.interrupts()),
        vmirq::msix::MsixTable::new(n),
    )
    .map_err(|_| vmirq::Error::BadEventFd)?;
    let bar = std::sync::Arc::new(MsixBar {
        vectors,
        events: std::sync::Mutex::new(Vec::new()),
    });
    m.mmio_bus()
        .add(u64::from(MSIX_BAR), bar.vectors.bar_size(), bar.clone());
    Ok(bar)
}

/// The guest writes that program table entry `v` to send `vector` to the target vCPU.
pub fn msix_entry(v: u16, vector: u8, masked: bool) -> [(u32, u32); 4] {
    let msg = msi(vector);
    let base = MSIX_BAR + u32::from(v) * 16;
    [
        (base, msg.address_lo()),
        (base + 4, msg.address_hi()),
        (base + 8, msg.data),
        (base + 12, u32::from(masked)),
    ]
}

/// Emulated Xen event channels on a machine: the guest is a 32-bit Xen HVM guest whose
/// shared_info is at `XEN_SHARED_INFO`; each vCPU's upcalls go to `XEN_UPCALL_VECTOR`.
pub struct Xen {
    _channels: std::sync::Arc<vmirq::xen::EventChannels>,
    _upcalls: std::sync::Arc<vmirq::xen::Upcalls>,
}

/// Where the guest's EVTCHNOP argument structs go.
const XEN_ARGS: u32 = vmirq_guest::layout::SCRATCH as u32;
const EVTCHNOP_BIND_IPI: u32 = 7;
const EVTCHNOP_UNMASK: u32 = 9;

impl Xen {
    /// Attaches event channels to `m` and has the guest's doorbell call them.
    pub fn on(m: &dyn Machine) -> Result<Self, vmirq::Error> {
        use vmirq_guest::layout::{XEN_SHARED_INFO, XEN_UPCALL_VECTOR};
        let memory = m
            .guest_memory()
            .ok_or(vmirq::Error::Unsupported(
                "emulate Xen without guest memory",
            ))?
            .clone();
        let vcpus = 2;
        let config = vmirq::xen::XenConfig {
            vcpus,
            long_mode: false,
            shared_info_gpa: XEN_SHARED_INFO,
            domid: 1,
        };
        let (channels, upcalls) = vmirq::xen::attach(m.interrupts(), memory, config);
        for vcpu in 0..vcpus {
            upcalls
                .set_upcall_vector(vcpu, Some(XEN_UPCALL_VECTOR))
                .map_err(|_| vmirq::Error::Unsupported("set the Xen upcall vector"))?;
        }
        let ch = std::sync::Arc::clone(&channels);
        m.set_hypercall_handler(std::sync::Arc::new(
            move |vcpu: usize, cmd: u32, args: u64| ch.hypercall(vcpu as u32, cmd, args),
        ));
        Ok(Self {
            _channels: channels,
            _upcalls: upcalls,
        })
    }

    /// The guest issues EVTCHNOP_bind_ipi for `vcpu`; returns the port.
    pub fn bind_ipi(&self, m: &dyn Machine, vcpu: u32) -> Result<u32, vmirq::Error> {
        let mut args = [0u8; 8];
        args[0..4].copy_from_slice(&vcpu.to_le_bytes());
        let r = self.hypercall(m, EVTCHNOP_BIND_IPI, &mut args)?;
        if r != 0 {
            return Err(xen_error(r));
        }
        Ok(u32::from_le_bytes([args[4], args[5], args[6], args[7]]))
    }

    /// The guest issues EVTCHNOP_unmask for `port`.
    pub fn unmask(&self, m: &dyn Machine, port: u32) -> Result<(), vmirq::Error> {
        let mut args = port.to_le_bytes();
        match self.hypercall(m, EVTCHNOP_UNMASK, &mut args)? {
            0 => Ok(()),
            r => Err(xen_error(r)),
        }
    }

    /// The guest masks `port` the way Linux does: a plain write of its own mask bit.
    pub fn mask(&self, m: &dyn Machine, port: u32) -> Result<(), vmirq::Error> {
        let word = vmirq_guest::layout::XEN_SHARED_INFO + 0x880 + u64::from(port / 32) * 4;
        let mut b = [0u8; 4];
        let io = |_| vmirq::Error::Unsupported("access guest memory");
        m.read_guest(word, &mut b).map_err(io)?;
        let w = u32::from_le_bytes(b) | 1 << (port % 32);
        m.write_guest(word, &w.to_le_bytes()).map_err(io)
    }

    fn hypercall(&self, m: &dyn Machine, cmd: u32, args: &mut [u8]) -> Result<i64, vmirq::Error> {
        let io = |_| vmirq::Error::Unsupported("run a guest hypercall");
        m.write_guest(u64::from(XEN_ARGS), args).map_err(io)?;
        let r = m
            .guest_mmio(&[vmirq_guest::machine::hypercall_op(cmd, XEN_ARGS)])
            .map_err(io)?[0] as i32;
        m.read_guest(u64::from(XEN_ARGS), args).map_err(io)?;
        Ok(i64::from(r))
    }

    /// An eventfd route to `port` on `vcpu` (KVM_IRQ_ROUTING_XEN_EVTCHN), served by vmirq.
    pub fn route(
        &self,
        m: &dyn Machine,
        port: u32,
        vcpu: u32,
    ) -> Result<(EdgeIrqfd, GsiRoute, EventFd), vmirq::Error> {
        Self::route_to(m, port, vcpu)
    }

    /// [`Self::route`] for event channels attached some other way.
    pub fn route_to(
        m: &dyn Machine,
        port: u32,
        vcpu: u32,
    ) -> Result<(EdgeIrqfd, GsiRoute, EventFd), vmirq::Error> {
        let irq = m.interrupts();
        let gsi = irq.new_route(Route::XenEvtchn {
            port,
            vcpu,
            priority: 7,
        })?;
        let fd = eventfd()?;
        let irqfd = gsi.assign_irqfd(&fd)?;
        Ok((irqfd, gsi, fd))
    }
}

/// A failed hypercall's result as an error.
fn xen_error(result: i64) -> vmirq::Error {
    vmirq::xen::XenError::from_result(result).map_or(
        vmirq::Error::Unsupported("make sense of a hypercall result"),
        vmirq::Error::Xen,
    )
}

/// A small deterministic PRNG (xorshift64), for reproducible random choices.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Puts `items` in a uniformly random order (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, (self.next() % (i as u64 + 1)) as usize);
        }
    }
}
