//! The simulated backend: a deterministic stand-in for KVM and the vCPUs.
//!
//! It plays the hypervisor's part exactly as the core sees it through [`Backend`]: a routing
//! table, `signal_msi`, irqfds (edge and, in the kernel irqchip mode, level with resample), an
//! in-"kernel" IOAPIC in [`IrqchipMode::Kernel`], and per-vCPU [`Lapic`]s. The vCPUs run a fixed
//! guest: take the highest deliverable vector, count it, report it to the observer, EOI.
//!
//! Kernel irqfds are served as KVM serves them, by a thread of the "hypervisor" (started with
//! the first irqfd, asleep in `epoll_wait` while none fires), concurrently with route commits
//! and deassigns: a fire injects under the state lock, so once a commit or a deassign returns
//! no fire uses the old routes or the gone irqfd (KVM: SRCU and the irqfd shutdown flush).
//! The vCPUs run only when driven: [`SimBackend::run_until_idle`] lets every vCPU take what is
//! pending, so a test drives them step by step. One mutex guards all state; EOIs bound for the
//! core are handed over after the mutex is released (the core calls back into the backend
//! while handling them).
//!
//! When a vCPU's LAPIC sees the EOI of a vector it took is an [`EoiTiming`]: at delivery (as
//! the KVM on vmirq's development host does) or when the guest's handler ends (as standard
//! KVM does); behaviour tests run with both.

mod lapic;

pub use lapic::Lapic;

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::{Backend, BackendError, EoiSink, IrqchipMode, KernelIrqchip, KernelRoute};
use crate::ioapic::{Effects, Ioapic, IOAPIC_BASE, IOAPIC_MMIO_SIZE};
use crate::irqfd::{eventfd_id, is_open, EventfdId};
use crate::msi::{DeliveryMode, MsiMessage, X86Msi};
use crate::route::{Gsi, Route};
use crate::router::lock;

/// When a simulated vCPU's LAPIC retires (EOIs) an interrupt it took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EoiTiming {
    /// At delivery: the vector is retired as it is taken, so a level line still high at that
    /// moment re-delivers at once. What the KVM on vmirq's development host does
    /// (`../shared/REFERENCE.md` §1).
    #[default]
    AtDelivery,
    /// At the guest's EOI: the vector stays in service (blocking its priority class, and with
    /// the IOAPIC pin's Remote IRR set) until the guest's handler ends, which on the simulator
    /// is the start of the next [`SimBackend::run_until_idle`]. What standard KVM does.
    GuestEoi,
}

/// Called for every interrupt a simulated vCPU takes: (vCPU, vector).
pub type IsrObserver = Box<dyn Fn(usize, u8) + Send + Sync>;

/// Most rounds [`SimBackend::run_until_idle`] runs before returning (a guest interrupt storm
/// must not hang the test driving it).
pub const MAX_ROUNDS: usize = 100_000;

/// How long the in-"kernel" IOAPIC's storm guard holds a re-delivery back.
const STORM_DELAY: Duration = Duration::from_millis(10);

/// The chip id of the simulated in-kernel IOAPIC in [`KernelIrqchip`] (KVM's `KVM_IRQCHIP_IOAPIC`).
const SIM_IOAPIC_CHIP: u32 = 2;

/// KVM's irq source ID for `KVM_IRQ_LINE` and for edge irqfd pulses alike
/// (`KVM_USERSPACE_IRQ_SOURCE_ID`): one bit per IOAPIC pin, so a pulse's falling half drops a
/// level `KVM_IRQ_LINE` holds on the same pin. The resampler's source is the IOAPIC model's
/// resampled input, which the model itself drops on EOI.
const SOURCE_USER: u8 = 1 << 0;

struct SimIrqfd {
    /// The irqfd thread's epoll token.
    token: u64,
    /// The eventfd's identity: KVM refuses a second irqfd on the same eventfd file (EBUSY)
    /// and matches a deassign by file, whatever descriptor names it.
    key: EventfdId,
    fd: EventFd,
    gsi: Gsi,
    resample: Option<EventFd>,
}

#[derive(Clone)]
struct SimVcpu {
    lapic: Lapic,
    counts: Box<[u64; 256]>,
    nmis: u64,
}

struct SimState {
    vcpus: Vec<SimVcpu>,
    routes: HashMap<Gsi, Vec<Route>>,
    irqfds: Vec<SimIrqfd>,
    /// Kernel irqchip mode: the in-kernel IOAPIC and each pin's line sources (KVM keeps them
    /// per pin, `ioapic->irq_states`, whatever GSI drove them).
    ioapic: Option<Ioapic>,
    sources: HashMap<u32, u8>,
    /// Split irqchip: per vCPU, the vectors whose EOI exits (see [`eoi_exit_vectors`]).
    eoi_exits: Vec<[bool; 256]>,
    /// Kernel irqchip: storm-guard re-deliveries and when they are due (KVM: HZ / 100).
    deferred: Vec<(u32, Instant)>,
    dropped_msis: u64,
    next_token: u64,
}

/// Saved simulated vCPUs ([`SimBackend::save_vcpus`]).
#[derive(Clone)]
pub struct SimVcpus(Vec<SimVcpu>);

impl std::fmt::Debug for SimVcpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimVcpus")
            .field("vcpus", &self.0.len())
            .finish()
    }
}

/// The thread serving kernel irqfds, and how to stop it.
struct IrqfdThread {
    epoll: Arc<Epoll>,
    stop: EventFd,
    handle: Option<std::thread::JoinHandle<()>>,
}

/// Epoll token of [`IrqfdThread::stop`]; irqfd tokens start above it.
const STOP_TOKEN: u64 = 0;

/// A deterministic simulated hypervisor. See the module docs.
pub struct SimBackend {
    mode: IrqchipMode,
    eoi_timing: EoiTiming,
    /// Never held with `state`.
    irqfd_thread: Mutex<Option<IrqfdThread>>,
    /// Shared with the irqfd thread (which never holds the backend itself, so dropping the
    /// backend always stops and joins it).
    state: Arc<Mutex<SimState>>,
    eoi_sink: Mutex<Option<Weak<dyn EoiSink>>>,
    observer: Mutex<Option<IsrObserver>>,
    commits: AtomicU64,
    /// Test hook: refuse the next N route commits, as a hypervisor out of memory would.
    refuse_commits: AtomicU64,
    /// Test hook: route commits wait here while held (a slow `KVM_SET_GSI_ROUTING`).
    commit_gate: Gate,
    /// Test hook: irqfd assigns and deassigns wait here while held (a slow `KVM_IRQFD`).
    irqfd_gate: Gate,
}

/// A test hook standing for a slow hypervisor call: while held, callers wait inside it,
/// except as many as [`Gate::pass`] lets through (one each).
#[derive(Default)]
struct Gate {
    /// (held, passes left).
    state: Mutex<(bool, u64)>,
    released: Condvar,
    waiting: AtomicU64,
}

impl Gate {
    fn hold(&self, hold: bool) {
        *lock(&self.state) = (hold, 0);
        self.released.notify_all();
    }

    fn pass(&self, n: u64) {
        lock(&self.state).1 += n;
        self.released.notify_all();
    }

    fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Waits while the gate is held and no pass is left.
    fn go_through(&self) {
        let mut state = lock(&self.state);
        if !state.0 {
            return;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        while state.0 && state.1 == 0 {
            state = self.released.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if state.0 {
            state.1 -= 1;
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl SimBackend {
    /// A simulated VM with `vcpus` vCPUs (at least 1) and its irqchip in `mode`, retiring
    /// interrupts at delivery ([`EoiTiming::AtDelivery`]).
    pub fn new(vcpus: usize, mode: IrqchipMode) -> Arc<Self> {
        Self::with_eoi_timing(vcpus, mode, EoiTiming::AtDelivery)
    }

    /// A simulated VM whose vCPUs retire the interrupts they take at `eoi_timing`.
    pub fn with_eoi_timing(vcpus: usize, mode: IrqchipMode, eoi_timing: EoiTiming) -> Arc<Self> {
        let vcpus = (0..vcpus.max(1))
            .map(|_| SimVcpu {
                lapic: Lapic::default(),
                counts: Box::new([0; 256]),
                nmis: 0,
            })
            .collect();
        Arc::new(Self {
            mode,
            eoi_timing,
            irqfd_thread: Mutex::new(None),
            state: Arc::new(Mutex::new(SimState {
                vcpus,
                routes: HashMap::new(),
                irqfds: Vec::new(),
                ioapic: (mode == IrqchipMode::Kernel).then(|| Ioapic::new(mode.ioapic_pins())),
                sources: HashMap::new(),
                deferred: Vec::new(),
                eoi_exits: Vec::new(),
                dropped_msis: 0,
                next_token: STOP_TOKEN + 1,
            })),
            eoi_sink: Mutex::new(None),
            observer: Mutex::new(None),
            commits: AtomicU64::new(0),
            refuse_commits: AtomicU64::new(0),
            commit_gate: Gate::default(),
            irqfd_gate: Gate::default(),
        })
    }

    /// vCPUs of the VM.
    pub fn vcpus(&self) -> usize {
        lock(&self.state).vcpus.len()
    }

    /// Interrupts vCPU `vcpu` has taken on `vector`.
    pub fn count(&self, vcpu: usize, vector: u8) -> u64 {
        lock(&self.state)
            .vcpus
            .get(vcpu)
            .map_or(0, |v| v.counts[usize::from(vector)])
    }

    /// Interrupts taken so far, on every vCPU and vector.
    pub fn taken(&self) -> u64 {
        lock(&self.state)
            .vcpus
            .iter()
            .map(|v| v.counts.iter().sum::<u64>())
            .sum()
    }

    /// NMIs vCPU `vcpu` has taken.
    pub fn nmis(&self, vcpu: usize) -> u64 {
        lock(&self.state).vcpus.get(vcpu).map_or(0, |v| v.nmis)
    }

    /// MSIs that named no vCPU or no deliverable mode.
    pub fn dropped_msis(&self) -> u64 {
        lock(&self.state).dropped_msis
    }

    /// Whether `vector` is pending (in IRR) on `vcpu`.
    pub fn is_pending(&self, vcpu: usize, vector: u8) -> bool {
        lock(&self.state)
            .vcpus
            .get(vcpu)
            .is_some_and(|v| v.lapic.is_pending(vector))
    }

    /// Route tables committed so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Makes the next `n` route commits fail with a hypervisor error.
    pub fn refuse_next_commits(&self, n: u64) {
        self.refuse_commits.store(n, Ordering::Relaxed);
    }

    /// While `hold` is set, route commits wait inside the backend, as a slow
    /// `KVM_SET_GSI_ROUTING` would (for tests that check who waits behind a commit).
    pub fn hold_commits(&self, hold: bool) {
        self.commit_gate.hold(hold);
    }

    /// While commits are held, lets the next `n` through (the parked one first), one each.
    pub fn pass_held_commits(&self, n: u64) {
        self.commit_gate.pass(n);
    }

    /// Route commits waiting on [`SimBackend::hold_commits`] now.
    pub fn commits_held(&self) -> u64 {
        self.commit_gate.waiting()
    }

    /// While `hold` is set, kernel irqfd assigns and deassigns wait inside the backend, as a
    /// slow `KVM_IRQFD` would (for tests of what changes while a thread is inside one).
    pub fn hold_irqfd_calls(&self, hold: bool) {
        self.irqfd_gate.hold(hold);
    }

    /// Kernel irqfd assigns and deassigns waiting on [`SimBackend::hold_irqfd_calls`] now.
    pub fn irqfd_calls_held(&self) -> u64 {
        self.irqfd_gate.waiting()
    }

    /// Calls `observer` for every interrupt a simulated vCPU takes.
    pub fn set_isr_observer(&self, observer: IsrObserver) {
        *lock(&self.observer) = Some(observer);
    }

    /// Kernel irqchip mode: a guest MMIO read the in-kernel IOAPIC decodes. Returns whether
    /// it was handled (false outside the IOAPIC or in split mode).
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        let mut st = lock(&self.state);
        match (&mut st.ioapic, ioapic_offset(addr)) {
            (Some(ioapic), Some(off)) => {
                ioapic.mmio_read(off, data);
                true
            }
            _ => false,
        }
    }

    /// Kernel irqchip mode: a guest MMIO write to the in-kernel IOAPIC.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        let mut st = lock(&self.state);
        let Some(off) = ioapic_offset(addr) else {
            return false;
        };
        let mut fx = Effects::default();
        match &mut st.ioapic {
            Some(ioapic) => ioapic.mmio_write(off, data, &mut fx),
            None => return false,
        }
        st.apply_ioapic_effects(&mut fx);
        true
    }

    /// The irqfd thread's epoll set, starting the thread on first use.
    fn irqfd_epoll(&self) -> Result<Arc<Epoll>, BackendError> {
        let mut slot = lock(&self.irqfd_thread);
        if let Some(t) = slot.as_ref() {
            return Ok(Arc::clone(&t.epoll));
        }
        let io =
            |op: &'static str| move |e: std::io::Error| BackendError::Hypervisor { op, source: e };
        let epoll = Arc::new(Epoll::new().map_err(io("epoll_create"))?);
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(io("eventfd"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP_TOKEN),
            )
            .map_err(io("epoll_ctl"))?;
        let state = Arc::clone(&self.state);
        let waiter = Arc::clone(&epoll);
        let handle = std::thread::Builder::new()
            .name("sim-irqfd".into())
            .spawn(move || serve_irqfds(&state, &waiter))
            .map_err(io("spawn the irqfd thread"))?;
        *slot = Some(IrqfdThread {
            epoll: Arc::clone(&epoll),
            stop,
            handle: Some(handle),
        });
        Ok(epoll)
    }
}

/// The irqfd thread saw `token` ready: inject it if it is still assigned (under the state
/// lock, so a commit or deassign that returned is seen).
fn serve_token(state: &Mutex<SimState>, token: u64) {
    let mut st = lock(state);
    let fired = st
        .irqfds
        .iter()
        .find(|i| i.token == token)
        .filter(|i| readable(&i.fd) && i.fd.read().is_ok())
        .map(|i| (i.gsi, i.resample.is_some()));
    if let Some((gsi, level)) = fired {
        st.inject(gsi, level);
    }
}

impl SimBackend {
    /// The simulated vCPUs' state (LAPICs and the interrupts each took), as a VMM saves its
    /// vCPUs for a migration: opaque, for [`SimBackend::restore_vcpus`] of another simulator.
    pub fn save_vcpus(&self) -> SimVcpus {
        SimVcpus(lock(&self.state).vcpus.clone())
    }

    /// Takes the vCPU state another simulator saved (before anything is injected here).
    /// Refused if the vCPU counts differ.
    pub fn restore_vcpus(&self, saved: &SimVcpus) -> Result<(), BackendError> {
        let mut st = lock(&self.state);
        if saved.0.len() != st.vcpus.len() {
            return Err(BackendError::Unsupported(
                "restore vCPU state saved with another vCPU count",
            ));
        }
        st.vcpus = saved.0.clone();
        Ok(())
    }

    /// Which [`EoiTiming`] the vCPUs follow.
    pub fn eoi_timing(&self) -> EoiTiming {
        self.eoi_timing
    }

    /// Polls every irqfd and lets every vCPU take its pending interrupts until nothing is left
    /// (or [`MAX_ROUNDS`] pass). Returns the number of interrupts taken. With
    /// [`EoiTiming::GuestEoi`], the guest first ends the handlers of what it took last time
    /// (EOIs every in-service vector, highest first).
    pub fn run_until_idle(&self) -> u64 {
        if self.eoi_timing == EoiTiming::GuestEoi {
            let eois = {
                let mut st = lock(&self.state);
                let mut eois = Vec::new();
                for cpu in 0..st.vcpus.len() {
                    while let Some((v, level)) = st.vcpus[cpu].lapic.eoi() {
                        st.retire(cpu, v, level, &mut eois);
                    }
                }
                eois
            };
            self.hand_over(&eois);
        }
        let mut taken = 0;
        for _ in 0..MAX_ROUNDS {
            let (n, eois) = self.round();
            taken += n;
            self.hand_over(&eois);
            if n == 0 && eois.is_empty() {
                break;
            }
        }
        taken
    }

    /// Gives split-mode EOI exits to the core (with no lock held: the core calls back in).
    fn hand_over(&self, eois: &[u8]) {
        if eois.is_empty() {
            return;
        }
        let sink = lock(&self.eoi_sink).as_ref().and_then(Weak::upgrade);
        if let Some(sink) = &sink {
            for vector in eois {
                sink.eoi(*vector);
            }
        }
    }

    /// One round: poll irqfds, then each vCPU takes what it can. Returns interrupts taken and
    /// the level EOIs the core must see.
    fn round(&self) -> (u64, Vec<u8>) {
        let mut st = lock(&self.state);
        st.run_due_deferrals();
        st.poll_irqfds();
        let observer = lock(&self.observer);
        let mut taken = 0;
        let mut eois = Vec::new();
        for cpu in 0..st.vcpus.len() {
            // At most one pass over the 256 vectors per round: a storm yields to the others.
            for _ in 0..256 {
                let vcpu = &mut st.vcpus[cpu];
                let Some(vector) = vcpu.lapic.ack() else {
                    break;
                };
                vcpu.counts[usize::from(vector)] += 1;
                taken += 1;
                if self.eoi_timing == EoiTiming::AtDelivery {
                    if let Some((v, level)) = vcpu.lapic.eoi() {
                        st.retire(cpu, v, level, &mut eois);
                    }
                }
                if let Some(obs) = observer.as_ref() {
                    obs(cpu, vector);
                }
            }
        }
        (taken, eois)
    }
}

/// The irqfd thread: waits for any kernel irqfd to fire and injects it, until the backend goes.
fn serve_irqfds(state: &Mutex<SimState>, epoll: &Epoll) {
    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("simulated irqfd thread: epoll_wait failed: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            if ev.data() == STOP_TOKEN {
                return;
            }
            serve_token(state, ev.data());
        }
    }
}

impl Drop for SimBackend {
    fn drop(&mut self) {
        let Some(mut t) = lock(&self.irqfd_thread).take() else {
            return;
        };
        let _ = t.stop.write(1);
        if let Some(handle) = t.handle.take() {
            let _ = handle.join();
        }
    }
}

/// The vCPUs an MSI's destination names (physical, broadcast, or flat logical).
fn destinations(msi: &X86Msi, vcpus: usize) -> Vec<usize> {
    (0..vcpus)
        .filter(|&id| {
            if msi.dest_logical {
                // Flat logical model: bit n of the destination is APIC n.
                id < 8 && msi.dest_id & (1 << id) != 0
            } else {
                msi.dest_id == 0xff || msi.dest_id as usize == id
            }
        })
        .collect()
}

/// Split irqchip: the vectors whose EOI exits to userspace, per vCPU, as KVM computes them
/// (arch/x86/kvm/irq_comm.c `kvm_scan_ioapic_routes`): level-triggered MSI routes on the GSIs
/// reserved for the userspace IOAPIC's pins, for the vCPUs they name. An EOI of any other
/// vector, level or not, never reaches the userspace IOAPIC.
fn eoi_exit_vectors(routes: &[KernelRoute], pins: u32, vcpus: usize) -> Vec<[bool; 256]> {
    let mut handled = vec![[false; 256]; vcpus];
    for r in routes.iter().filter(|r| r.gsi.0 < pins) {
        let Route::Msi { msg, .. } = r.route else {
            continue;
        };
        let Ok(msi) = X86Msi::decode(msg) else {
            continue;
        };
        if msi.trigger_level {
            for id in destinations(&msi, vcpus) {
                handled[id][usize::from(msi.vector)] = true;
            }
        }
    }
    handled
}

fn ioapic_offset(addr: u64) -> Option<u64> {
    addr.checked_sub(IOAPIC_BASE)
        .filter(|off| *off < IOAPIC_MMIO_SIZE)
}

impl SimState {
    /// vCPU `cpu`'s LAPIC retired `vector`: a level EOI goes to the in-kernel IOAPIC, or (split
    /// irqchip) exits to the core if KVM would exit on it (collected in `eois`).
    fn retire(&mut self, cpu: usize, vector: u8, level: bool, eois: &mut Vec<u8>) {
        if !level {
            return;
        }
        if self.ioapic.is_some() {
            self.kernel_eoi(vector);
        } else if self
            .eoi_exits
            .get(cpu)
            .is_some_and(|h| h[usize::from(vector)])
        {
            eois.push(vector);
        }
    }

    fn deliver_msi(&mut self, msg: MsiMessage) {
        let Ok(msi) = X86Msi::decode(msg) else {
            self.dropped_msis += 1;
            return;
        };
        let targets = destinations(&msi, self.vcpus.len());
        let targets = match msi.delivery_mode {
            DeliveryMode::LowestPriority => &targets[..targets.len().min(1)],
            _ => &targets[..],
        };
        if targets.is_empty() {
            self.dropped_msis += 1;
        }
        for &id in targets {
            let vcpu = &mut self.vcpus[id];
            match msi.delivery_mode {
                DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                    vcpu.lapic.accept(msi.vector, msi.trigger_level);
                }
                DeliveryMode::Nmi => vcpu.nmis += 1,
                _ => self.dropped_msis += 1,
            }
        }
    }

    fn poll_irqfds(&mut self) {
        let mut fired = Vec::new();
        for irqfd in &self.irqfds {
            if readable(&irqfd.fd) && irqfd.fd.read().is_ok() {
                fired.push((irqfd.gsi, irqfd.resample.is_some()));
            }
        }
        for (gsi, level) in fired {
            self.inject(gsi, level);
        }
    }

    /// A kernel irqfd fired: deliver the GSI's routes (KVM virt/kvm/eventfd.c irqfd_inject).
    fn inject(&mut self, gsi: Gsi, level: bool) {
        let routes = self.routes.get(&gsi).cloned().unwrap_or_default();
        let mut pin_route = false;
        for route in routes {
            match route {
                Route::Msi { msg, .. } => self.deliver_msi(msg),
                Route::Irqchip { .. } => pin_route = true,
                Route::XenEvtchn { .. } => self.dropped_msis += 1,
            }
        }
        if pin_route {
            if level {
                self.set_resampled(gsi, true);
            } else {
                self.set_source(gsi, SOURCE_USER, true);
                self.set_source(gsi, SOURCE_USER, false);
            }
        }
    }

    fn set_source(&mut self, gsi: Gsi, source: u8, on: bool) {
        let mut fx = Effects::default();
        for pin in self.ioapic_pins(gsi) {
            let bits = self.sources.entry(pin).or_default();
            if on {
                *bits |= source;
            } else {
                *bits &= !source;
            }
            let level = *bits != 0;
            if let Some(ioapic) = &mut self.ioapic {
                ioapic.set_line(pin, level, &mut fx);
            }
        }
        self.apply_ioapic_effects(&mut fx);
    }

    /// Drives the resampler's source of `gsi` (KVM: the resampler's irq source ID).
    fn set_resampled(&mut self, gsi: Gsi, level: bool) {
        let mut fx = Effects::default();
        for pin in self.ioapic_pins(gsi) {
            if let Some(ioapic) = &mut self.ioapic {
                ioapic.set_resampled_line(pin, level, &mut fx);
            }
        }
        self.apply_ioapic_effects(&mut fx);
    }

    fn ioapic_pins(&self, gsi: Gsi) -> Vec<u32> {
        self.routes
            .get(&gsi)
            .into_iter()
            .flatten()
            .filter_map(Route::ioapic_pin)
            .collect()
    }

    /// Kernel irqchip: a level EOI reaches the in-kernel IOAPIC.
    fn kernel_eoi(&mut self, vector: u8) {
        let mut fx = Effects::default();
        if let Some(ioapic) = &mut self.ioapic {
            ioapic.eoi(vector, &mut fx);
        }
        self.apply_ioapic_effects(&mut fx);
    }

    fn apply_ioapic_effects(&mut self, fx: &mut Effects) {
        // The model already dropped the resampled input; notify every resamplefd of the GSIs
        // on that pin (KVM irqfd_resampler_ack: de-assert once, then notify all).
        for pin in std::mem::take(&mut fx.resample) {
            for irqfd in &self.irqfds {
                let on_pin = self
                    .routes
                    .get(&irqfd.gsi)
                    .is_some_and(|rs| rs.contains(&Route::ioapic(pin)));
                if let (true, Some(r)) = (on_pin, &irqfd.resample) {
                    let _ = r.write(1);
                }
            }
        }
        for (_, msg) in std::mem::take(&mut fx.deliver) {
            self.deliver_msi(msg);
        }
        // Storm guard: re-evaluate after ~10 ms, as KVM's delayed eoi_inject work does.
        let due = Instant::now() + STORM_DELAY;
        self.deferred
            .extend(fx.deferred.drain(..).map(|pin| (pin, due)));
        fx.routes_changed.clear();
    }

    /// Re-delivers storm-guard deferrals whose delay has passed.
    fn run_due_deferrals(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) =
            self.deferred.drain(..).partition(|(_, at)| *at <= now);
        self.deferred = later;
        for (pin, _) in due {
            let mut fx = Effects::default();
            if let Some(ioapic) = &mut self.ioapic {
                ioapic.redeliver_deferred(pin, &mut fx);
            }
            self.apply_ioapic_effects(&mut fx);
        }
    }
}

fn identity(fd: &EventFd) -> Result<EventfdId, BackendError> {
    eventfd_id(fd.as_raw_fd()).map_err(|_| BackendError::BadEventFd)
}

/// Non-blocking readiness check, so a caller's blocking eventfd never stalls the simulation.
fn readable(fd: &EventFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call; nfds is 1.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

impl Backend for SimBackend {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn irqchip_mode(&self) -> IrqchipMode {
        self.mode
    }

    fn delivers(&self, route: &Route) -> bool {
        match route {
            Route::Msi { .. } => true,
            // The in-"kernel" irqchip has the IOAPIC model and PICs that stay masked (as the
            // test guest masks them), so PIC routes are accepted and go nowhere.
            Route::Irqchip { .. } => self.mode == IrqchipMode::Kernel,
            // Xen ports are emulated by the core.
            Route::XenEvtchn { .. } => false,
        }
    }

    fn commit_routes(&self, routes: &[KernelRoute]) -> Result<(), BackendError> {
        self.commit_gate.go_through();
        let refuse = self
            .refuse_commits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if refuse.is_ok() {
            return Err(BackendError::Hypervisor {
                op: "KVM_SET_GSI_ROUTING",
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            });
        }
        self.commits.fetch_add(1, Ordering::Relaxed);
        let mut table: HashMap<Gsi, Vec<Route>> = HashMap::new();
        for r in routes {
            if matches!(r.route, Route::XenEvtchn { .. }) {
                return Err(BackendError::Unsupported(
                    "route Xen event channels in the kernel",
                ));
            }
            table.entry(r.gsi).or_default().push(r.route);
        }
        let mut st = lock(&self.state);
        if let IrqchipMode::Split { ioapic_pins } = self.mode {
            st.eoi_exits = eoi_exit_vectors(routes, ioapic_pins, st.vcpus.len());
        }
        st.routes = table;
        Ok(())
    }

    fn signal_msi(&self, msg: MsiMessage, _devid: Option<u32>) -> Result<(), BackendError> {
        lock(&self.state).deliver_msi(msg);
        Ok(())
    }

    fn set_line(&self, gsi: Gsi, level: bool) -> Result<(), BackendError> {
        let mut st = lock(&self.state);
        if st.ioapic.is_none() {
            return Err(BackendError::Unsupported(
                "drive irqchip lines on a split irqchip",
            ));
        }
        st.set_source(gsi, SOURCE_USER, level);
        Ok(())
    }

    fn supports_resample(&self) -> bool {
        self.mode == IrqchipMode::Kernel
    }

    fn save_irqchip(&self) -> Result<Option<KernelIrqchip>, BackendError> {
        let st = lock(&self.state);
        Ok(st.ioapic.as_ref().map(|ioapic| KernelIrqchip {
            backend: self.name().to_owned(),
            chips: vec![(
                SIM_IOAPIC_CHIP,
                serde_json::to_vec(&ioapic.save()).unwrap_or_default(),
            )],
        }))
    }

    /// As `KVM_SET_IRQCHIP` for the IOAPIC (Linux `kvm_set_ioapic`): the registers and pin
    /// levels as saved, the per-source bits cleared (KVM does not save `irq_states`), and
    /// every asserted level pin re-evaluated (`kvm_ioapic_inject_all`).
    fn restore_irqchip(&self, state: &KernelIrqchip) -> Result<(), BackendError> {
        let bad = |why: String| BackendError::BadIrqchipState(why);
        let blob = match state.chips.as_slice() {
            [(SIM_IOAPIC_CHIP, blob)] => blob,
            _ => return Err(bad("the simulator keeps one chip, its IOAPIC".into())),
        };
        let saved: crate::ioapic::IoapicState =
            serde_json::from_slice(blob).map_err(|e| bad(e.to_string()))?;
        let mut st = lock(&self.state);
        let st = &mut *st;
        let Some(ioapic) = &mut st.ioapic else {
            return Err(BackendError::Unsupported(
                "restore an in-kernel IOAPIC on a split irqchip",
            ));
        };
        ioapic.restore(&saved).map_err(|e| bad(e.to_string()))?;
        st.sources.clear();
        st.deferred.clear();
        let mut fx = Effects::default();
        for pin in 0..ioapic.pins() {
            ioapic.redeliver_deferred(pin, &mut fx);
        }
        st.apply_ioapic_effects(&mut fx);
        Ok(())
    }

    fn assign_irqfd(
        &self,
        fd: &EventFd,
        gsi: Gsi,
        resample: Option<&EventFd>,
    ) -> Result<(), BackendError> {
        if !is_open(fd.as_raw_fd()) || resample.is_some_and(|r| !is_open(r.as_raw_fd())) {
            return Err(BackendError::BadEventFd);
        }
        if resample.is_some() && !self.supports_resample() {
            return Err(BackendError::Unsupported(
                "resample irqfds on a split irqchip",
            ));
        }
        self.irqfd_gate.go_through();
        let key = identity(fd)?;
        let epoll = self.irqfd_epoll()?;
        let mut st = lock(&self.state);
        if st.irqfds.iter().any(|i| i.key == key) {
            return Err(BackendError::IrqfdBusy);
        }
        let dup = |f: &EventFd| f.try_clone().map_err(|_| BackendError::BadEventFd);
        let token = st.next_token;
        let irqfd = SimIrqfd {
            token,
            key,
            fd: dup(fd)?,
            gsi,
            resample: resample.map(dup).transpose()?,
        };
        epoll
            .ctl(
                ControlOperation::Add,
                irqfd.fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(|source| BackendError::Hypervisor {
                op: "KVM_IRQFD",
                source,
            })?;
        st.next_token += 1;
        st.irqfds.push(irqfd);
        Ok(())
    }

    fn deassign_irqfd(&self, fd: &EventFd, gsi: Gsi) -> Result<(), BackendError> {
        self.irqfd_gate.go_through();
        let key = identity(fd)?;
        let epoll = self.irqfd_epoll()?;
        let mut st = lock(&self.state);
        let idx = st
            .irqfds
            .iter()
            .position(|i| i.key == key && i.gsi == gsi)
            .ok_or(BackendError::IrqfdNotFound(gsi))?;
        let irqfd = st.irqfds.swap_remove(idx);
        // The caller still holds the eventfd's file, so its epoll entry must go explicitly.
        let _ = epoll.ctl(
            ControlOperation::Delete,
            irqfd.fd.as_raw_fd(),
            EpollEvent::default(),
        );
        if irqfd.resample.is_some()
            && !st
                .irqfds
                .iter()
                .any(|i| i.gsi == gsi && i.resample.is_some())
        {
            // The last resampler of the GSI goes: its source de-asserts (KVM irqfd_resampler_shutdown).
            st.set_resampled(gsi, false);
        }
        Ok(())
    }

    fn set_eoi_sink(&self, sink: Weak<dyn EoiSink>) {
        *lock(&self.eoi_sink) = Some(sink);
    }
}
