//! The event channels' state for a snapshot. The 2-level pending, mask and selector bits and
//! `upcall_pending` live in guest RAM (`shared_info`, `vcpu_info`) and travel with it; this
//! is the rest: the port table, VIRQ bindings, `vcpu_info` placement, backend endpoints and
//! the upcall configuration.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use super::abi::{virq_is_global, NR_VIRQS};
use super::layout::NOT_PLACED;
use super::ports::{BackendSlot, Binding, PortState, Remote, Table};
use super::{attach, BackendPort, Callback, EventChannels, Upcalls, XenConfig};
use crate::interrupts::{Error, Interrupts};
use crate::snapshot::{has_count, SnapshotError};

/// Everything the event channels hold outside guest RAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XenState {
    /// The guest's setup.
    pub config: XenConfig,
    /// Every open port: (port, binding, vCPU), lowest first.
    pub ports: Vec<(u32, PortState, u32)>,
    /// The port bound to each (vCPU, VIRQ), at `vcpu * NR_VIRQS + virq`; 0 for none.
    pub virqs: Vec<u32>,
    /// Per vCPU: where it registered its `vcpu_info` (`None`: the legacy slot, or none from
    /// vCPU 32 on).
    #[serde(default)]
    pub vcpu_info: Vec<Option<u64>>,
    /// Written empty. A snapshot from before a `vcpu_info` at guest address 0 was honoured
    /// lists the placements here instead, 0 meaning the legacy slot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placed: Vec<u64>,
    /// Every open backend endpoint: (backend port, state), lowest first.
    pub backends: Vec<(u32, XenBackendState)>,
    /// Per vCPU: its upcall vector (HVMOP_set_evtchn_upcall_vector).
    pub upcall_vectors: Vec<Option<u8>>,
    /// The domain's callback (HVM_PARAM_CALLBACK_IRQ).
    pub callback: Callback,
    /// Per vCPU: the APIC ID its upcall vectors go to (empty in older snapshots: the
    /// identity).
    #[serde(default)]
    pub apic_ids: Vec<u32>,
    /// Xen system time when saved; the target's clock continues from it (the VMM then sets it
    /// to match the guest's pvclock if that moved).
    #[serde(default)]
    pub guest_time: u64,
    /// The vCPUs' armed timers, as guest-time deadlines.
    #[serde(default)]
    pub timers: Vec<super::XenTimerState>,
    /// The PIRQs handed out, lowest first (ports bound to PIRQs are in `ports`).
    #[serde(default)]
    pub pirqs: Vec<u32>,
    /// GSI PIRQs: (PIRQ, its GSI, the GSI's input levels: bit 0 line, bit 1 resampled).
    #[serde(default)]
    pub gsi_pirqs: Vec<(u32, u32, u8)>,
    /// The FIFO ABI's host state, if the guest switched to it (its event words, READY and
    /// HEADs are guest RAM and travel with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fifo: Option<Box<XenFifoState>>,
}

/// The FIFO ABI's state outside guest RAM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XenFifoState {
    /// Per vCPU: its control block's guest address, if it has one.
    pub control_blocks: Vec<Option<u64>>,
    /// The event-array pages' guest addresses, in order.
    pub array_pages: Vec<u64>,
    /// Per (vCPU, priority), vCPU-major: the queue's tail port (0: empty).
    pub tails: Vec<u32>,
    /// Open ports whose priority is not the default: (port, priority).
    pub priorities: Vec<(u32, u8)>,
    /// Ports whose last queue is not vCPU 0's priority 0: (port, packed vCPU and priority).
    pub lastq: Vec<(u32, u32)>,
    /// Ports with an event waiting for their event-array page.
    pub early: Vec<u32>,
}

impl XenState {
    /// Per vCPU: the registered `vcpu_info`, from either encoding.
    fn placements(&self) -> Vec<Option<u64>> {
        if self.placed.is_empty() {
            self.vcpu_info.clone()
        } else {
            self.placed.iter().map(|&g| (g != 0).then_some(g)).collect()
        }
    }
}

/// A VMM backend endpoint in a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XenBackendState {
    /// The guest port it is connected to (0: unconnected).
    pub guest_port: u32,
    /// The guest sent and the backend had not read its notify eventfd yet.
    pub pending: bool,
}

impl EventChannels {
    /// These event channels' state, with `upcalls`' configuration.
    pub fn save(&self, upcalls: &Upcalls) -> XenState {
        let t = self.lock();
        let Self {
            memory: _,
            config: _,
            long_mode: _,
            shared_info_gpa: _,
            upcall: _,
            slots,
            fifo_on,
            queues,
            pages,
            virqs,
            placed,
            table: _,
            clock: _,
            vcpu_timers: _,
            poll: _,
            pirq_ports: _,
            pirq_hook: _,
            gsi_pirqs: _,
            gsi_levels,
        } = self;
        let Table {
            backends,
            pirqs,
            pirq_gsi,
            ..
        } = &*t;
        let fifo = fifo_on.load(Ordering::SeqCst).then(|| {
            Box::new(XenFifoState {
                control_blocks: pages.control_gpas(),
                array_pages: pages.page_gpas(),
                tails: queues.all().iter().map(|q| q.tail()).collect(),
                priorities: t
                    .open()
                    .filter_map(|(p, _, _)| {
                        let prio = slots.get(p)?.binding().priority;
                        (prio != super::ports::DEFAULT_PRIORITY).then_some((p, prio))
                    })
                    .collect(),
                lastq: slots
                    .iter()
                    .filter_map(|(p, s)| {
                        let l = s.lastq.load(Ordering::SeqCst);
                        (l != 0).then_some((p, l))
                    })
                    .collect(),
                early: slots
                    .iter()
                    .filter(|(_, s)| s.early.load(Ordering::SeqCst))
                    .map(|(p, _)| p)
                    .collect(),
            })
        });
        let (upcall_vectors, callback, apic_ids) = upcalls.configuration();
        XenState {
            // The address and width as they are now.
            config: self.config(),
            ports: t.open().collect(),
            virqs: virqs.iter().map(|p| p.load(Ordering::Acquire)).collect(),
            vcpu_info: placed
                .iter()
                .map(|p| Some(p.load(Ordering::Acquire)).filter(|g| *g != NOT_PLACED))
                .collect(),
            placed: Vec::new(),
            backends: backends
                .iter()
                .enumerate()
                .filter_map(|(be, b)| {
                    b.as_ref().map(|BackendSlot { guest_port, notify }| {
                        let state = XenBackendState {
                            guest_port: *guest_port,
                            pending: has_count(notify),
                        };
                        (be as u32, state)
                    })
                })
                .collect(),
            upcall_vectors,
            callback,
            apic_ids,
            guest_time: self.guest_time(),
            timers: self.save_timers(),
            pirqs: (0..super::NR_PIRQS)
                .filter(|p| pirqs[*p as usize])
                .collect(),
            gsi_pirqs: pirq_gsi
                .iter()
                .enumerate()
                .filter_map(|(p, g)| {
                    let gsi = (*g)?;
                    let levels = gsi_levels[gsi as usize].load(Ordering::SeqCst);
                    Some((p as u32, gsi, levels))
                })
                .collect(),
            fifo,
        }
    }
}

/// The event channels `state` saved, attached to `interrupts` over the guest RAM `memory`
/// (restored already: the 2-level bits are there) of a VM with `vcpus` vCPUs. Returns the
/// channels, their upcalls and the backend endpoints (new eventfds, in backend-port order;
/// one whose guest had sent unread is signalled).
pub(crate) fn restore(
    interrupts: &Arc<Interrupts>,
    memory: GuestMemoryMmap,
    vcpus: u32,
    state: &XenState,
) -> Result<crate::interrupts::XenRestored, Error> {
    check(state, vcpus, interrupts.mode().ioapic_pins())?;
    let placements = state.placements();
    let XenState {
        config,
        ports,
        virqs,
        vcpu_info: _,
        placed: _,
        backends,
        upcall_vectors,
        callback,
        apic_ids,
        guest_time,
        timers,
        pirqs,
        gsi_pirqs,
        fifo,
    } = state;
    let (channels, upcalls) = attach(interrupts, memory, *config);
    let mut endpoints = Vec::new();
    {
        let mut t = channels.lock();
        if let Some(f) = fifo {
            restore_fifo(&channels, &mut t, f)?;
        }
        for (port, state, vcpu) in ports {
            t.reserve(*port, &channels.slots);
            t.set(*port, *state, *vcpu);
            let slot = channels
                .slot(*port)
                .map_err(|e| SnapshotError::Invalid(e.to_string()))?;
            let priority = fifo
                .as_ref()
                .and_then(|f| f.priorities.iter().find(|(p, _)| p == port))
                .map_or(super::ports::DEFAULT_PRIORITY, |(_, prio)| *prio);
            slot.publish(Binding::new(*state, *vcpu).with_priority(priority));
            if let PortState::Pirq(pirq) = state {
                channels.pirq_ports[*pirq as usize].store(*port, Ordering::Release);
            }
        }
        for pirq in pirqs {
            t.pirqs[*pirq as usize] = true;
        }
        for &(pirq, gsi, levels) in gsi_pirqs {
            if !interrupts.divert_pin(gsi) {
                return Err(SnapshotError::Invalid(format!(
                    "Xen: GSI {gsi} is a PIRQ's but a kernel irqfd reaches its pin"
                ))
                .into());
            }
            t.pirq_gsi[pirq as usize] = Some(gsi);
            channels.gsi_pirqs[gsi as usize].store(pirq, Ordering::SeqCst);
            channels.gsi_levels[gsi as usize].store(levels & 3, Ordering::SeqCst);
        }
        for (slot, port) in channels.virqs.iter().zip(virqs) {
            slot.store(*port, Ordering::Release);
        }
        for (slot, gpa) in channels.placed.iter().zip(&placements) {
            slot.store(gpa.unwrap_or(NOT_PLACED), Ordering::Release);
        }
        for (be, saved) in backends {
            let be = *be as usize;
            let io =
                |e: std::io::Error| Error::from(super::XenError::Io(e.raw_os_error().unwrap_or(0)));
            let notify = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)
                .map_err(io)?;
            let ours = notify.try_clone().map_err(io)?;
            if saved.pending {
                ours.write(1).map_err(io)?;
            }
            t.reserve_backend(be as u32);
            t.backends[be] = Some(BackendSlot {
                guest_port: saved.guest_port,
                notify: ours,
            });
            endpoints.push(BackendPort {
                port: be as u32,
                notify,
            });
        }
    }
    // Configured without injecting: the guest's upcalls are in the restored LAPICs already.
    for (vcpu, vector) in upcall_vectors.iter().enumerate() {
        upcalls
            .configure_vector(vcpu as u32, *vector)
            .map_err(|e| SnapshotError::Invalid(format!("Xen upcall vector: {e}")))?;
    }
    for (vcpu, apic_id) in apic_ids.iter().enumerate() {
        upcalls
            .set_apic_id(vcpu as u32, *apic_id)
            .map_err(|e| SnapshotError::Invalid(format!("Xen APIC ID: {e}")))?;
    }
    upcalls.configure_callback(*callback).map_err(|e| match e {
        super::UpcallError::Gsi(e) => e,
        e => SnapshotError::Invalid(format!("Xen callback: {e}")).into(),
    })?;
    if *guest_time != 0 {
        channels.clock.set(*guest_time);
    }
    channels.restore_timers(timers);
    Ok((channels, upcalls, endpoints))
}

/// Refuses what no event channels can hold, before anything is built.
fn check(state: &XenState, vcpus: u32, pins: u32) -> Result<(), SnapshotError> {
    let bad = |what: String| Err(SnapshotError::Invalid(format!("Xen: {what}")));
    let c = state.config;
    if c.vcpus == 0 || c.vcpus > vcpus {
        return bad(format!(
            "{} vCPUs saved, the target VM has {vcpus}",
            c.vcpus
        ));
    }
    let ports = if state.fifo.is_some() {
        super::fifo::FIFO_PORTS as usize
    } else {
        super::Layout::new(c.long_mode).ports as usize
    };
    let n = c.vcpus as usize;
    if state.virqs.len() != n * NR_VIRQS as usize
        || state.placements().len() != n
        || state.upcall_vectors.len() != n
        || !(state.apic_ids.is_empty() || state.apic_ids.len() == n)
    {
        return bad("table sizes do not match the configuration".into());
    }
    // Ports 1..ports, each named once, lowest first; the same for backend ports.
    let ascending = |list: Vec<u32>| {
        let in_range = list.iter().all(|p| *p != 0 && (*p as usize) < ports);
        in_range && list.windows(2).all(|w| w[0] < w[1])
    };
    if !ascending(state.ports.iter().map(|p| p.0).collect()) {
        return bad("ports out of range, repeated or unordered".into());
    }
    let backends_ok = state
        .backends
        .iter()
        .all(|b| b.0 < super::ports::MAX_BACKENDS)
        && state.backends.windows(2).all(|w| w[0].0 < w[1].0)
        && state.backends.iter().all(|b| b.0 != 0);
    if !backends_ok {
        return bad("backend ports out of range, repeated or unordered".into());
    }
    for &(port, s, vcpu) in &state.ports {
        if vcpu >= c.vcpus {
            return bad(format!("port {port} on vCPU {vcpu}"));
        }
        let peer_ok = |remote: Remote, remote_port: u32| match remote {
            Remote::Guest => (remote_port as usize) < ports,
            Remote::Backend => state.backends.iter().any(|b| b.0 == remote_port),
            // No other domain exists here to be connected to.
            Remote::Domain(_) => false,
        };
        let ok = match s {
            PortState::Closed => false,
            PortState::Unbound { .. } | PortState::Ipi => true,
            PortState::Interdomain {
                remote,
                remote_port,
            } => peer_ok(remote, remote_port),
            PortState::Virq(v) => v < NR_VIRQS,
            PortState::Pirq(p) => p < super::NR_PIRQS,
        };
        if !ok {
            return bad(format!("port {port}: {s:?}"));
        }
    }
    for (i, port) in state.virqs.iter().enumerate() {
        let (vcpu, virq) = (i as u32 / NR_VIRQS, i as u32 % NR_VIRQS);
        if *port as usize >= ports || (virq_is_global(virq) && vcpu != 0 && *port != 0) {
            return bad(format!("VIRQ {virq} of vCPU {vcpu} on port {port}"));
        }
    }
    let word = super::Layout::new(c.long_mode).word_bytes;
    let misplaced = |g: &u64| g % word != 0 || g % 0x1000 + super::layout::VCPU_INFO_SIZE > 0x1000;
    if let Some(gpa) = state.placements().iter().flatten().find(|g| misplaced(g)) {
        return bad(format!("vcpu_info at {gpa:#x}"));
    }
    match state.callback {
        Callback::Vector(v) if v < 0x10 => return bad(format!("callback vector {v:#x}")),
        Callback::Gsi(g) if g >= pins => return bad(format!("callback GSI {g}")),
        _ => {}
    }
    let pirq_ports: Vec<u32> = state
        .ports
        .iter()
        .filter_map(|(_, s, _)| match s {
            PortState::Pirq(p) => Some(*p),
            _ => None,
        })
        .collect();
    let mut sorted = pirq_ports.clone();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != pirq_ports.len() {
        return bad("a PIRQ bound to two ports".into());
    }
    let pirqs_ok = state.pirqs.iter().all(|p| *p < super::NR_PIRQS)
        && state.pirqs.windows(2).all(|w| w[0] < w[1]);
    let mut gsis: Vec<u32> = state.gsi_pirqs.iter().map(|g| g.1).collect();
    gsis.sort_unstable();
    gsis.dedup();
    let gsi_pirqs_ok = gsis.len() == state.gsi_pirqs.len()
        && state
            .gsi_pirqs
            .iter()
            .all(|(p, g, _)| state.pirqs.binary_search(p).is_ok() && *g < super::pirq::IOAPIC_PINS);
    if !gsi_pirqs_ok {
        return bad("GSI PIRQs: a GSI twice, a PIRQ not handed out, or a GSI past pin 23".into());
    }
    if !pirqs_ok {
        return bad("PIRQs out of range, repeated or unordered".into());
    }
    for t in &state.timers {
        let period_ok =
            t.period == 0 || (super::MIN_PERIOD_NS..=super::STIME_DELTA_MAX).contains(&t.period);
        if t.vcpu >= c.vcpus || !period_ok {
            return bad(format!("timer {t:?}"));
        }
    }
    if let Some(v) = state.upcall_vectors.iter().flatten().find(|v| **v < 0x10) {
        return bad(format!("upcall vector {v:#x}"));
    }
    if let Some(f) = &state.fifo {
        use super::fifo::{CONTROL_BLOCK_SIZE, FIFO_PORTS, MAX_PAGES, PRIORITIES};
        let block_ok = |g: &u64| g % 8 == 0 && g % 0x1000 <= u64::from(0x1000 - CONTROL_BLOCK_SIZE);
        let ok = f.control_blocks.len() == n
            && f.control_blocks.iter().flatten().all(block_ok)
            && f.array_pages.len() <= MAX_PAGES as usize
            && f.array_pages.iter().all(|g| g % 0x1000 == 0)
            && f.tails.len() == n * PRIORITIES as usize
            && f.tails.iter().all(|t| *t < FIFO_PORTS)
            && f.priorities
                .iter()
                .all(|(p, prio)| *p < FIFO_PORTS && u32::from(*prio) < PRIORITIES)
            && f.lastq
                .iter()
                .all(|(p, l)| *p < FIFO_PORTS && l & 0xffff < c.vcpus && l >> 20 == 0)
            && f.early.iter().all(|p| *p < FIFO_PORTS);
        if !ok {
            return bad("FIFO state out of range".into());
        }
    }
    Ok(())
}

/// Puts the FIFO ABI back as saved: control blocks, event-array pages, queue tails and the
/// ports' last queues and remembered events. Nothing runs yet.
fn restore_fifo(
    channels: &EventChannels,
    t: &mut Table,
    f: &XenFifoState,
) -> Result<(), SnapshotError> {
    let bad = |what: String| SnapshotError::Invalid(format!("Xen FIFO: {what}"));
    for (vcpu, gpa) in f.control_blocks.iter().enumerate() {
        if let Some(gpa) = gpa {
            channels
                .pages
                .map_control(vcpu as u32, *gpa)
                .map_err(|e| bad(format!("control block of vCPU {vcpu}: {e}")))?;
        }
    }
    for gpa in &f.array_pages {
        channels
            .pages
            .add_page(gpa / 0x1000)
            .map_err(|e| bad(format!("event-array page {gpa:#x}: {e}")))?;
    }
    for (q, tail) in channels.queues.all().iter().zip(&f.tails) {
        q.reset(*tail);
    }
    let ports = f
        .lastq
        .iter()
        .map(|(p, _)| *p)
        .chain(f.early.iter().copied());
    for port in ports {
        t.reserve(port, &channels.slots);
    }
    for (port, l) in &f.lastq {
        if let Ok(slot) = channels.slot(*port) {
            slot.lastq.store(*l, Ordering::SeqCst);
        }
    }
    for port in &f.early {
        if let Ok(slot) = channels.slot(*port) {
            slot.early.store(true, Ordering::SeqCst);
        }
    }
    channels.fifo_on.store(true, Ordering::SeqCst);
    Ok(())
}
