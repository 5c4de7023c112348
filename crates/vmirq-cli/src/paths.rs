//! The interrupt paths the demo and the bench drive, each rigged on a booted machine.

use std::time::{Duration, Instant};

use vmirq::{Gsi, GsiHandle, Irqfd, IrqfdPath, MsiMessage, Route, X86Msi};
use vmirq_guest::machine::{Machine, MachineConfig};
use vmm_sys_util::eventfd::EventFd;

/// Where every path sends its interrupts: vCPU 1, an AP, so vCPU 0's boot work is never in the way.
pub const TARGET_VCPU: usize = 1;
pub const PIN: u32 = 5;
const PIN_VECTOR: u8 = 0x45;

/// The machine the paths need: 2 vCPUs, IOAPIC pin 5 programmed edge to vCPU 1.
pub fn machine_config(irqchip: vmirq::IrqchipMode) -> MachineConfig {
    MachineConfig::new(2, irqchip).ioapic_pin(PIN, PIN_VECTOR, TARGET_VCPU as u8, false)
}

/// One path ready to fire.
pub struct Rig {
    pub name: &'static str,
    pub vector: u8,
    fire: Box<dyn Fn() -> Result<(), vmirq::Error> + Send + Sync>,
    /// What must live as long as the path does (GSI, eventfd, irqfd).
    _keep: Option<(Option<GsiHandle>, EventFd, Irqfd)>,
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

fn irqfd_rig(
    m: &dyn Machine,
    name: &'static str,
    vector: u8,
    gsi: Option<GsiHandle>,
    target: Gsi,
    path: Option<IrqfdPath>,
) -> Result<Rig, vmirq::Error> {
    let irq = m.interrupts();
    let fd = EventFd::new(0).map_err(|_| vmirq::Error::BadEventFd)?;
    let irqfd = irq.assign_irqfd_on(&fd, target, path)?;
    let trigger = fd.try_clone().map_err(|_| vmirq::Error::BadEventFd)?;
    Ok(Rig {
        name,
        vector,
        fire: Box::new(move || trigger.write(1).map_err(|_| vmirq::Error::BadEventFd)),
        _keep: Some((gsi, fd, irqfd)),
    })
}

fn msi_irqfd_rig(
    m: &dyn Machine,
    name: &'static str,
    vector: u8,
    path: IrqfdPath,
) -> Result<Rig, vmirq::Error> {
    let irq = m.interrupts();
    let gsi = irq.allocate_gsi()?;
    let mut batch = irq.routes();
    batch.set(gsi.gsi(), Route::msi(msi(vector)))?;
    batch.commit()?;
    let target = gsi.gsi();
    irqfd_rig(m, name, vector, Some(gsi), target, Some(path))
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
                _keep: None,
            })
        }
        "msi-irqfd-kernel" => msi_irqfd_rig(m, "msi-irqfd-kernel", 0x71, IrqfdPath::Kernel),
        "msi-irqfd-user" => msi_irqfd_rig(m, "msi-irqfd-user", 0x72, IrqfdPath::User),
        "pin-edge" => irqfd_rig(m, "pin-edge", PIN_VECTOR, None, Gsi(PIN), None),
        _ => Err(vmirq::Error::Unsupported("rig an unknown path")),
    }
}

/// Fires once and waits for the interrupt; the latency from trigger to the guest's ISR report.
pub fn round_trip(
    m: &dyn Machine,
    rig: &Rig,
    timeout: Duration,
) -> Result<Option<Duration>, vmirq::Error> {
    let t0 = Instant::now();
    rig.fire()?;
    Ok(m.wait_isr(Some(TARGET_VCPU), rig.vector, timeout)
        .map(|ev| ev.at.saturating_duration_since(t0)))
}
