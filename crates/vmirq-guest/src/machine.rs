//! One interface over a booted test guest, on KVM or on the simulated backend.
//!
//! Both machines run "the same guest": every vCPU enables its LAPIC, vCPU 0 runs the boot MMIO
//! script (which programs the IOAPIC), and every interrupt taken is counted per (vCPU, vector)
//! and reported to the host ([`IsrEvent`]) before the guest EOIs it. Tests and the CLI drive
//! them through [`Machine`] only.
//!
//! The guest also plays a 32-bit Xen HVM guest: the upcall vector runs the 2-level event
//! channel consumer on the `shared_info` page in guest RAM, and runtime scripts can issue
//! hypercalls ([`hypercall_op`]) that reach the [`HypercallHandler`] the test installs.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};
use vmirq::{EoiTiming, Interrupts, IrqchipMode, Restored, SimBackend, Snapshot};
use vmirq_kvm::{KvmVm, KvmVmConfig, RealModeBoot, VcpuExitHandler};

use crate::layout;
use crate::program;

/// Errors booting a test machine.
#[derive(Debug, Error)]
pub enum MachineError {
    #[error(transparent)]
    Guest(#[from] program::GuestError),
    #[error(transparent)]
    Interrupts(#[from] vmirq::Error),
    #[error(transparent)]
    Kvm(#[from] vmirq_kvm::KvmError),
    #[error("the guest did not run MMIO command {seq} within {secs} s")]
    CommandTimeout { seq: u32, secs: u64 },
    #[error("vCPU {vcpu} did not finish booting the test guest within {secs} s")]
    NotReady { vcpu: usize, secs: u64 },
    #[error("this machine gives no access to guest memory")]
    NoGuestMemory,
    #[error("the vCPU state of a {from} machine cannot be loaded into a {to} machine")]
    ImageKind {
        from: &'static str,
        to: &'static str,
    },
    #[error("simulated vCPUs: {0}")]
    SimVcpus(#[from] vmirq::BackendError),
    #[error(transparent)]
    Snapshot(#[from] vmirq::SnapshotError),
}

/// What a stopped machine leaves for a migration's target: its vCPUs' state and its guest
/// RAM ([`Machine::stop_for_migration`]). The interrupt state travels in a
/// [`vmirq::Snapshot`].
pub struct MachineImage {
    ram: Vec<u8>,
    vcpus: VcpuImage,
}

enum VcpuImage {
    Kvm(Vec<vmirq_kvm::VcpuState>),
    Sim(vmirq::sim::SimVcpus),
}

impl MachineImage {
    fn kind(&self) -> &'static str {
        match self.vcpus {
            VcpuImage::Kvm(_) => "kvm",
            VcpuImage::Sim(_) => "sim",
        }
    }
}

/// A copy of guest RAM (the machines' RAM is one region at GPA 0).
fn copy_ram(mem: &GuestMemoryMmap) -> Result<Vec<u8>, MachineError> {
    let mut ram = vec![0u8; GUEST_RAM];
    mem.read_slice(&mut ram, GuestAddress(0))?;
    Ok(ram)
}

impl From<GuestMemoryError> for MachineError {
    fn from(e: GuestMemoryError) -> Self {
        MachineError::Guest(program::GuestError::Memory(e))
    }
}

/// The guest took `vector` on `vcpu`; `at` is when the host saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IsrEvent {
    pub vcpu: usize,
    pub vector: u8,
    pub at: Instant,
}

/// ISR reports and boot readiness, as the guest sends them.
#[derive(Default)]
pub struct IsrLog {
    state: Mutex<LogState>,
    cv: Condvar,
}

#[derive(Default)]
struct LogState {
    events: VecDeque<IsrEvent>,
    ready: u64,
    failed: Option<String>,
}

/// Keeps the log bounded if nobody reads it (a long demo on many vectors).
const LOG_LIMIT: usize = 1 << 16;

impl IsrLog {
    pub fn record(&self, vcpu: usize, vector: u8) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.events.len() == LOG_LIMIT {
            st.events.pop_front();
        }
        st.events.push_back(IsrEvent {
            vcpu,
            vector,
            at: Instant::now(),
        });
        self.cv.notify_all();
    }

    fn mark_ready(&self, vcpu: usize) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.ready |= 1 << vcpu.min(63);
        self.cv.notify_all();
    }

    fn fail(&self, reason: String) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.failed.get_or_insert(reason);
        self.cv.notify_all();
    }

    /// Removes and returns the first event matching `pred`, waiting up to `wait` for one.
    fn take(&self, pred: impl Fn(&IsrEvent) -> bool, wait: Duration) -> Option<IsrEvent> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = st.events.iter().position(&pred) {
            return st.events.remove(i);
        }
        if wait.is_zero() {
            return None;
        }
        st = self
            .cv
            .wait_timeout(st, wait)
            .unwrap_or_else(|e| e.into_inner())
            .0;
        let i = st.events.iter().position(&pred)?;
        st.events.remove(i)
    }

    /// Drops every queued event.
    pub fn clear(&self) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .events
            .clear();
    }

    fn ready_mask(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).ready
    }

    /// Why a vCPU stopped, if one did.
    pub fn failure(&self) -> Option<String> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failed
            .clone()
    }
}

/// A device model behind guest MMIO (an emulated BAR). Offsets are relative to its base.
pub trait MmioDevice: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
}

/// One device's MMIO region: base, length, device.
type Region = (u64, u64, Arc<dyn MmioDevice>);

/// The MMIO regions a test machine's devices occupy.
#[derive(Default)]
pub struct MmioBus {
    regions: std::sync::RwLock<Vec<Region>>,
}

impl MmioBus {
    /// Maps `device` at guest physical `base..base + len`.
    pub fn add(&self, base: u64, len: u64, device: Arc<dyn MmioDevice>) {
        self.regions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push((base, len, device));
    }

    fn find(&self, addr: u64) -> Option<(u64, Arc<dyn MmioDevice>)> {
        let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
        regions
            .iter()
            .find(|(base, len, _)| addr >= *base && addr - base < *len)
            .map(|(base, _, d)| (addr - base, Arc::clone(d)))
    }

    /// Returns false if no device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.find(addr).map(|(off, d)| d.read(off, data)).is_some()
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        self.find(addr).map(|(off, d)| d.write(off, data)).is_some()
    }
}

/// A script entry that makes vCPU 0 read the dword at `addr`; its result comes back from
/// [`Machine::guest_mmio`] at the entry's index.
pub const fn mmio_read_op(addr: u32) -> (u32, u32) {
    (addr | 1, 0)
}

/// A script entry that makes vCPU 0 issue hypercall `cmd` with its arguments at guest physical
/// `args_gpa` (4-byte aligned; the low two bits are dropped) through the doorbell; the
/// handler's result (as the guest's i32) comes back from [`Machine::guest_mmio`] at the
/// entry's index.
pub const fn hypercall_op(cmd: u32, args_gpa: u32) -> (u32, u32) {
    ((args_gpa & !3) | 0b10, cmd)
}

/// Runs the guest's hypercalls: called synchronously while the calling vCPU waits on its
/// doorbell `out` (KVM: in that vCPU's exit handler; sim: in [`Machine::guest_mmio`]).
/// `vcpu` is the calling vCPU's index; the return value is what the guest reads back,
/// truncated to its 32-bit `long`.
pub trait HypercallHandler: Send + Sync {
    fn hypercall(&self, vcpu: usize, cmd: u32, args_gpa: u64) -> i64;
}

impl<F: Fn(usize, u32, u64) -> i64 + Send + Sync> HypercallHandler for F {
    fn hypercall(&self, vcpu: usize, cmd: u32, args_gpa: u64) -> i64 {
        self(vcpu, cmd, args_gpa)
    }
}

/// The installed hypercall handler, shared by a machine and its exit handler.
type HandlerSlot = Arc<RwLock<Option<Arc<dyn HypercallHandler>>>>;

/// Serves a doorbell from the vCPU with index `vcpu` and APIC ID `apic_id`: reads its mailbox,
/// calls the handler (none: `-ENOSYS`) without holding the slot's lock, and writes the result
/// back to the mailbox. Returns the result the guest will read.
fn serve_doorbell(
    mem: &GuestMemoryMmap,
    handlers: &HandlerSlot,
    vcpu: usize,
    apic_id: usize,
) -> Result<i32, GuestMemoryError> {
    let mailbox = layout::hypercall_mailbox(apic_id);
    let cmd: u32 = mem.read_obj(GuestAddress(mailbox + layout::HYPERCALL_CMD_OFFSET))?;
    let args: u32 = mem.read_obj(GuestAddress(mailbox + layout::HYPERCALL_ARGS_OFFSET))?;
    let handler = handlers.read().unwrap_or_else(|e| e.into_inner()).clone();
    let result = match handler {
        Some(h) => h.hypercall(vcpu, cmd, u64::from(args)),
        None => i64::from(layout::HYPERCALL_ENOSYS),
    };
    // A 32-bit guest's hypercall returns a 32-bit long: keep the low half, as EAX would.
    let result = result as i32;
    mem.write_obj(
        result,
        GuestAddress(mailbox + layout::HYPERCALL_RESULT_OFFSET),
    )?;
    Ok(result)
}

/// How to boot a test machine.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    pub vcpus: usize,
    pub irqchip: IrqchipMode,
    /// 32-bit MMIO writes vCPU 0 performs at boot, in order (at most
    /// [`layout::MMIO_SCRIPT_MAX`]).
    pub mmio_script: Vec<(u32, u32)>,
    pub interrupts: vmirq::Config,
    /// KVM only: the VM's halt-polling bound (see `KvmVmConfig::halt_poll_ns`).
    pub halt_poll_ns: Option<u32>,
    /// Boot with interrupts restored from this snapshot ([`Interrupts::restore`]), paused;
    /// the test takes the objects back with [`Machine::take_restored`].
    pub restore: Option<Arc<vmirq::Snapshot>>,
}

impl MachineConfig {
    pub fn new(vcpus: usize, irqchip: IrqchipMode) -> Self {
        Self {
            vcpus,
            irqchip,
            mmio_script: Vec::new(),
            interrupts: vmirq::Config::default(),
            halt_poll_ns: None,
            restore: None,
        }
    }

    /// Boots with interrupts restored from `snapshot` (see [`MachineConfig::restore`]).
    pub fn restored_from(mut self, snapshot: vmirq::Snapshot) -> Self {
        self.restore = Some(Arc::new(snapshot));
        self
    }

    /// Adds the writes that program IOAPIC pin `pin` (unmasked) to deliver `vector` to APIC
    /// `dest`, edge or level.
    pub fn ioapic_pin(mut self, pin: u32, vector: u8, dest: u8, level: bool) -> Self {
        self.mmio_script
            .extend(ioapic_pin_script(pin, vector, dest, level, false));
        self
    }
}

/// The guest MMIO writes that program IOAPIC pin `pin` through IOREGSEL/IOWIN: `vector` to
/// APIC `dest` (physical, fixed), edge or level, masked or not.
pub fn ioapic_pin_script(
    pin: u32,
    vector: u8,
    dest: u8,
    level: bool,
    masked: bool,
) -> [(u32, u32); 4] {
    let lo = u32::from(vector) | u32::from(level) << 15 | u32::from(masked) << 16;
    let base = vmirq::ioapic::IOAPIC_BASE as u32;
    [
        (base, 0x11 + 2 * pin),
        (base + 0x10, u32::from(dest) << 24),
        (base, 0x10 + 2 * pin),
        (base + 0x10, lo),
    ]
}

/// Takes the ISR reports of a burst of interrupts of `vector` (on `vcpu`, or any): waits up to
/// `timeout` for one taken at or after `since` (the burst's last trigger), then keeps taking
/// them until `quiet` passes with none. Returns when the last one taken was reported, if any.
/// A slow host delays the burst's last delivery; only then does the short window apply.
pub fn drain_burst(
    m: &dyn Machine,
    vcpu: Option<usize>,
    vector: u8,
    since: Instant,
    timeout: Duration,
    quiet: Duration,
) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    let mut last: Option<Instant> = None;
    loop {
        let after = last.is_some_and(|at| at >= since);
        let window = if after {
            quiet
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match m.wait_isr(vcpu, vector, window) {
            Some(ev) => last = Some(last.map_or(ev.at, |l| l.max(ev.at))),
            None => return last,
        }
    }
}

/// Waits up to `timeout` for `fd` (a resamplefd) to be signalled, letting the machine run;
/// consumes and returns its count.
pub fn wait_fd(
    m: &dyn Machine,
    fd: &vmm_sys_util::eventfd::EventFd,
    timeout: Duration,
) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + timeout;
    loop {
        m.pump();
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd that outlives the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, 1) } == 1;
        if ready {
            if let Ok(n) = fd.read() {
                return Some(n);
            }
        }
        if Instant::now() >= deadline || m.log().failure().is_some() {
            return None;
        }
    }
}

/// The interrupts a machine boots with: new, or restored from the config's snapshot.
fn interrupts_for(
    backend: Arc<dyn vmirq::Backend>,
    config: &MachineConfig,
) -> Result<(Arc<Interrupts>, Mutex<Option<Restored>>), MachineError> {
    Ok(match &config.restore {
        None => (
            Interrupts::new(backend, config.interrupts)?,
            Mutex::new(None),
        ),
        Some(snapshot) => {
            let restored =
                Interrupts::restore(backend, config.interrupts, Snapshot::clone(snapshot))?;
            (
                Arc::clone(restored.interrupts()),
                Mutex::new(Some(restored)),
            )
        }
    })
}

/// A booted test guest. Every method is safe to call from any thread.
pub trait Machine: Send + Sync {
    /// "kvm" or "sim".
    fn kind(&self) -> &'static str;
    fn interrupts(&self) -> &Arc<Interrupts>;
    /// A machine booted from a snapshot ([`MachineConfig::restored_from`]): the restore in
    /// progress, to take the objects back from (once; then `None`).
    fn take_restored(&self) -> Option<Restored>;

    /// The source side of a migration: stops the vCPUs for good and returns their state and
    /// guest RAM, for [`boot_migrated`]. Call it after the interrupts are saved and the
    /// source's irqfds released (see `vmirq::Interrupts::save`), so nothing enters the
    /// vCPUs' LAPICs after their state is taken.
    fn stop_for_migration(&self) -> Result<MachineImage, MachineError>;

    /// Stops the vCPUs where they are (a VMM pausing its VM); [`Machine::stop_for_migration`]
    /// takes their state later. The simulated vCPUs run only when pumped: nothing to do.
    fn pause_vcpus(&self) {}

    /// A migration's target ([`boot_migrated`]) runs its vCPUs from here on: after its
    /// interrupts are restored, their objects re-attached and resumed (a vCPU running earlier
    /// would EOI interrupts nobody can acknowledge yet). The simulated vCPUs run when pumped.
    fn resume_vcpus(&self) -> Result<(), MachineError> {
        Ok(())
    }
    fn vcpus(&self) -> usize;
    /// Interrupts the guest counted on (vcpu, vector).
    fn count(&self, vcpu: usize, vector: u8) -> u64;
    /// Lets the machine make progress: the simulated one runs until idle; KVM runs by itself.
    fn pump(&self);
    /// How long [`Machine::wait_isr`] waits for a report between two pumps. A simulated vCPU
    /// runs only when pumped, and with [`EoiTiming::GuestEoi`] its handlers end only at the
    /// next pump: the slice is how long a handler lasts. It must stay well below the period
    /// of any device the tests stream (a 200 µs stream with 2 ms handlers always has its
    /// next interrupt pending when the last one ends, and a lower vector never gets in).
    fn poll_slice(&self) -> Duration {
        Duration::from_millis(2)
    }
    fn log(&self) -> &IsrLog;

    /// When the vCPUs' LAPICs retire an interrupt, if known: the simulator says; on KVM it is
    /// the host's (this development host's KVM retires at delivery; standard KVM at the guest's
    /// EOI), so tests must accept both and name the behaviour that makes a range necessary.
    fn eoi_timing(&self) -> Option<EoiTiming> {
        None
    }

    /// Has vCPU 0 perform these 32-bit MMIO accesses now, in order, and waits until it has
    /// (the guest's runtime command mailbox; at most [`layout::MMIO_SCRIPT_MAX`] entries).
    /// Entries made with [`mmio_read_op`] are reads; returns every entry's value afterwards.
    fn guest_mmio(&self, script: &[(u32, u32)]) -> Result<Vec<u32>, MachineError>;

    /// Where test devices map their MMIO regions.
    fn mmio_bus(&self) -> &MmioBus;

    /// Installs the handler of the guest's hypercalls (replacing any previous one). Without
    /// one, hypercalls return `-ENOSYS`.
    fn set_hypercall_handler(&self, handler: Arc<dyn HypercallHandler>);

    /// Guest RAM ([`GUEST_RAM`] bytes at GPA 0), shared with the running guest: the Xen
    /// `shared_info` page at [`layout::XEN_SHARED_INFO`] lives here.
    fn guest_memory(&self) -> Option<&GuestMemoryMmap>;

    /// Reads guest RAM at `gpa` into `buf`.
    fn read_guest(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MachineError> {
        let mem = self.guest_memory().ok_or(MachineError::NoGuestMemory)?;
        Ok(mem.read_slice(buf, GuestAddress(gpa))?)
    }

    /// Writes `data` into guest RAM at `gpa`.
    fn write_guest(&self, gpa: u64, data: &[u8]) -> Result<(), MachineError> {
        let mem = self.guest_memory().ok_or(MachineError::NoGuestMemory)?;
        Ok(mem.write_slice(data, GuestAddress(gpa))?)
    }

    /// How many times the guest's event channel consumer acked `port` (0 beyond the
    /// 2-level ports).
    fn port_counter(&self, port: u32) -> u32 {
        self.guest_memory()
            .map_or(0, |mem| program::read_port_counter(mem, port))
    }

    /// Waits up to `timeout` for the guest to take `vector` (on `vcpu`, if given) and returns
    /// that report, removing it from the log.
    fn wait_isr(&self, vcpu: Option<usize>, vector: u8, timeout: Duration) -> Option<IsrEvent> {
        let deadline = Instant::now() + timeout;
        let pred = |e: &IsrEvent| e.vector == vector && vcpu.is_none_or(|c| c == e.vcpu);
        loop {
            self.pump();
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(e) = self.log().take(pred, left.min(self.poll_slice())) {
                return Some(e);
            }
            if left.is_zero() || self.log().failure().is_some() {
                return None;
            }
        }
    }

    /// Waits up to `timeout` until the guest counted at least `n` on (vcpu, vector); returns
    /// the count then.
    fn wait_count(&self, vcpu: usize, vector: u8, n: u64, timeout: Duration) -> u64 {
        self.wait_until(timeout, &mut || self.count(vcpu, vector) >= n);
        self.count(vcpu, vector)
    }

    /// Waits up to `timeout` until the guest's event channel consumer acked `port` at least
    /// `n` times; returns its counter then.
    fn wait_port_count(&self, port: u32, n: u32, timeout: Duration) -> u32 {
        self.wait_until(timeout, &mut || self.port_counter(port) >= n);
        self.port_counter(port)
    }

    /// Lets the machine run until `done` (a guest counter, or anything the guest's progress
    /// changes) holds, at most `timeout` or until a vCPU failed; returns whether it holds. The
    /// one polling loop the guest's counters are waited on with.
    fn wait_until(&self, timeout: Duration, done: &mut dyn FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            self.pump();
            if done() {
                return true;
            }
            if Instant::now() >= deadline || self.log().failure().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Runs until nothing more arrives for `quiet` (bounded by 100 × `quiet`).
    fn settle(&self, quiet: Duration) {
        let start = Instant::now();
        let mut last = self.total();
        let mut since = Instant::now();
        while since.elapsed() < quiet && start.elapsed() < quiet * 100 {
            self.pump();
            std::thread::sleep(Duration::from_micros(200));
            let now = self.total();
            if now != last {
                last = now;
                since = Instant::now();
            }
        }
    }

    /// The control event of a negative check: an MSI to `vcpu` on [`CONTROL_VECTOR`] (lower
    /// than every vector the tests check), waited for. Once it is taken, whatever was pending
    /// on that vCPU with a higher vector has been taken too (the LAPIC serves the highest
    /// first), so a forbidden interrupt that has not shown up by then was not merely slow.
    /// Panics if the control never comes (the machine is not live).
    fn control(&self, vcpu: usize) {
        let msg = vmirq::X86Msi::fixed(vcpu as u32, CONTROL_VECTOR)
            .encode()
            .expect("a fixed MSI to an 8-bit APIC ID encodes");
        self.interrupts()
            .signal_msi(msg)
            .expect("the control MSI is refused");
        assert!(
            self.wait_isr(Some(vcpu), CONTROL_VECTOR, Duration::from_secs(10))
                .is_some(),
            "the control interrupt never reached vCPU {vcpu}: the machine is not live"
        );
    }

    /// Every interrupt counted on every vCPU.
    fn total(&self) -> u64 {
        (0..self.vcpus())
            .flat_map(|c| (0..=255u8).map(move |v| (c, v)))
            .map(|(c, v)| self.count(c, v))
            .sum()
    }
}

/// The vector of [`Machine::control`]: below every vector the tests check.
pub const CONTROL_VECTOR: u8 = 0x30;

/// The simulated machine: [`SimBackend`] plus the core, with the guest's behaviour played by
/// the simulated vCPUs. It has guest RAM like the KVM machine (for Xen's `shared_info`); the
/// simulated vCPUs run the guest's Xen consumer in Rust ([`program::xen_2l_consume`]) when they
/// take [`layout::XEN_UPCALL_VECTOR`].
pub struct SimMachine {
    sim: Arc<SimBackend>,
    interrupts: Arc<Interrupts>,
    restored: Mutex<Option<Restored>>,
    log: Arc<IsrLog>,
    bus: MmioBus,
    mem: GuestMemoryMmap,
    hypercalls: HandlerSlot,
}

impl SimMachine {
    /// Boots with the vCPUs retiring interrupts at delivery ([`EoiTiming::AtDelivery`]).
    pub fn boot(config: &MachineConfig) -> Result<Self, MachineError> {
        Self::boot_with(config, EoiTiming::AtDelivery)
    }

    /// Boots with the vCPUs retiring interrupts at `eoi_timing`.
    pub fn boot_with(config: &MachineConfig, eoi_timing: EoiTiming) -> Result<Self, MachineError> {
        Self::boot_image(config, eoi_timing, None)
    }

    /// Boots fresh, or (with `image`) as a migration's target: vCPUs and RAM from the image,
    /// before the interrupts are restored; no boot script runs.
    fn boot_image(
        config: &MachineConfig,
        eoi_timing: EoiTiming,
        image: Option<&MachineImage>,
    ) -> Result<Self, MachineError> {
        let sim = SimBackend::with_eoi_timing(config.vcpus, config.irqchip, eoi_timing);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GUEST_RAM)])
            .map_err(|e| MachineError::Guest(program::GuestError::Ram(e.to_string())))?;
        if let Some(image) = image {
            let VcpuImage::Sim(vcpus) = &image.vcpus else {
                return Err(MachineError::ImageKind {
                    from: image.kind(),
                    to: "sim",
                });
            };
            sim.restore_vcpus(vcpus)?;
            mem.write_slice(&image.ram, GuestAddress(0))?;
        }
        let (interrupts, restored) = interrupts_for(sim.clone(), config)?;
        let log = Arc::new(IsrLog::default());
        let l = Arc::clone(&log);
        let consumer_mem = mem.clone();
        // Runs under the simulator's state lock: it touches guest memory and the log only,
        // never the backend.
        sim.set_isr_observer(Box::new(move |vcpu, vector| {
            if vector == layout::XEN_UPCALL_VECTOR {
                // The simulated vCPU's APIC ID is its index, as on the KVM machine.
                if let Err(e) = program::xen_consume(&consumer_mem, vcpu) {
                    tracing::warn!(vcpu, "simulated Xen consumer failed: {e}");
                }
            }
            l.record(vcpu, vector)
        }));
        let machine = Self {
            sim,
            interrupts,
            restored,
            log,
            bus: MmioBus::default(),
            mem,
            hypercalls: HandlerSlot::default(),
        };
        if image.is_none() {
            machine.run_script(&config.mmio_script)?;
        }
        for vcpu in 0..config.vcpus {
            machine.log.mark_ready(vcpu);
        }
        Ok(machine)
    }

    /// What the guest's vCPU 0 does with an MMIO script: accesses inside guest RAM go to RAM
    /// (as on KVM); otherwise a test device, the in-kernel IOAPIC (kernel irqchip) or vmirq's
    /// (split) decodes each access. Hypercall entries ([`hypercall_op`]) go to the handler.
    fn run_script(&self, script: &[(u32, u32)]) -> Result<Vec<u32>, MachineError> {
        if script.len() > layout::MMIO_SCRIPT_MAX {
            return Err(program::GuestError::ScriptTooLong(script.len()).into());
        }
        let mut results = Vec::with_capacity(script.len());
        for &(addr, value) in script {
            if addr & 1 != 0 {
                let addr = u64::from(addr & !1);
                let mut data = [0xff; 4];
                let _ = self.mem.read_slice(&mut data, GuestAddress(addr)).is_ok()
                    || self.bus.read(addr, &mut data)
                    || self.sim.mmio_read(addr, &mut data)
                    || self.interrupts.mmio_read(addr, &mut data);
                results.push(u32::from_le_bytes(data));
            } else if addr & 0b11 == 0b10 {
                // A hypercall from vCPU 0 (APIC ID 0): the guest's mailbox steps, then the
                // doorbell served as KVM's exit handler serves it.
                let mailbox = layout::hypercall_mailbox(0);
                self.mem
                    .write_obj(value, GuestAddress(mailbox + layout::HYPERCALL_CMD_OFFSET))?;
                self.mem.write_obj(
                    addr & !0b11,
                    GuestAddress(mailbox + layout::HYPERCALL_ARGS_OFFSET),
                )?;
                let result = serve_doorbell(&self.mem, &self.hypercalls, 0, 0)?;
                results.push(result as u32);
            } else {
                let (addr, data) = (u64::from(addr), value.to_le_bytes());
                let _ = self.mem.write_slice(&data, GuestAddress(addr)).is_ok()
                    || self.bus.write(addr, &data)
                    || self.sim.mmio_write(addr, &data)
                    || self.interrupts.mmio_write(addr, &data);
                results.push(value);
            }
        }
        Ok(results)
    }

    pub fn sim(&self) -> &Arc<SimBackend> {
        &self.sim
    }
}

impl Machine for SimMachine {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn eoi_timing(&self) -> Option<EoiTiming> {
        Some(self.sim.eoi_timing())
    }

    fn interrupts(&self) -> &Arc<Interrupts> {
        &self.interrupts
    }

    fn take_restored(&self) -> Option<Restored> {
        lock(&self.restored).take()
    }

    fn stop_for_migration(&self) -> Result<MachineImage, MachineError> {
        // Simulated vCPUs run only when pumped: they are stopped already.
        Ok(MachineImage {
            ram: copy_ram(&self.mem)?,
            vcpus: VcpuImage::Sim(self.sim.save_vcpus()),
        })
    }

    fn vcpus(&self) -> usize {
        self.sim.vcpus()
    }

    fn count(&self, vcpu: usize, vector: u8) -> u64 {
        self.sim.count(vcpu, vector)
    }

    fn pump(&self) {
        self.sim.run_until_idle();
    }

    fn poll_slice(&self) -> Duration {
        Duration::from_micros(50)
    }

    fn guest_mmio(&self, script: &[(u32, u32)]) -> Result<Vec<u32>, MachineError> {
        let results = self.run_script(script)?;
        self.pump();
        Ok(results)
    }

    fn mmio_bus(&self) -> &MmioBus {
        &self.bus
    }

    fn set_hypercall_handler(&self, handler: Arc<dyn HypercallHandler>) {
        *self.hypercalls.write().unwrap_or_else(|e| e.into_inner()) = Some(handler);
    }

    fn guest_memory(&self) -> Option<&GuestMemoryMmap> {
        Some(&self.mem)
    }

    fn log(&self) -> &IsrLog {
        &self.log
    }
}

/// Routes the test guest's exits: ISR and READY ports to the log, IOAPIC MMIO to the core,
/// the hypercall doorbell to the installed [`HypercallHandler`].
struct GuestExits {
    interrupts: Arc<Interrupts>,
    log: Arc<IsrLog>,
    bus: Arc<MmioBus>,
    mem: GuestMemoryMmap,
    hypercalls: HandlerSlot,
}

impl VcpuExitHandler for GuestExits {
    fn pio_out(&self, vcpu: usize, port: u16, data: &[u8]) {
        match (port, data.first()) {
            (layout::ISR_PORT, Some(v)) => self.log.record(vcpu, *v),
            (layout::READY_PORT, _) => self.log.mark_ready(vcpu),
            // The guest waits in this `out`: the result is in its mailbox when it resumes.
            // AL is its APIC ID, which picked the mailbox.
            (layout::XEN_DOORBELL_PORT, Some(&apic_id)) => {
                if let Err(e) =
                    serve_doorbell(&self.mem, &self.hypercalls, vcpu, usize::from(apic_id))
                {
                    tracing::warn!(vcpu, "hypercall doorbell: bad mailbox: {e}");
                }
            }
            _ => {}
        }
    }

    fn mmio_read(&self, _vcpu: usize, addr: u64, data: &mut [u8]) {
        if !self.bus.read(addr, data) && !self.interrupts.mmio_read(addr, data) {
            data.fill(0xff);
        }
    }

    fn mmio_write(&self, _vcpu: usize, addr: u64, data: &[u8]) {
        let _ = self.bus.write(addr, data) || self.interrupts.mmio_write(addr, data);
    }

    fn vcpu_failed(&self, vcpu: usize, reason: String) {
        self.log.fail(format!("vCPU {vcpu}: {reason}"));
    }
}

/// The test guest on real KVM.
pub struct KvmMachine {
    vm: Mutex<KvmVm>,
    /// A migration's target: the exit handler its vCPUs run with once resumed.
    parked: Mutex<Option<Arc<dyn VcpuExitHandler>>>,
    interrupts: Arc<Interrupts>,
    restored: Mutex<Option<Restored>>,
    log: Arc<IsrLog>,
    bus: Arc<MmioBus>,
    /// The VM's guest RAM (the regions are shared, not copied).
    mem: GuestMemoryMmap,
    hypercalls: HandlerSlot,
    vcpus: usize,
}

/// Guest RAM of a test machine: the real-mode megabyte.
pub const GUEST_RAM: usize = 1 << 20;
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

impl KvmMachine {
    /// Whether this host can run KVM machines.
    pub fn available() -> bool {
        KvmVm::is_available()
    }

    pub fn boot(config: &MachineConfig) -> Result<Self, MachineError> {
        Self::boot_image(config, None)
    }

    /// Boots fresh, or (with `migrated`) as a migration's target: RAM and vCPU state from the
    /// image (before the interrupts are restored, so nothing they inject is overwritten),
    /// vCPUs resumed where they stopped.
    fn boot_image(
        config: &MachineConfig,
        migrated: Option<&MachineImage>,
    ) -> Result<Self, MachineError> {
        let mut vm = KvmVm::new(KvmVmConfig {
            vcpus: config.vcpus,
            mem_size: GUEST_RAM,
            irqchip: config.irqchip,
            halt_poll_ns: config.halt_poll_ns,
        })?;
        if let Some(image) = migrated {
            let VcpuImage::Kvm(vcpus) = &image.vcpus else {
                return Err(MachineError::ImageKind {
                    from: image.kind(),
                    to: "kvm",
                });
            };
            vm.memory().write_slice(&image.ram, GuestAddress(0))?;
            vm.restore_vcpus(vcpus)?;
        }
        let (interrupts, restored) = interrupts_for(vm.backend(), config)?;
        let image = program::build();
        if migrated.is_none() {
            program::load(vm.memory(), &image, &config.mmio_script)?;
        }
        let log = Arc::new(IsrLog::default());
        let bus = Arc::new(MmioBus::default());
        let mem = vm.memory().clone();
        let hypercalls = HandlerSlot::default();
        let exits = Arc::new(GuestExits {
            interrupts: Arc::clone(&interrupts),
            log: Arc::clone(&log),
            bus: Arc::clone(&bus),
            mem: mem.clone(),
            hypercalls: Arc::clone(&hypercalls),
        });
        let mut parked: Option<Arc<dyn VcpuExitHandler>> = None;
        if migrated.is_some() {
            parked = Some(exits);
            for vcpu in 0..config.vcpus {
                log.mark_ready(vcpu);
            }
        } else {
            vm.start(
                &RealModeBoot {
                    ip: image.entry_ip,
                    stack_top: layout::stack_top,
                },
                exits,
            )?;
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        let all = (1u64 << config.vcpus) - 1;
        while log.ready_mask() & all != all {
            if Instant::now() > deadline || log.failure().is_some() {
                let vcpu = (0..config.vcpus)
                    .find(|c| log.ready_mask() & (1 << c) == 0)
                    .unwrap_or(0);
                return Err(MachineError::NotReady {
                    vcpu,
                    secs: READY_TIMEOUT.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(Self {
            vcpus: config.vcpus,
            vm: Mutex::new(vm),
            parked: Mutex::new(parked),
            interrupts,
            restored,
            log,
            bus,
            mem,
            hypercalls,
        })
    }
}

impl Machine for KvmMachine {
    fn kind(&self) -> &'static str {
        "kvm"
    }

    fn interrupts(&self) -> &Arc<Interrupts> {
        &self.interrupts
    }

    fn take_restored(&self) -> Option<Restored> {
        lock(&self.restored).take()
    }

    fn pause_vcpus(&self) {
        lock(&self.vm).stop();
    }

    fn resume_vcpus(&self) -> Result<(), MachineError> {
        let Some(exits) = lock(&self.parked).take() else {
            return Ok(());
        };
        Ok(lock(&self.vm).resume(exits)?)
    }

    fn stop_for_migration(&self) -> Result<MachineImage, MachineError> {
        let mut vm = lock(&self.vm);
        vm.stop();
        Ok(MachineImage {
            ram: copy_ram(&self.mem)?,
            vcpus: VcpuImage::Kvm(vm.save_vcpus()?),
        })
    }

    fn vcpus(&self) -> usize {
        self.vcpus
    }

    fn count(&self, vcpu: usize, vector: u8) -> u64 {
        let vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        u64::from(program::read_counter(vm.memory(), vcpu, vector))
    }

    fn pump(&self) {}

    fn mmio_bus(&self) -> &MmioBus {
        &self.bus
    }

    fn set_hypercall_handler(&self, handler: Arc<dyn HypercallHandler>) {
        *self.hypercalls.write().unwrap_or_else(|e| e.into_inner()) = Some(handler);
    }

    fn guest_memory(&self) -> Option<&GuestMemoryMmap> {
        Some(&self.mem)
    }

    fn guest_mmio(&self, script: &[(u32, u32)]) -> Result<Vec<u32>, MachineError> {
        let seq = {
            let vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
            program::post_command(vm.memory(), script)?
        };
        let doorbell = vmirq::X86Msi::fixed(0, layout::DOORBELL_VECTOR)
            .encode()
            .expect("APIC 0 fits");
        self.interrupts.signal_msi(doorbell)?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let done = {
                let vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
                program::command_done(vm.memory(), seq)
            };
            if done {
                let vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
                return Ok(program::script_results(vm.memory(), script.len())?);
            }
            if Instant::now() > deadline || self.log.failure().is_some() {
                return Err(MachineError::CommandTimeout {
                    seq,
                    secs: COMMAND_TIMEOUT.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    fn log(&self) -> &IsrLog {
        &self.log
    }
}

impl Drop for KvmMachine {
    fn drop(&mut self) {
        self.vm.lock().unwrap_or_else(|e| e.into_inner()).stop();
    }
}

/// Which backend a machine runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Kvm,
    /// The simulator, retiring interrupts at delivery (as this host's KVM does).
    Sim,
    /// The simulator, retiring interrupts at the guest's EOI (as standard KVM does).
    SimGuestEoi,
}

/// Boots a machine of `kind`.
pub fn boot(kind: BackendKind, config: &MachineConfig) -> Result<Box<dyn Machine>, MachineError> {
    Ok(match kind {
        BackendKind::Kvm => Box::new(KvmMachine::boot(config)?),
        BackendKind::Sim => Box::new(SimMachine::boot(config)?),
        BackendKind::SimGuestEoi => Box::new(SimMachine::boot_with(config, EoiTiming::GuestEoi)?),
    })
}

/// Boots a second machine of `m`'s kind (backend and EOI timing) from `config`: the target
/// of a restore test.
pub fn boot_another(
    m: &dyn Machine,
    config: &MachineConfig,
) -> Result<Box<dyn Machine>, MachineError> {
    boot(kind_of(m), config)
}

/// The backend kind `m` runs on.
pub fn kind_of(m: &dyn Machine) -> BackendKind {
    match (m.kind(), m.eoi_timing()) {
        ("kvm", _) => BackendKind::Kvm,
        (_, Some(EoiTiming::GuestEoi)) => BackendKind::SimGuestEoi,
        _ => BackendKind::Sim,
    }
}

/// A migration's target: a machine of `kind` running on from `image` (vCPUs and RAM of a
/// machine stopped with [`Machine::stop_for_migration`]), its interrupts restored from
/// `config`'s snapshot ([`MachineConfig::restored_from`]) and paused.
pub fn boot_migrated(
    kind: BackendKind,
    config: &MachineConfig,
    image: &MachineImage,
) -> Result<Box<dyn Machine>, MachineError> {
    Ok(match kind {
        BackendKind::Kvm => Box::new(KvmMachine::boot_image(config, Some(image))?),
        BackendKind::Sim => Box::new(SimMachine::boot_image(
            config,
            EoiTiming::AtDelivery,
            Some(image),
        )?),
        BackendKind::SimGuestEoi => Box::new(SimMachine::boot_image(
            config,
            EoiTiming::GuestEoi,
            Some(image),
        )?),
    })
}

pub use vmirq_kvm::kvm_test_gate;

/// The machines every behaviour test runs on: the simulator with both EOI timings, and KVM
/// (whose timing is the host's), each with the kernel and the split irqchip.
pub const EVERY_MACHINE: [(BackendKind, Mode); 6] = [
    (BackendKind::Sim, Mode::Kernel),
    (BackendKind::Sim, Mode::Split),
    (BackendKind::SimGuestEoi, Mode::Kernel),
    (BackendKind::SimGuestEoi, Mode::Split),
    (BackendKind::Kvm, Mode::Kernel),
    (BackendKind::Kvm, Mode::Split),
];

/// Irqchip mode without parameters, for naming test variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Kernel,
    Split,
}

impl Mode {
    pub fn irqchip(self) -> IrqchipMode {
        match self {
            Mode::Kernel => IrqchipMode::Kernel,
            Mode::Split => IrqchipMode::Split {
                ioapic_pins: vmirq::route::DEFAULT_IOAPIC_PINS,
            },
        }
    }
}

/// Boots `config` on `kind` for test `name`, or returns None (after saying so on stderr) when
/// KVM is wanted but absent. Panics with the boot error otherwise: a test that cannot boot fails.
pub fn boot_for_test(
    name: &str,
    kind: BackendKind,
    config: &MachineConfig,
) -> Option<Box<dyn Machine>> {
    if kind == BackendKind::Kvm && !kvm_test_gate(name) {
        return None;
    }
    match boot(kind, config) {
        Ok(m) => Some(m),
        Err(e) => panic!("{name}: cannot boot the {kind:?} test machine: {e}"),
    }
}

/// Writes one behaviour test once and runs it on every machine: expands to a module `$name`
/// with tests `sim_kernel`, `sim_split`, `sim_guest_eoi_kernel`, `sim_guest_eoi_split`, `kvm_kernel` and
/// `kvm_split`, each calling
/// `$body(&dyn Machine)` on a machine booted from `$config(Mode)`.
#[macro_export]
macro_rules! on_every_machine {
    ($name:ident, $config:expr, $body:expr) => {
        mod $name {
            use super::*;
            use $crate::machine::{boot_for_test, BackendKind, Mode};

            fn run(kind: BackendKind, mode: Mode) {
                let config = ($config)(mode);
                let test = concat!(stringify!($name), "::", "{kind:?}-{mode:?}");
                let test = test
                    .replace("{kind:?}", &format!("{kind:?}"))
                    .replace("{mode:?}", &format!("{mode:?}"));
                if let Some(machine) = boot_for_test(&test, kind, &config) {
                    ($body)(&*machine, mode);
                }
            }

            #[test]
            fn sim_kernel() {
                run(BackendKind::Sim, Mode::Kernel)
            }
            #[test]
            fn sim_split() {
                run(BackendKind::Sim, Mode::Split)
            }
            #[test]
            fn sim_guest_eoi_kernel() {
                run(BackendKind::SimGuestEoi, Mode::Kernel)
            }
            #[test]
            fn sim_guest_eoi_split() {
                run(BackendKind::SimGuestEoi, Mode::Split)
            }
            #[test]
            fn kvm_kernel() {
                run(BackendKind::Kvm, Mode::Kernel)
            }
            #[test]
            fn kvm_split() {
                run(BackendKind::Kvm, Mode::Split)
            }
        }
    };
}

/// Locks, recovering from poisoning (a panicked test thread leaves plain data behind).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
