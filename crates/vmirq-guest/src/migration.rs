//! Live migration of a test guest with every interrupt path attached: a source machine is
//! paused and saved, its interrupt state serialized to bytes, and a fresh machine of the same
//! kind restored from it, while the devices keep their eventfds (and may keep signalling them).
//! The guest's counters live in its RAM and go on counting on the target.
//!
//! The order is the one `vmirq::Interrupts::save` documents for a VMM: stop the vCPUs, pause
//! vmirq, save, release the source's irqfds (from then on signals wait in the eventfds), take
//! the vCPU state and RAM, boot the target from them, restore, take every object back on the
//! same eventfds, resume. [`Phase`] names each gap, so a caller can fire devices inside it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;
use vmirq::msix::{MsixTable, MsixVectors};
use vmirq::snapshot::ObjectState;
use vmirq::xen::{attach, EventChannels, Upcalls, XenConfig};
use vmirq::{
    EdgeIrqfd, GsiRoute, Interrupts, IrqchipMode, LevelIrqfd, MsiMessage, Route, Snapshot, X86Msi,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::layout::{XEN_SHARED_INFO, XEN_UPCALL_VECTOR};
use crate::machine::{
    boot, boot_migrated, hypercall_op, BackendKind, Machine, MachineConfig, MachineError,
};

/// vCPUs of the migrated guest.
pub const VCPUS: usize = 2;
/// An MSI route served by a kernel irqfd: vector 0x50 on vCPU 0.
pub const MSI_KERNEL_VECTOR: u8 = 0x50;
/// An MSI route served by a userspace irqfd: vector 0x51 on vCPU 1.
pub const MSI_USER_VECTOR: u8 = 0x51;
/// A second kernel MSI irqfd a device signals continuously: vector 0x52 on vCPU 1.
pub const STREAM_VECTOR: u8 = 0x52;
/// IOAPIC pin 5, edge, vector 0x45 on vCPU 0, through an edge irqfd on the pin.
pub const EDGE_PIN: u32 = 5;
/// See [`EDGE_PIN`].
pub const EDGE_VECTOR: u8 = 0x45;
/// IOAPIC pin 7, level, vector 0x47 on vCPU 1, through a level irqfd with a resamplefd.
pub const LEVEL_PIN: u32 = 7;
/// See [`LEVEL_PIN`].
pub const LEVEL_VECTOR: u8 = 0x47;
/// MSI-X vectors of the test device: vector `v` delivers 0x60 + v to vCPU v % 2.
pub const MSIX_VECTORS: u16 = 4;
/// Xen ports bound by the guest (IPI ports, one per vCPU), each fed by an eventfd route.
pub const XEN_PORTS: usize = 2;
/// Triggers a [`migrate_round`] fires: MSI kernel and user, edge pin, level pin, one MSI-X
/// vector, one Xen port.
pub const PACED_PATHS: usize = 6;

const ARGS: u32 = crate::layout::SCRATCH as u32;
const EVTCHNOP_BIND_IPI: u32 = 7;
const EVTCHNOP_UNMASK: u32 = 9;

/// The vector MSI-X vector `v` delivers.
pub fn msix_vector(v: u16) -> u8 {
    0x60 + v as u8
}

/// The vCPU MSI-X vector `v` delivers to.
pub fn msix_vcpu(v: u16) -> usize {
    usize::from(v) % VCPUS
}

/// Where a migration is when [`Migrating::migrate`] calls back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// The source's vCPUs stopped and its interrupts paused.
    Paused,
    /// The source's interrupts saved (and serialized).
    Saved,
    /// The source's irqfds released: signals wait in the eventfds.
    Released,
    /// The target booted from the image, its interrupts restored, paused; objects not back.
    Restored,
    /// Every object back on the target, still paused.
    Attached,
}

/// Every phase, in order.
pub const PHASES: [Phase; 5] = [
    Phase::Paused,
    Phase::Saved,
    Phase::Released,
    Phase::Restored,
    Phase::Attached,
];

/// The devices: their eventfds outlive every VM (a device keeps its eventfd across a
/// migration; vmirq's objects on each VM bind them).
pub struct Devices {
    pub msi_kernel: EventFd,
    pub msi_user: EventFd,
    pub stream: EventFd,
    pub edge: EventFd,
    pub level: EventFd,
    pub resample: EventFd,
    /// Clones of the MSI-X device's trigger eventfds.
    pub msix: Vec<EventFd>,
    /// One eventfd per Xen port route.
    pub xen: Vec<EventFd>,
}

impl Devices {
    fn new() -> Result<Self, MachineError> {
        let fd = || EventFd::new(EFD_NONBLOCK).map_err(|_| vmirq::Error::BadEventFd);
        Ok(Self {
            msi_kernel: fd()?,
            msi_user: fd()?,
            stream: fd()?,
            edge: fd()?,
            level: fd()?,
            resample: fd()?,
            msix: Vec::new(),
            xen: (0..XEN_PORTS).map(|_| fd()).collect::<Result<_, _>>()?,
        })
    }
}

/// vmirq's objects for the devices on one VM.
struct Attached {
    routes: [GsiRoute; 3],
    irqfds: Vec<EdgeIrqfd>,
    level: LevelIrqfd,
    msix: MsixVectors,
    xen_routes: Vec<GsiRoute>,
    xen_irqfds: Vec<EdgeIrqfd>,
    channels: Arc<EventChannels>,
    upcalls: Arc<Upcalls>,
}

/// A guest with every path attached, that can migrate to a fresh machine.
pub struct Migrating {
    machine: Box<dyn Machine>,
    attached: Attached,
    kind: BackendKind,
    irqchip: IrqchipMode,
    /// The guest's Xen ports, in [`Devices::xen`] order.
    ports: Vec<u32>,
}

/// What one migration cost.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// From the source's pause to the target's resume.
    pub downtime: Duration,
    /// The serialized interrupt state.
    pub bytes: usize,
}

fn msi(vcpu: usize, vector: u8) -> Result<MsiMessage, MachineError> {
    X86Msi::fixed(vcpu as u32, vector)
        .encode()
        .map_err(|_| vmirq::Error::Unsupported("encode a test MSI").into())
}

fn xen_config() -> XenConfig {
    XenConfig {
        vcpus: VCPUS as u32,
        long_mode: false,
        shared_info_gpa: XEN_SHARED_INFO,
        domid: 1,
    }
}

/// The machine's guest serves its hypercalls with `channels`.
pub fn serve_hypercalls(m: &dyn Machine, channels: &Arc<EventChannels>) {
    let ch = Arc::clone(channels);
    m.set_hypercall_handler(Arc::new(move |vcpu: usize, cmd: u32, args: u64| {
        ch.hypercall(vcpu as u32, cmd, args)
    }));
}

/// The guest masks Xen `port` as Linux does: a plain write of its mask bit in its (compat
/// layout) shared_info.
pub fn mask_xen_port(m: &dyn Machine, port: u32) -> Result<(), MachineError> {
    let word = XEN_SHARED_INFO + 0x880 + u64::from(port / 32) * 4;
    let mut b = [0u8; 4];
    m.read_guest(word, &mut b)?;
    let w = u32::from_le_bytes(b) | 1 << (port % 32);
    m.write_guest(word, &w.to_le_bytes())
}

/// The guest issues EVTCHNOP `cmd` with `first` as its first argument dword; returns the
/// result and the second dword as the hypercall left it.
pub fn xen_hypercall(m: &dyn Machine, cmd: u32, first: u32) -> Result<(i64, u32), MachineError> {
    let mut args = [0u8; 8];
    args[..4].copy_from_slice(&first.to_le_bytes());
    m.write_guest(u64::from(ARGS), &args)?;
    let r = m.guest_mmio(&[hypercall_op(cmd, ARGS)])?[0] as i32;
    m.read_guest(u64::from(ARGS), &mut args)?;
    Ok((
        i64::from(r),
        u32::from_le_bytes([args[4], args[5], args[6], args[7]]),
    ))
}

impl Migrating {
    /// Boots the guest on `kind` with `irqchip` and attaches every path to fresh devices.
    pub fn boot(kind: BackendKind, irqchip: IrqchipMode) -> Result<(Self, Devices), MachineError> {
        let config = MachineConfig::new(VCPUS, irqchip)
            .ioapic_pin(EDGE_PIN, EDGE_VECTOR, 0, false)
            .ioapic_pin(LEVEL_PIN, LEVEL_VECTOR, 1, true);
        let machine = boot(kind, &config)?;
        let mut devices = Devices::new()?;
        let irq = Arc::clone(machine.interrupts());
        let routes = [
            irq.new_route(Route::msi(msi(0, MSI_KERNEL_VECTOR)?))?,
            irq.new_route(Route::msi(msi(1, MSI_USER_VECTOR)?))?,
            irq.new_route(Route::msi(msi(1, STREAM_VECTOR)?))?,
        ];
        let irqfds = vec![
            routes[0].assign_irqfd(&devices.msi_kernel)?,
            routes[1].assign_irqfd_on(&devices.msi_user, Some(vmirq::IrqfdPath::User))?,
            routes[2].assign_irqfd(&devices.stream)?,
            irq.pin(EDGE_PIN)?.assign_irqfd(&devices.edge)?,
        ];
        let level = irq
            .pin(LEVEL_PIN)?
            .assign_level_irqfd(&devices.level, &devices.resample)?;
        let msix = MsixVectors::new(Arc::clone(&irq), MsixTable::new(MSIX_VECTORS))
            .map_err(|_| vmirq::Error::Unsupported("create the MSI-X device"))?;
        let mut writes = Vec::new();
        for v in 0..MSIX_VECTORS {
            let m = msi(msix_vcpu(v), msix_vector(v))?;
            let at = u64::from(v) * 16;
            writes.push((at, m.address_lo().to_le_bytes().to_vec()));
            writes.push((at + 8, m.data.to_le_bytes().to_vec()));
            writes.push((at + 12, 0u32.to_le_bytes().to_vec()));
        }
        let batch: Vec<(u64, &[u8])> = writes.iter().map(|(o, d)| (*o, d.as_slice())).collect();
        msix.write_message_control(1 << 15);
        let events = msix.bar_write_batch(&batch);
        if !events.is_empty() {
            return Err(vmirq::Error::Unsupported("route the MSI-X vectors").into());
        }
        devices.msix = (0..MSIX_VECTORS)
            .map(|v| msix.trigger(v))
            .collect::<Result<_, _>>()
            .map_err(|_| vmirq::Error::BadEventFd)?;
        let memory = machine
            .guest_memory()
            .ok_or(MachineError::NoGuestMemory)?
            .clone();
        let (channels, upcalls) = attach(&irq, memory, xen_config());
        for vcpu in 0..VCPUS as u32 {
            upcalls
                .set_upcall_vector(vcpu, Some(XEN_UPCALL_VECTOR))
                .map_err(|_| vmirq::Error::Unsupported("set the Xen upcall vector"))?;
        }
        serve_hypercalls(&*machine, &channels);
        let mut ports = Vec::new();
        let mut xen_routes = Vec::new();
        let mut xen_irqfds = Vec::new();
        for (i, fd) in devices.xen.iter().enumerate() {
            let vcpu = (i % VCPUS) as u32;
            let (r, port) = xen_hypercall(&*machine, EVTCHNOP_BIND_IPI, vcpu)?;
            if r != 0 {
                return Err(vmirq::Error::Unsupported("bind a Xen IPI port").into());
            }
            let route = irq.new_route(Route::XenEvtchn {
                port,
                vcpu,
                priority: 7,
            })?;
            xen_irqfds.push(route.assign_irqfd(fd)?);
            xen_routes.push(route);
            ports.push(port);
        }
        let rig = Self {
            machine,
            attached: Attached {
                routes,
                irqfds,
                level,
                msix,
                xen_routes,
                xen_irqfds,
                channels,
                upcalls,
            },
            kind,
            irqchip,
            ports,
        };
        Ok((rig, devices))
    }

    /// The machine the guest runs on now.
    pub fn machine(&self) -> &dyn Machine {
        &*self.machine
    }

    /// The MSI-X device on the current VM (the guest's table accesses go to it).
    pub fn msix(&self) -> &MsixVectors {
        &self.attached.msix
    }

    /// The guest's Xen port fed by [`Devices::xen`]`[i]`.
    pub fn port(&self, i: usize) -> u32 {
        self.ports[i]
    }

    /// The vCPU Xen port `i` notifies.
    pub fn port_vcpu(i: usize) -> usize {
        i % VCPUS
    }

    /// The guest masks or unmasks MSI-X vector `v` (a table write).
    pub fn mask_msix(&self, v: u16, masked: bool) -> bool {
        self.attached
            .msix
            .bar_write(u64::from(v) * 16 + 12, &u32::from(masked).to_le_bytes())
            .is_empty()
    }

    /// The guest masks Xen port `i` (a plain write of its mask bit, as Linux does).
    pub fn mask_port(&self, i: usize) -> Result<(), MachineError> {
        mask_xen_port(&*self.machine, self.ports[i])
    }

    /// The guest unmasks Xen port `i` (EVTCHNOP_unmask).
    pub fn unmask_port(&self, i: usize) -> Result<(), MachineError> {
        match xen_hypercall(&*self.machine, EVTCHNOP_UNMASK, self.ports[i])? {
            (0, _) => Ok(()),
            _ => Err(vmirq::Error::Unsupported("unmask a Xen port").into()),
        }
    }

    /// Moves the guest to a fresh machine of the same kind; `during` runs in each [`Phase`]
    /// with the machine that is current then (the source until [`Phase::Released`]).
    pub fn migrate(
        self,
        devices: &Devices,
        mut during: impl FnMut(Phase, &dyn Machine),
    ) -> Result<(Self, Migration), MachineError> {
        let Self {
            machine,
            attached,
            kind,
            irqchip,
            ports,
        } = self;
        let start = Instant::now();
        // Source: vCPUs first, so nothing the guest does changes what is saved.
        machine.pause_vcpus();
        let irq = Arc::clone(machine.interrupts());
        irq.pause();
        during(Phase::Paused, &*machine);
        let mut snapshot = irq.save()?;
        let insert = |s: &mut Snapshot, key: &str, o: &dyn vmirq::Save| s.insert(key, o);
        let keys = ["msi/kernel", "msi/user", "msi/stream"];
        for (key, route) in keys.iter().zip(&attached.routes) {
            insert(&mut snapshot, &format!("{key}/route"), route)?;
        }
        for (key, irqfd) in keys.iter().chain(&["pin/edge"]).zip(&attached.irqfds) {
            insert(&mut snapshot, &format!("{key}/irqfd"), irqfd)?;
        }
        insert(&mut snapshot, "pin/level", &attached.level)?;
        insert(&mut snapshot, "msix", &attached.msix)?;
        for (i, (route, irqfd)) in attached
            .xen_routes
            .iter()
            .zip(&attached.xen_irqfds)
            .enumerate()
        {
            insert(&mut snapshot, &format!("xen/{i}/route"), route)?;
            insert(&mut snapshot, &format!("xen/{i}/irqfd"), irqfd)?;
        }
        snapshot.insert_state(
            "xen",
            ObjectState::Xen(attached.channels.save(&attached.upcalls)),
        )?;
        let bytes = snapshot.to_bytes();
        during(Phase::Saved, &*machine);
        // Release the source's objects: KVM finishes in-flight injections before a deassign
        // returns, so from here on every signal waits in its eventfd.
        drop(attached);
        during(Phase::Released, &*machine);
        let image = machine.stop_for_migration()?;
        drop(irq);
        drop(machine);

        let snapshot = Snapshot::from_bytes(&bytes)?;
        let config = MachineConfig::new(VCPUS, irqchip).restored_from(snapshot);
        let machine = boot_migrated(kind, &config, &image)?;
        let restored = machine
            .take_restored()
            .ok_or(vmirq::Error::Unsupported("restore without a snapshot"))?;
        during(Phase::Restored, &*machine);
        let memory: GuestMemoryMmap = machine
            .guest_memory()
            .ok_or(MachineError::NoGuestMemory)?
            .clone();
        let (channels, upcalls, _backends) = restored.xen("xen", memory, VCPUS as u32)?;
        serve_hypercalls(&*machine, &channels);
        let route = |key: &str| restored.route(&format!("{key}/route"));
        let routes = [route(keys[0])?, route(keys[1])?, route(keys[2])?];
        let fds = [&devices.msi_kernel, &devices.msi_user, &devices.stream];
        let mut irqfds = Vec::new();
        for ((key, route), fd) in keys.iter().zip(&routes).zip(fds) {
            let state = restored.irqfd(&format!("{key}/irqfd"))?;
            irqfds.push(route.restore_irqfd(fd, &state)?);
        }
        let irq = Arc::clone(restored.interrupts());
        let state = restored.irqfd("pin/edge/irqfd")?;
        irqfds.push(irq.pin(EDGE_PIN)?.restore_irqfd(&devices.edge, &state)?);
        let state = restored.irqfd("pin/level")?;
        let level =
            irq.pin(LEVEL_PIN)?
                .restore_level_irqfd(&devices.level, &devices.resample, &state)?;
        let triggers = devices
            .msix
            .iter()
            .map(|fd| fd.try_clone().map_err(|_| vmirq::Error::BadEventFd))
            .collect::<Result<Vec<_>, _>>()?;
        let (msix, events) = restored.msix_on("msix", Some(triggers))?;
        if !events.is_empty() {
            return Err(vmirq::Error::Unsupported("restore the MSI-X vectors").into());
        }
        let mut xen_routes = Vec::new();
        let mut xen_irqfds = Vec::new();
        for (i, fd) in devices.xen.iter().enumerate() {
            let route = restored.route(&format!("xen/{i}/route"))?;
            let state = restored.irqfd(&format!("xen/{i}/irqfd"))?;
            xen_irqfds.push(route.restore_irqfd(fd, &state)?);
            xen_routes.push(route);
        }
        during(Phase::Attached, &*machine);
        let irq: Arc<Interrupts> = restored.finish()?;
        irq.resume()?;
        machine.resume_vcpus()?;
        let migration = Migration {
            downtime: start.elapsed(),
            bytes: bytes.len(),
        };
        let rig = Self {
            machine,
            attached: Attached {
                routes,
                irqfds,
                level,
                msix,
                xen_routes,
                xen_irqfds,
                channels,
                upcalls,
            },
            kind,
            irqchip,
            ports,
        };
        Ok((rig, migration))
    }
}

/// One round of a migration test: which phase the devices fire in, which MSI-X vector and
/// Xen port they use, and whether the guest masks those first (the trigger is then owed
/// until the guest unmasks on the target).
#[derive(Clone, Copy, Debug)]
pub struct Round {
    pub phase: Phase,
    pub msix: u16,
    pub port: usize,
    pub mask_msix: bool,
    pub mask_port: bool,
}

impl Round {
    /// Round `n`: the phases in turn, the rest from `rng` (a xorshift64 state).
    pub fn pick(n: usize, rng: &mut u64) -> Self {
        let mut next = || {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            *rng
        };
        Self {
            phase: PHASES[n % PHASES.len()],
            msix: (next() % u64::from(MSIX_VECTORS)) as u16,
            port: (next() % XEN_PORTS as u64) as usize,
            mask_msix: next() % 2 == 0,
            mask_port: next() % 2 == 0,
        }
    }
}

/// What a round saw on the target.
#[derive(Debug)]
pub struct Outcome {
    /// Triggers fired (one per paced path).
    pub sent: u64,
    /// Interrupts the guest counted for them.
    pub delivered: u64,
    /// Paths whose trigger never arrived, named.
    pub lost: Vec<String>,
    /// Paths that delivered more than once, named.
    pub duplicated: Vec<String>,
    pub migration: Migration,
}

/// The paced paths a round fires: a name, where the guest counts it, and its device eventfd.
fn paced<'a>(
    rig: &Migrating,
    devices: &'a Devices,
    round: &Round,
) -> Vec<(String, Counter, &'a EventFd)> {
    let v = round.msix;
    vec![
        (
            "msi-kernel".into(),
            Counter::Vector(0, MSI_KERNEL_VECTOR),
            &devices.msi_kernel,
        ),
        (
            "msi-user".into(),
            Counter::Vector(1, MSI_USER_VECTOR),
            &devices.msi_user,
        ),
        (
            "pin-edge".into(),
            Counter::Vector(0, EDGE_VECTOR),
            &devices.edge,
        ),
        (
            "level-resample".into(),
            Counter::Vector(1, LEVEL_VECTOR),
            &devices.level,
        ),
        (
            format!("msix vector {v}"),
            Counter::Vector(msix_vcpu(v), msix_vector(v)),
            &devices.msix[usize::from(v)],
        ),
        (
            format!("xen port {}", rig.port(round.port)),
            Counter::Port(rig.port(round.port)),
            &devices.xen[round.port],
        ),
    ]
}

/// Where the guest counts a path's interrupts.
#[derive(Clone, Copy, Debug)]
enum Counter {
    Vector(usize, u8),
    Port(u32),
}

impl Counter {
    fn read(self, m: &dyn Machine) -> u64 {
        match self {
            Counter::Vector(vcpu, vector) => m.count(vcpu, vector),
            Counter::Port(port) => u64::from(m.port_counter(port)),
        }
    }
}

/// Fires every paced path once inside `round.phase` of a migration of `rig` to a fresh
/// machine, then (on the target, after the guest unmasks what it masked) waits up to `wait`
/// for each, and checks nothing came twice (the vCPUs' control interrupts are taken after
/// anything pending). The level pin's resamplefd is drained.
pub fn migrate_round(
    rig: Migrating,
    devices: &Devices,
    round: &Round,
    wait: Duration,
) -> Result<(Migrating, Outcome), MachineError> {
    if round.mask_msix && !rig.mask_msix(round.msix, true) {
        return Err(vmirq::Error::Unsupported("mask an MSI-X vector").into());
    }
    if round.mask_port {
        rig.mask_port(round.port)?;
    }
    let paths = paced(&rig, devices, round);
    let before: Vec<u64> = paths
        .iter()
        .map(|(_, c, _)| c.read(rig.machine()))
        .collect();
    let fds: Vec<&EventFd> = paths.iter().map(|(_, _, fd)| *fd).collect();
    let names: Vec<(String, Counter)> = paths.into_iter().map(|(n, c, _)| (n, c)).collect();
    let mut fired = Ok(());
    let (rig, migration) = rig.migrate(devices, |now, _| {
        if now == round.phase {
            for fd in &fds {
                if let Err(e) = fd.write(1) {
                    fired = Err(e);
                }
            }
        }
    })?;
    fired.map_err(|_| vmirq::Error::BadEventFd)?;
    if round.mask_msix && !rig.mask_msix(round.msix, false) {
        return Err(vmirq::Error::Unsupported("unmask an MSI-X vector").into());
    }
    if round.mask_port {
        rig.unmask_port(round.port)?;
    }
    let m = rig.machine();
    let mut outcome = Outcome {
        sent: names.len() as u64,
        delivered: 0,
        lost: Vec::new(),
        duplicated: Vec::new(),
        migration,
    };
    let deadline = Instant::now() + wait;
    let left = || deadline.saturating_duration_since(Instant::now());
    for ((name, counter), was) in names.iter().zip(&before) {
        if !m.wait_until(left(), &mut || counter.read(m) > *was) {
            outcome
                .lost
                .push(format!("{name} (fired while {:?})", round.phase));
        }
    }
    m.wait_until(left(), &mut || devices.resample.read().is_ok());
    for vcpu in 0..VCPUS {
        m.control(vcpu);
    }
    for ((name, counter), was) in names.iter().zip(&before) {
        let got = counter.read(m) - was;
        outcome.delivered += got;
        if got > 1 {
            outcome
                .duplicated
                .push(format!("{name} x{got} (fired while {:?})", round.phase));
        }
    }
    Ok((rig, outcome))
}
