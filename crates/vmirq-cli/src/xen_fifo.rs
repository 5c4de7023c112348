//! Xen FIFO event channels in the demo and the bench: the `xen-fifo` row (every vCPU's 16
//! queues exercised while ports move between queues; lost 0 required), the `xenfifo-upcall`
//! latency rig and the `xenfifo.set-pending` figure against `xen2l.set-pending`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmirq::xen::fifo::{self, GuestPages, PRIORITIES};
use vmirq::xen::{attach, EventChannels, Upcalls, XenConfig};
use vmirq::{Config, Interrupts, IrqchipMode, SimBackend};
use vmirq_guest::layout::{
    xen_fifo_control, xen_vcpu_info, MAX_VCPUS, SCRATCH, XEN_FIFO_ARRAY, XEN_FIFO_FLAG,
    XEN_FIFO_TOTAL, XEN_SHARED_INFO, XEN_UPCALL_VECTOR,
};
use vmirq_guest::machine::{BackendKind, Machine, MachineConfig};

use crate::demo::{DemoError, Row};

/// EVTCHNOP numbers (xen/include/public/event_channel.h).
const ALLOC_UNBOUND: u32 = 6;
const BIND_IPI: u32 = 7;
const BIND_VCPU: u32 = 8;
const INIT_CONTROL: u32 = 11;
const EXPAND_ARRAY: u32 = 12;
const SET_PRIORITY: u32 = 13;
const DOMID_SELF: u32 = 0x7FF0;
const WAIT: Duration = Duration::from_secs(10);

fn fail(what: &'static str) -> vmirq::Error {
    vmirq::Error::Unsupported(what)
}

/// A guest that switched to FIFO, as the row drives it.
trait FifoVm {
    fn channels(&self) -> &EventChannels;
    fn memory(&self) -> &GuestMemoryMmap;
    /// Where the host writes hypercall arguments.
    fn scratch(&self) -> u64;
    /// Events the guest's FIFO consumer handled so far.
    fn handled(&self) -> u64;
    /// Lets the guest run (the simulator runs until idle; KVM runs by itself).
    fn pump(&self);
    fn vcpus(&self) -> u32;

    /// vCPUs from 32 on register their vcpu_info at `at(vcpu)` (those below have theirs in
    /// shared_info).
    fn register_vcpu_infos(&self, at: impl Fn(u32) -> u64) -> Result<(), vmirq::Error>
    where
        Self: Sized,
    {
        for v in 32..self.vcpus() {
            self.channels().register_vcpu_info(v, at(v))?;
        }
        Ok(())
    }

    /// EVTCHNOP `cmd` through the hypercall entry, argument words at the scratch address;
    /// returns the words as the call left them.
    fn call(&self, cmd: u32, words: &[u32]) -> Result<Vec<u32>, vmirq::Error> {
        let at = GuestAddress(self.scratch());
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mem = self.memory();
        mem.write_slice(&bytes, at)
            .map_err(|_| fail("write hypercall arguments"))?;
        let r = self.channels().hypercall(0, cmd, at.0);
        if r != 0 {
            return Err(vmirq::xen::XenError::from_result(r)
                .map_or(fail("make sense of a hypercall result"), vmirq::Error::Xen));
        }
        let mut out = vec![0u8; bytes.len()];
        mem.read_slice(&mut out, at)
            .map_err(|_| fail("read hypercall results"))?;
        Ok(out
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

/// Switches the guest to FIFO the way Linux does: a control block per vCPU, then event-array
/// pages (written zero: every port unmasked) from `array`, `pages` of them.
fn switch<V: FifoVm + ?Sized>(
    vm: &V,
    control: impl Fn(u32) -> u64,
    array: u64,
    pages: u32,
) -> Result<(), vmirq::Error> {
    for v in 0..vm.vcpus() {
        let cb = control(v);
        let gfn = cb >> 12;
        vm.call(
            INIT_CONTROL,
            &[gfn as u32, (gfn >> 32) as u32, (cb & 0xfff) as u32, v, 0, 0],
        )?;
    }
    for n in 0..u64::from(pages) {
        let gpa = array + n * 0x1000;
        vm.memory()
            .write_slice(&[0u8; 0x1000], GuestAddress(gpa))
            .map_err(|_| fail("clear an event-array page"))?;
        vm.call(EXPAND_ARRAY, &[(gpa >> 12) as u32, 0])?;
    }
    Ok(())
}

/// The test guest on a booted machine, its upcall running the real-mode FIFO consumer.
struct OnMachine<'m> {
    m: &'m dyn Machine,
    ch: Arc<EventChannels>,
    up: Arc<Upcalls>,
    vcpus: u32,
}

impl FifoVm for OnMachine<'_> {
    fn channels(&self) -> &EventChannels {
        &self.ch
    }
    fn memory(&self) -> &GuestMemoryMmap {
        self.m.guest_memory().expect("checked at attach")
    }
    fn scratch(&self) -> u64 {
        SCRATCH
    }
    fn handled(&self) -> u64 {
        self.memory()
            .read_obj::<u32>(GuestAddress(XEN_FIFO_TOTAL))
            .map_or(0, u64::from)
    }
    fn pump(&self) {
        self.m.pump();
    }
    fn vcpus(&self) -> u32 {
        self.vcpus
    }
}

impl<'m> OnMachine<'m> {
    /// Attaches FIFO event channels for `vcpus` vCPUs to `m`, the guest's FIFO consumer on,
    /// `pages` event-array pages, vcpu_info registered where the guest's consumer looks for
    /// vCPUs from 32 on, and each vCPU's upcall vector set (its first injection waited for).
    fn attach(m: &'m dyn Machine, vcpus: u32, pages: u32) -> Result<Self, vmirq::Error> {
        let memory = m
            .guest_memory()
            .ok_or(fail("emulate Xen without guest memory"))?
            .clone();
        let config = XenConfig {
            vcpus,
            long_mode: false,
            shared_info_gpa: XEN_SHARED_INFO,
            domid: 1,
        };
        let (ch, up) = attach(m.interrupts(), memory.clone(), config);
        let c = Arc::clone(&ch);
        m.set_hypercall_handler(Arc::new(move |vcpu: usize, cmd: u32, args: u64| {
            c.hypercall(vcpu as u32, cmd, args)
        }));
        memory
            .write_obj(1u32, GuestAddress(XEN_FIFO_FLAG))
            .map_err(|_| fail("set the guest's FIFO flag"))?;
        let vm = Self { m, ch, up, vcpus };
        vm.register_vcpu_infos(|v| xen_vcpu_info(v as usize))?;
        switch(&vm, |v| xen_fifo_control(v as usize), XEN_FIFO_ARRAY, pages)?;
        for v in 0..vcpus {
            vm.up
                .set_upcall_vector(v, Some(XEN_UPCALL_VECTOR))
                .map_err(|_| fail("set the Xen upcall vector"))?;
            m.wait_isr(Some(v as usize), XEN_UPCALL_VECTOR, WAIT)
                .ok_or(fail("take the upcall vector's first injection"))?;
        }
        Ok(vm)
    }
}

/// vCPUs of the simulated FIFO guest: Xen's HVM maximum.
pub const SIM_VCPUS: u32 = 128;

/// 128 simulated vCPUs whose upcall runs [`fifo::consume`] (Linux's consumer) on guest RAM
/// laid out for them: control blocks at 0x10000 (128 bytes apart), shared_info at 0x20000,
/// vcpu_info of vCPUs from 32 on at 0x21000, event-array pages from 0x40000.
struct Sim128 {
    sim: Arc<SimBackend>,
    _irq: Arc<Interrupts>,
    mem: GuestMemoryMmap,
    ch: Arc<EventChannels>,
    up: Arc<Upcalls>,
    handled: Arc<AtomicU64>,
}

const SIM_CONTROL: u64 = 0x1_0000;
const SIM_SHARED_INFO: u64 = 0x2_0000;
const SIM_VCPU_INFO: u64 = 0x2_1000;
const SIM_ARRAY: u64 = 0x4_0000;
const SIM_SCRATCH: u64 = 0x8000;

/// Where vCPU `v`'s vcpu_info is in the simulated guests' layout.
fn sim_vcpu_info(v: u32) -> u64 {
    if v < 32 {
        SIM_SHARED_INFO + u64::from(v) * 64
    } else {
        SIM_VCPU_INFO + u64::from(v - 32) * 64
    }
}

/// Where vCPU `v`'s FIFO control block is in the simulated guests' layout.
fn sim_control(v: u32) -> u64 {
    SIM_CONTROL + u64::from(v) * 0x80
}

impl FifoVm for Sim128 {
    fn channels(&self) -> &EventChannels {
        &self.ch
    }
    fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
    fn scratch(&self) -> u64 {
        SIM_SCRATCH
    }
    fn handled(&self) -> u64 {
        self.handled.load(Ordering::SeqCst)
    }
    fn pump(&self) {
        self.sim.run_until_idle();
    }
    fn vcpus(&self) -> u32 {
        SIM_VCPUS
    }
}

impl Sim128 {
    fn boot(pages: u32) -> Result<Self, vmirq::Error> {
        let sim = SimBackend::new(SIM_VCPUS as usize, IrqchipMode::Kernel);
        let irq = Interrupts::new(sim.clone(), Config::default())?;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)])
            .map_err(|_| fail("allocate guest memory"))?;
        let config = XenConfig {
            vcpus: SIM_VCPUS,
            long_mode: true,
            shared_info_gpa: SIM_SHARED_INFO,
            domid: 1,
        };
        let (ch, up) = attach(&irq, mem.clone(), config);
        // The guest's view of its own FIFO pages, for its consumer.
        let pages_view = GuestPages::new(mem.clone(), SIM_VCPUS);
        for v in 0..SIM_VCPUS {
            pages_view.map_control(v, sim_control(v))?;
        }
        for n in 0..u64::from(pages) {
            pages_view.add_page((SIM_ARRAY >> 12) + n)?;
        }
        let handled = Arc::new(AtomicU64::new(0));
        let heads = Mutex::new(vec![[0u32; PRIORITIES as usize]; SIM_VCPUS as usize]);
        let (h, m) = (Arc::clone(&handled), mem.clone());
        sim.set_isr_observer(Box::new(move |vcpu, vector| {
            if vector != XEN_UPCALL_VECTOR {
                return;
            }
            let pending = GuestAddress(sim_vcpu_info(vcpu as u32));
            let mut heads = heads.lock().unwrap_or_else(|e| e.into_inner());
            for _ in 0..64 {
                let _ = m.write_obj(0u8, pending);
                fifo::consume(&pages_view, vcpu as u32, &mut heads[vcpu], 1 << 18, |_| {
                    h.fetch_add(1, Ordering::SeqCst);
                });
                if m.read_obj::<u8>(pending).map_or(true, |p| p == 0) {
                    break;
                }
            }
        }));
        let vm = Self {
            sim,
            _irq: irq,
            mem,
            ch,
            up,
            handled,
        };
        vm.register_vcpu_infos(sim_vcpu_info)?;
        switch(&vm, sim_control, SIM_ARRAY, pages)?;
        for v in 0..SIM_VCPUS {
            vm.up
                .set_upcall_vector(v, Some(XEN_UPCALL_VECTOR))
                .map_err(|_| fail("set the Xen upcall vector"))?;
        }
        vm.pump();
        Ok(vm)
    }
}

/// Rounds of the `xen-fifo` row.
const ROUNDS: u32 = 12;

/// Events the `xen-fifo` row sends on `kind`: a port per (vCPU, priority), every port once a
/// round.
pub fn row_events(kind: BackendKind) -> u64 {
    u64::from(row_vcpus(kind) * PRIORITIES * ROUNDS)
}

/// vCPUs of the row: 128 simulated, or as many as the real-mode test guest lays out on KVM.
fn row_vcpus(kind: BackendKind) -> u32 {
    match kind {
        BackendKind::Kvm => MAX_VCPUS as u32,
        BackendKind::Sim | BackendKind::SimGuestEoi => SIM_VCPUS,
    }
}

/// The `xen-fifo` row: a guest on the FIFO ABI with one loopback port per (vCPU, priority),
/// every queue of every vCPU; each round signals every port once and waits until the guest's
/// consumer handled them all; between rounds an eighth of the ports move to another vCPU and
/// priority. Lost = events never handled; latency = a round, first signal to last event
/// handled.
pub fn drive(kind: BackendKind, bar: &ProgressBar) -> Result<Row, DemoError> {
    let err = |source| DemoError::Path {
        path: "xen-fifo",
        source,
    };
    let vcpus = row_vcpus(kind);
    let ports = vcpus * PRIORITIES;
    let pages = ports / fifo::WORDS_PER_PAGE + 1;
    match kind {
        BackendKind::Kvm => {
            let config = MachineConfig::new(vcpus as usize, IrqchipMode::Kernel);
            let m = vmirq_guest::machine::boot(kind, &config)?;
            let vm = OnMachine::attach(&*m, vcpus, pages).map_err(err)?;
            exercise(&vm, bar).map_err(err)
        }
        BackendKind::Sim | BackendKind::SimGuestEoi => {
            let vm = Sim128::boot(pages).map_err(err)?;
            exercise(&vm, bar).map_err(err)
        }
    }
}

fn exercise(vm: &dyn FifoVm, bar: &ProgressBar) -> Result<Row, vmirq::Error> {
    let vcpus = vm.vcpus();
    let mut ports = Vec::new();
    for v in 0..vcpus {
        for prio in 0..PRIORITIES {
            let port = vm.call(ALLOC_UNBOUND, &[DOMID_SELF | DOMID_SELF << 16, 0])?[1];
            vm.call(BIND_VCPU, &[port, v])?;
            vm.call(SET_PRIORITY, &[port, prio])?;
            ports.push((port, v, prio));
        }
    }
    let before = vm.handled();
    let (mut sent, mut latencies) = (0u64, Vec::new());
    let mut rng = crate::paths::XorShift(0x9E37_79B9_7F4A_7C15);
    for _ in 0..ROUNDS {
        let t0 = Instant::now();
        for &(port, _, _) in &ports {
            vm.channels().notify_port(port)?;
        }
        sent += ports.len() as u64;
        let deadline = t0 + WAIT;
        while vm.handled() - before < sent && Instant::now() < deadline {
            vm.pump();
            std::thread::yield_now();
        }
        if vm.handled() - before < sent {
            break;
        }
        latencies.push(t0.elapsed());
        bar.inc(ports.len() as u64);
        // Move an eighth of the ports to another vCPU and priority.
        for _ in 0..ports.len() / 8 {
            let i = (rng.next() % ports.len() as u64) as usize;
            let (port, v, prio) = ports[i];
            let (v, prio) = ((v + 1) % vcpus, (prio + 5) % PRIORITIES);
            vm.call(BIND_VCPU, &[port, v])?;
            vm.call(SET_PRIORITY, &[port, prio])?;
            ports[i] = (port, v, prio);
        }
    }
    let handled = vm.handled() - before;
    let lost = sent.saturating_sub(handled);
    let give_ups = vm.channels().fifo_give_ups();
    if give_ups != [0; 4] {
        eprintln!("vmirq: xen-fifo: the linker gave up {give_ups:?} times");
    }
    Ok(Row::new(
        "xen-fifo",
        sent,
        handled.min(sent),
        lost,
        &mut latencies,
    ))
}

/// The `xenfifo-upcall` rig's guest: `m`'s test guest on the FIFO ABI (2 vCPUs, one page),
/// with an IPI port bound on `vcpu`. Returns what must live as long as the rig, and the port.
pub fn upcall_guest(
    m: &dyn Machine,
    vcpu: u32,
) -> Result<(Arc<EventChannels>, Arc<Upcalls>, u32), vmirq::Error> {
    let vm = OnMachine::attach(m, 2, 1)?;
    let port = vm.call(BIND_IPI, &[vcpu, 0])?[1];
    Ok((Arc::clone(&vm.ch), Arc::clone(&vm.up), port))
}

/// `xenfifo.set-pending` and what it is compared with, in ns per event on a bound, unmasked
/// port whose pending bit is clear while the guest has not yet returned from its upcall
/// (medians of rounds that alternate, so a preemption spoils one round of one figure, not a
/// ratio). All on private guest memory, no upcall raised.
pub struct SetPendingFigures {
    /// `xen2l.set-pending`: 1000 2-level ports of one vCPU.
    pub two_level: f64,
    /// Three `fetch_or`s on one cache line: the atomic floor of a 2-level set-pending.
    pub floor: f64,
    /// `xenfifo.set-pending`: 1000 ports of one queue (a head, then links behind the tail).
    pub fifo: f64,
    /// `xenfifo.set-pending.new-head`: 1000 ports on 1000 empty queues (64 vCPUs x 16
    /// priorities), each event a new head.
    pub new_head: f64,
}

/// An upcall sink that raises nothing: set-pending alone is measured.
struct NoUpcall;

impl vmirq::xen::UpcallSink for NoUpcall {
    fn upcall(&self, _vcpu: u32) {}
}

/// A set-pending rig's memory, channels and bound (port, vCPU) pairs.
type SetPendingRig = (GuestMemoryMmap, EventChannels, Vec<(u32, u32)>);

/// Event channels over 1 MiB of plain memory with shared_info at 0x20000, `vcpus` vCPUs
/// (those from 32 on with a vcpu_info at 0x21000), and `ports` IPIs bound by `bind(i)`'s vCPU
/// and priority; FIFO (control blocks at 0x10000, pages from 0x40000) when `fifo`.
fn set_pending_rig(
    vcpus: u32,
    fifo_abi: bool,
    ports: u32,
    bind: impl Fn(u32) -> (u32, u32),
) -> Result<SetPendingRig, vmirq::Error> {
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)])
        .map_err(|_| fail("allocate bench memory"))?;
    let config = XenConfig {
        vcpus,
        long_mode: true,
        shared_info_gpa: SIM_SHARED_INFO,
        domid: 1,
    };
    let ch = EventChannels::new(memory.clone(), config, Arc::new(NoUpcall));
    struct Plain<'a>(&'a GuestMemoryMmap, &'a EventChannels, u32);
    impl FifoVm for Plain<'_> {
        fn channels(&self) -> &EventChannels {
            self.1
        }
        fn memory(&self) -> &GuestMemoryMmap {
            self.0
        }
        fn scratch(&self) -> u64 {
            SIM_SCRATCH
        }
        fn handled(&self) -> u64 {
            0
        }
        fn pump(&self) {}
        fn vcpus(&self) -> u32 {
            self.2
        }
    }
    let vm = Plain(&memory, &ch, vcpus);
    vm.register_vcpu_infos(sim_vcpu_info)?;
    if fifo_abi {
        let pages = ports / fifo::WORDS_PER_PAGE + 1;
        switch(&vm, sim_control, SIM_ARRAY, pages)?;
    }
    let mut bound = Vec::new();
    for i in 0..ports {
        let (vcpu, prio) = bind(i);
        let port = vm.call(BIND_IPI, &[vcpu, 0])?[1];
        if fifo_abi {
            vm.call(SET_PRIORITY, &[port, prio])?;
        }
        bound.push((port, vcpu));
    }
    Ok((memory, ch, bound))
}

/// Measures [`SetPendingFigures`].
pub fn set_pending_figures() -> Result<SetPendingFigures, vmirq::Error> {
    const PORTS: u32 = 1000;
    const ROUNDS: usize = 200;
    let (mem2, ch2, ports2) = set_pending_rig(1, false, PORTS, |_| (0, 7))?;
    let (memq, chq, portsq) = set_pending_rig(1, true, PORTS, |_| (0, 7))?;
    let (memh, chh, portsh) =
        set_pending_rig(64, true, PORTS, |i| (i / PRIORITIES, i % PRIORITIES))?;
    // Between rounds the guest has taken the events but not yet returned from its upcall:
    // 2-level pending bits clear (selectors and upcall_pending still set); FIFO words
    // unlinked and not pending (READY and upcall_pending still set). The host's queue tails
    // stay; their words are unlinked, so each round starts with a new head.
    let clear = |mem: &GuestMemoryMmap| {
        let _ = mem.write_slice(&[0u8; 0x200], GuestAddress(SIM_SHARED_INFO + 0x800));
        let _ = mem.write_slice(&[0u8; 0x1000], GuestAddress(SIM_ARRAY));
    };
    let round = |ch: &EventChannels, ports: &[(u32, u32)]| {
        let t0 = Instant::now();
        for &(p, v) in ports {
            let _ = ch.set_pending(p, v);
        }
        t0.elapsed()
    };
    let words: Vec<std::sync::atomic::AtomicU64> = (0..8)
        .map(|_| std::sync::atomic::AtomicU64::new(0))
        .collect();
    let floor_round = || {
        let t0 = Instant::now();
        for i in 0..u64::from(PORTS) {
            let bit = 1u64 << (i % 64);
            for w in &words[..3] {
                w.fetch_or(bit, Ordering::SeqCst);
            }
        }
        t0.elapsed()
    };
    let mut samples: [Vec<Duration>; 4] = Default::default();
    for _ in 0..ROUNDS {
        for mem in [&mem2, &memq, &memh] {
            clear(mem);
        }
        samples[0].push(round(&ch2, &ports2));
        samples[1].push(floor_round());
        samples[2].push(round(&chq, &portsq));
        samples[3].push(round(&chh, &portsh));
    }
    std::hint::black_box(&words);
    let per_event = |s: &mut Vec<Duration>| {
        crate::report::quantile(s, 0.5).as_nanos() as f64 / f64::from(PORTS)
    };
    let [a, b, c, d] = &mut samples;
    Ok(SetPendingFigures {
        two_level: per_event(a),
        floor: per_event(b),
        fifo: per_event(c),
        new_head: per_event(d),
    })
}
