//! Arbitrary sequences of hypercalls (any cmd, arbitrary argument words, valid, straddling and
//! outside addresses) and VMM calls, on a shared_info page full of garbage, checked step by
//! step against a reference model: a plain port table and the 2-level bits as a byte array.

use std::sync::Arc;

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::abi::{virq_is_global, virq_type, VirqType, NR_VIRQS};
use super::tests::{Recorder, ARGS, DOMID, RAM, SHINFO};
use super::*;

const CHECKED_PORTS: u32 = 40;

#[derive(Clone, Copy, Debug)]
enum Op {
    Hypercall {
        cmd: u32,
        words: [u32; 6],
        avail: usize,
    },
    SetPending {
        port: u32,
        vcpu: u32,
    },
    Notify {
        port: u32,
    },
    RaiseVirq {
        virq: u32,
        vcpu: u32,
    },
    BindBackend {
        port: u32,
    },
    AllocBackend,
    UnbindBackend {
        port: u32,
    },
    GuestWrite {
        offset: u64,
        value: u32,
    },
    Reset,
}

/// The reference: the port table as Xen describes it, and shared_info as bytes.
struct Model {
    long: bool,
    nports: u32,
    vcpus: u32,
    ports: Vec<(PortState, u32)>,
    virqs: Vec<u32>,
    /// Guest port of each backend port; `None` when the backend port is not open.
    backends: Vec<Option<u32>>,
    notified: Vec<u64>,
    sh: Vec<u8>,
    upcalls: Vec<u32>,
}

type R<T> = Result<T, XenError>;

impl Model {
    fn mask_off(&self) -> usize {
        if self.long {
            0xA00
        } else {
            0x880
        }
    }
    fn wbits(&self) -> u32 {
        if self.long {
            64
        } else {
            32
        }
    }
    fn sel_off(&self, vcpu: u32) -> usize {
        vcpu as usize * 64 + if self.long { 8 } else { 4 }
    }
    // Little-endian words make each bit array a plain bit string.
    fn bit(&self, base: usize, n: u32) -> bool {
        self.sh[base + n as usize / 8] >> (n % 8) & 1 != 0
    }
    fn put_bit(&mut self, base: usize, n: u32, v: bool) -> bool {
        let old = self.bit(base, n);
        let b = &mut self.sh[base + n as usize / 8];
        if v {
            *b |= 1 << (n % 8);
        } else {
            *b &= !(1 << (n % 8));
        }
        old
    }
    fn is_self(&self, dom: u16) -> bool {
        dom == DOMID_SELF || dom == DOMID
    }
    fn valid(&self, port: u32) -> bool {
        port != 0 && port < self.nports
    }
    fn state(&self, port: u32) -> PortState {
        self.ports[port as usize].0
    }

    fn mark(&mut self, port: u32, vcpu: u32) -> SetPending {
        if self.put_bit(0x800, port, true) {
            return SetPending::Coalesced;
        }
        if self.bit(self.mask_off(), port) {
            return SetPending::Masked;
        }
        self.mark_vcpu(port, vcpu)
    }
    fn mark_vcpu(&mut self, port: u32, vcpu: u32) -> SetPending {
        if self.put_bit(self.sel_off(vcpu), port / self.wbits(), true) {
            return SetPending::SelectorAlreadySet;
        }
        if self.put_bit(vcpu as usize * 64, 0, true) {
            return SetPending::UpcallAlreadyPending;
        }
        self.upcalls.push(vcpu);
        SetPending::Raised
    }
    fn deliver(&mut self, port: u32) -> R<SetPending> {
        if self.state(port) == PortState::Closed {
            return Err(XenError::Closed);
        }
        Ok(self.mark(port, self.ports[port as usize].1))
    }
    fn unmask(&mut self, port: u32, vcpu: u32, clear: bool) {
        let go = if clear {
            self.put_bit(self.mask_off(), port, false)
        } else {
            !self.bit(self.mask_off(), port)
        };
        if go && self.bit(0x800, port) {
            self.mark_vcpu(port, vcpu);
        }
    }
    fn alloc(&mut self, state: PortState, vcpu: u32) -> R<u32> {
        let p = (1..self.nports)
            .find(|&p| self.state(p) == PortState::Closed)
            .ok_or(XenError::NoSpace)?;
        self.ports[p as usize] = (state, vcpu);
        Ok(p)
    }
    fn close(&mut self, port: u32) -> R<()> {
        match self.state(port) {
            PortState::Closed => return Err(XenError::Invalid),
            PortState::Virq(_) => self
                .virqs
                .iter_mut()
                .filter(|p| **p == port)
                .for_each(|p| *p = 0),
            PortState::Interdomain {
                remote: Remote::Guest,
                remote_port: rp,
            } => {
                self.ports[rp as usize].0 = PortState::Unbound {
                    remote: Remote::Guest,
                }
            }
            PortState::Interdomain {
                remote: Remote::Backend,
                remote_port: be,
            } => self.backends[be as usize] = Some(0),
            _ => {}
        }
        self.put_bit(0x800, port, false);
        self.ports[port as usize] = (PortState::Closed, 0);
        Ok(())
    }
    fn close_all(&mut self) {
        for p in 1..self.nports {
            let _ = self.close(p);
        }
    }

    fn hypercall(&mut self, cmd: u32, buf: &mut [u8]) -> i64 {
        let size = match cmd {
            0..=2 => 12,
            3 | 4 | 9 => 4,
            5 => 24,
            6..=8 => 8,
            10 | 14 => 2,
            11 => 24,
            12 | 13 => 8,
            _ => return -38,
        };
        if buf.len() < size {
            return -14;
        }
        let mut a = buf[..size].to_vec();
        let r = self.op(cmd, &mut a);
        if r.is_ok() && matches!(cmd, 0 | 1 | 2 | 5 | 6 | 7) {
            buf[..size].copy_from_slice(&a);
        }
        r.map_or_else(|e| -e.errno(), |()| 0)
    }

    fn op(&mut self, cmd: u32, a: &mut [u8]) -> R<()> {
        let u16_at = |a: &[u8], o: usize| u16::from_le_bytes([a[o], a[o + 1]]);
        let u32_at = |a: &[u8], o: usize| u32::from_le_bytes(a[o..o + 4].try_into().unwrap());
        let put = |a: &mut [u8], o: usize, v: &[u8]| a[o..o + v.len()].copy_from_slice(v);
        let check = |m: &Self, p: u32| {
            if m.valid(p) {
                Ok(())
            } else {
                Err(XenError::Invalid)
            }
        };
        let check_dom = |m: &Self, dom: u16| {
            if m.is_self(dom) {
                Ok(())
            } else if dom == DOMID_BACKEND {
                Err(XenError::Permission)
            } else {
                Err(XenError::NoSuchDomain)
            }
        };
        match cmd {
            0 => {
                let (rdom, rp) = (u16_at(a, 0), u32_at(a, 4));
                let (remote, lp);
                if rdom != DOMID_BACKEND && !self.is_self(rdom) {
                    return Err(XenError::NoSuchDomain);
                }
                if !(1..self.nports).any(|p| self.state(p) == PortState::Closed) {
                    return Err(XenError::NoSpace);
                }
                if rdom == DOMID_BACKEND {
                    check(self, rp)?;
                    match self.backends[rp as usize] {
                        None => return Err(XenError::NoEntry),
                        Some(g) if g != 0 => return Err(XenError::Busy),
                        Some(_) => {}
                    }
                    remote = Remote::Backend;
                    lp = self.alloc(
                        PortState::Interdomain {
                            remote,
                            remote_port: rp,
                        },
                        0,
                    )?;
                    self.backends[rp as usize] = Some(lp);
                } else {
                    check(self, rp)?;
                    remote = Remote::Guest;
                    if self.state(rp) != (PortState::Unbound { remote }) {
                        return Err(XenError::Invalid);
                    }
                    lp = self.alloc(
                        PortState::Interdomain {
                            remote,
                            remote_port: rp,
                        },
                        0,
                    )?;
                    self.ports[rp as usize].0 = PortState::Interdomain {
                        remote,
                        remote_port: lp,
                    };
                }
                put(a, 8, &lp.to_le_bytes());
                let _ = self.deliver(lp);
            }
            1 => {
                let (virq, vcpu) = (u32_at(a, 0), u32_at(a, 4));
                if virq >= NR_VIRQS || (virq_is_global(virq) && vcpu != 0) {
                    return Err(XenError::Invalid);
                }
                if vcpu >= self.vcpus {
                    return Err(XenError::NoEntry);
                }
                if virq_type(virq) == VirqType::Global {
                    return Err(XenError::Busy);
                }
                let i = (vcpu * NR_VIRQS + virq) as usize;
                if self.virqs[i] != 0 {
                    return Err(XenError::Exists);
                }
                self.virqs[i] = self.alloc(PortState::Virq(virq), vcpu)?;
                put(a, 8, &self.virqs[i].to_le_bytes());
            }
            2 => {
                let pirq = u32_at(a, 0);
                if pirq >= NR_PIRQS {
                    return Err(XenError::Invalid);
                }
                if self.ports.iter().any(|(s, _)| *s == PortState::Pirq(pirq)) {
                    return Err(XenError::Exists);
                }
                let p = self.alloc(PortState::Pirq(pirq), 0)?;
                put(a, 8, &p.to_le_bytes());
            }
            3 => {
                check(self, u32_at(a, 0))?;
                self.close(u32_at(a, 0))?;
            }
            4 => {
                let p = u32_at(a, 0);
                check(self, p)?;
                match self.state(p) {
                    PortState::Interdomain {
                        remote: Remote::Guest,
                        remote_port,
                    } => {
                        let _ = self.deliver(remote_port);
                    }
                    PortState::Interdomain {
                        remote: Remote::Backend,
                        remote_port,
                    } => self.notified[remote_port as usize] += 1,
                    PortState::Ipi => drop(self.deliver(p)),
                    PortState::Unbound { .. } => {}
                    _ => return Err(XenError::Invalid),
                }
            }
            5 => {
                let (dom, p) = (u16_at(a, 0), u32_at(a, 4));
                check_dom(self, dom)?;
                if p != 0 {
                    check(self, p)?;
                }
                let (state, vcpu) = self.ports[p as usize];
                put(a, 8, &state.stat().to_le_bytes());
                put(a, 12, &vcpu.to_le_bytes());
                let dom = |r| match r {
                    Remote::Guest => DOMID,
                    Remote::Backend => 0,
                    Remote::Domain(d) => d,
                };
                match state {
                    PortState::Unbound { remote } => put(a, 16, &dom(remote).to_le_bytes()),
                    PortState::Interdomain {
                        remote,
                        remote_port,
                    } => {
                        put(a, 16, &dom(remote).to_le_bytes());
                        put(a, 20, &remote_port.to_le_bytes());
                    }
                    PortState::Virq(n) | PortState::Pirq(n) => put(a, 16, &n.to_le_bytes()),
                    _ => {}
                }
            }
            6 => {
                let (dom, rdom) = (u16_at(a, 0), u16_at(a, 2));
                check_dom(self, dom)?;
                let remote = match rdom {
                    DOMID_BACKEND => Remote::Backend,
                    d if self.is_self(d) => Remote::Guest,
                    d => Remote::Domain(d),
                };
                let p = self.alloc(PortState::Unbound { remote }, 0)?;
                put(a, 4, &p.to_le_bytes());
            }
            7 => {
                let vcpu = u32_at(a, 0);
                if vcpu >= self.vcpus {
                    return Err(XenError::NoEntry);
                }
                let p = self.alloc(PortState::Ipi, vcpu)?;
                put(a, 4, &p.to_le_bytes());
            }
            8 => {
                let (p, vcpu) = (u32_at(a, 0), u32_at(a, 4));
                if vcpu >= self.vcpus {
                    return Err(XenError::NoEntry);
                }
                check(self, p)?;
                match self.state(p) {
                    PortState::Virq(v) if !virq_is_global(v) => return Err(XenError::Invalid),
                    PortState::Closed | PortState::Ipi => return Err(XenError::Invalid),
                    _ => {}
                }
                self.ports[p as usize].1 = vcpu;
            }
            9 => {
                let p = u32_at(a, 0);
                if p >= self.nports {
                    return Err(XenError::Invalid);
                }
                self.unmask(p, self.ports[p as usize].1, true);
            }
            10 => {
                check_dom(self, u16_at(a, 0))?;
                self.close_all();
            }
            // init_control with a frame outside RAM (the runner puts it there: this is the
            // 2-level model; fifo_tests covers the switch): the vCPU, the offset, the frame.
            11 => {
                if u32_at(a, 12) >= self.vcpus {
                    return Err(XenError::NoEntry);
                }
                return Err(XenError::Invalid);
            }
            // expand_array before init_control.
            12 => return Err(XenError::NotSupported),
            13 if u32_at(a, 0) >= self.nports => return Err(XenError::Invalid),
            13 => return Err(XenError::NoSys),
            14 => {
                check_dom(self, u16_at(a, 0))?;
                return Err(XenError::Busy);
            }
            _ => unreachable!(),
        }
        Ok(())
    }
}

/// Argument words biased towards meaningful values: small ports and vCPUs, and pairs of
/// `domid_t` (a u16 pair fills the word at offset 0 of the domain-taking structs).
fn word() -> impl Strategy<Value = u32> {
    let dom = prop_oneof![
        3 => Just(DOMID_SELF),
        2 => Just(DOMID),
        2 => Just(DOMID_BACKEND),
        1 => Just(9u16),
        1 => any::<u16>(),
    ];
    prop_oneof![
        6 => 0u32..6,
        2 => 6u32..26,
        4 => (dom.clone(), dom).prop_map(|(a, b)| u32::from(a) | u32::from(b) << 16),
        1 => prop_oneof![Just(1023u32), Just(1024), Just(4095), Just(4096), Just(u32::MAX)],
        1 => any::<u32>(),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let avail = prop_oneof![6 => Just(24usize), 2 => 0usize..24];
    prop_oneof![
        12 => (prop_oneof![6 => 0u32..11, 1 => 0u32..16], prop::array::uniform6(word()), avail)
            .prop_map(|(cmd, words, avail)| Op::Hypercall { cmd, words, avail }),
        2 => (0u32..12, 0u32..4).prop_map(|(port, vcpu)| Op::SetPending { port, vcpu }),
        1 => (0u32..12).prop_map(|port| Op::Notify { port }),
        1 => (0u32..26, 0u32..4).prop_map(|(virq, vcpu)| Op::RaiseVirq { virq, vcpu }),
        1 => (0u32..12).prop_map(|port| Op::BindBackend { port }),
        1 => Just(Op::AllocBackend),
        1 => (0u32..6).prop_map(|port| Op::UnbindBackend { port }),
        2 => (prop_oneof![0u64..48, 0x200u64..0x208, 0x220u64..0x228, 0x280u64..0x288], any::<u32>())
            .prop_map(|(w, value)| Op::GuestWrite { offset: w * 4, value }),
        1 => Just(Op::Reset),
    ]
}

/// xorshift garbage for shared_info, thinned by `density` (0 = all zero, 3 = ~1/8 bits).
fn garbage(seed: u64, density: u32) -> Vec<u8> {
    let mut x = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    };
    (0..0x1000)
        .map(|_| match density {
            0 => 0,
            1 => next(),
            d => (0..d).fold(0xff, |b, _| b & next()),
        })
        .collect()
}

fn run(long: bool, vcpus: u32, seed: u64, density: u32, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
    let sh = garbage(seed, density);
    mem.write_slice(&sh, GuestAddress(SHINFO)).unwrap();
    let up = Arc::new(Recorder::default());
    let config = XenConfig {
        vcpus,
        long_mode: long,
        shared_info_gpa: SHINFO,
        domid: DOMID,
    };
    let ec = EventChannels::new(mem.clone(), config, up.clone());
    let nports = ec.layout().ports;
    let mut m = Model {
        long,
        nports,
        vcpus,
        ports: vec![(PortState::Closed, 0); nports as usize],
        virqs: vec![0; (vcpus * NR_VIRQS) as usize],
        backends: vec![None; nports as usize],
        notified: vec![0; nports as usize],
        sh,
        upcalls: Vec::new(),
    };
    let mut fds: Vec<Option<EventFd>> = (0..nports).map(|_| None).collect();

    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Hypercall {
                cmd,
                mut words,
                avail,
            } => {
                if cmd == 11 {
                    words[1] |= 0x8000_0000; // control_gfn outside RAM
                }
                let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                // `avail` bytes of argument fit in RAM: 24 at the scratch area, fewer at the
                // end of RAM, none far outside it.
                let gpa = match avail {
                    24 => ARGS,
                    0 => 0x4000_0000,
                    n => RAM as u64 - n as u64,
                };
                let mut buf = bytes[..avail].to_vec();
                mem.write_slice(&buf, GuestAddress(gpa)).ok();
                let rc = ec.hypercall(0, cmd, gpa);
                let want = m.hypercall(cmd, &mut buf);
                prop_assert_eq!(rc, want, "step {} {:?}", step, op);
                let mut got = vec![0u8; avail];
                mem.read_slice(&mut got, GuestAddress(gpa)).ok();
                prop_assert_eq!(got, buf, "args written back, step {}", step);
            }
            Op::SetPending { port, vcpu } => {
                let want = if !m.valid(port) {
                    Err(XenError::Invalid)
                } else if vcpu >= vcpus {
                    Err(XenError::NoEntry)
                } else if m.state(port) == PortState::Closed {
                    Err(XenError::Closed)
                } else {
                    Ok(m.mark(port, vcpu))
                };
                prop_assert_eq!(ec.set_pending(port, vcpu), want, "step {}", step);
            }
            Op::Notify { port } => {
                let want = if m.valid(port) {
                    m.deliver(port).map(drop)
                } else {
                    Err(XenError::Invalid)
                };
                prop_assert_eq!(ec.notify_port(port), want, "step {}", step);
            }
            Op::RaiseVirq { virq, vcpu } => {
                let owner = if virq_is_global(virq) { 0 } else { vcpu };
                let want = if virq >= NR_VIRQS {
                    Err(XenError::Invalid)
                } else if owner >= vcpus {
                    Err(XenError::NoEntry)
                } else {
                    match m.virqs[(owner * NR_VIRQS + virq) as usize] {
                        0 => Ok(()),
                        p => m.deliver(p).map(drop),
                    }
                };
                prop_assert_eq!(ec.raise_virq(virq, vcpu), want, "step {}", step);
            }
            Op::BindBackend { port } => {
                let unbound = PortState::Unbound {
                    remote: Remote::Backend,
                };
                let want = if !m.valid(port) || m.state(port) != unbound {
                    Err(XenError::Invalid)
                } else {
                    let be = (1..nports)
                        .find(|&b| m.backends[b as usize].is_none())
                        .unwrap();
                    m.backends[be as usize] = Some(port);
                    m.ports[port as usize].0 = PortState::Interdomain {
                        remote: Remote::Backend,
                        remote_port: be,
                    };
                    Ok(be)
                };
                let got = ec.bind_backend(port).map(|b| {
                    let p = b.port;
                    fds[p as usize] = Some(b.notify);
                    p
                });
                prop_assert_eq!(got, want, "step {}", step);
            }
            Op::AllocBackend => {
                let be = (1..nports)
                    .find(|&b| m.backends[b as usize].is_none())
                    .unwrap();
                m.backends[be as usize] = Some(0);
                let b = ec.alloc_backend_unbound().unwrap();
                prop_assert_eq!(b.port, be);
                fds[be as usize] = Some(b.notify);
            }
            Op::UnbindBackend { port } => {
                let want = match m.backends.get(port as usize).copied().flatten() {
                    None => Err(XenError::NoEntry),
                    Some(g) => {
                        let connected = PortState::Interdomain {
                            remote: Remote::Backend,
                            remote_port: port,
                        };
                        if g != 0 && m.state(g) == connected {
                            m.ports[g as usize].0 = PortState::Unbound {
                                remote: Remote::Backend,
                            };
                        }
                        m.backends[port as usize] = None;
                        fds[port as usize] = None;
                        Ok(())
                    }
                };
                prop_assert_eq!(ec.unbind_backend(port), want, "step {}", step);
            }
            Op::GuestWrite { offset, value } => {
                // Guest stores to vcpu_info headers (0..0xC0) and the pending/mask words.
                mem.write_obj(value, GuestAddress(SHINFO + offset)).unwrap();
                m.sh[offset as usize..offset as usize + 4].copy_from_slice(&value.to_le_bytes());
            }
            Op::Reset => {
                ec.reset();
                m.close_all();
            }
        }

        // The whole shared_info page, the upcalls, the table and the backend eventfds agree.
        let mut page = vec![0u8; 0x1000];
        mem.read_slice(&mut page, GuestAddress(SHINFO)).unwrap();
        prop_assert!(
            page == m.sh,
            "shared_info differs after step {} {:?}",
            step,
            op
        );
        prop_assert_eq!(
            up.0.lock().unwrap().drain(..).collect::<Vec<_>>(),
            std::mem::take(&mut m.upcalls)
        );
        for p in (0..CHECKED_PORTS).chain([nports - 1, nports]) {
            let s = ec.port_status(p);
            let want = m
                .ports
                .get(p as usize)
                .copied()
                .unwrap_or((PortState::Closed, 0));
            prop_assert_eq!((s.state, s.vcpu), want, "port {} after step {}", p, step);
        }
        for (be, fd) in fds.iter().enumerate() {
            if let Some(fd) = fd {
                let got = fd.read().unwrap_or(0);
                prop_assert_eq!(got, std::mem::take(&mut m.notified[be]), "backend {}", be);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn xen_event_channels_match_the_model(
        long in any::<bool>(),
        vcpus in 1u32..=3,
        seed in any::<u64>(),
        density in 0u32..4,
        ops in prop::collection::vec(op_strategy(), 1..48),
    ) {
        run(long, vcpus, seed, density, ops)?;
    }
}
